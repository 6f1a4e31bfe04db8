"""Forgery and erasure, seen: the checks of what someone holding the workers' credentials could
have done to a stored backup, and the incident they open.

Beside the checksums (``verify.run``), every object of a backup is checked for what happened to
it after its backup was committed: hidden by a delete marker or overwritten (a store that keeps
versions, read as committed: ``storage.committed``), gone although its lock had not ended, or
locked for less time than its manifest promises (``Manifest.locks``, signed). These and a failed
manifest signature are integrity failures (``monitoring.integrity`` alerts, counts and audits them).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from vq_tasks.manifest import Manifest, signature_name
from vq_tasks.storage.base import Storage, StorageError
from vq_tasks.verify.scan import Check, unchecked_check

# check name -> the kind of integrity failure it reports (the metric's label)
INTEGRITY_CHECKS = {
    "signature": "forged",
    "unchanged": "tampered",
    "present while locked": "erased",
    "locked until": "underlocked",
}
# with BACKUP_IMMUTABILITY, a locked object that does not match its manifest was tampered with
CHECKSUM_CHECKS = ("size", "md5", "sha256")
INTEGRITY_KINDS = tuple(dict.fromkeys(INTEGRITY_CHECKS.values()))
LOCK_SLACK = timedelta(seconds=1)  # stores keep retain-until dates to the second


def promised_lock(manifest: Manifest, name: str) -> datetime | None:
    """Return until when the manifest says ``name`` was locked (None: written without locks)."""
    if manifest.locks is None:
        return None
    logs = manifest.components.get("logs")
    return manifest.locks.logs_until if logs is not None and name == logs.stored_in else manifest.locks.until


def protection_checks(storage: Storage, manifest: Manifest, name: str, now: datetime) -> list[Check]:
    """Return the checks of what happened to the stored object ``name`` after its backup was
    committed; none when nothing can be told (an unlocked object that is simply there)."""
    found = storage.stat(name)
    promised = promised_lock(manifest, name)
    locked_now = promised is not None and promised > now
    if found is None:
        if not locked_now:
            return []  # missing: the checksum checks report it
        return [_check("present while locked", f"locked until {_when(promised)}", "missing", False)]
    checks = []
    if found.tampered:
        checks.append(_check("unchanged", "as its backup committed it", found.tampered, False))
    if locked_now and storage.can_lock:
        try:
            until = storage.retention(name)
        except StorageError as exc:  # e.g. no s3:GetObjectRetention: not told, not failed
            return [*checks, unchecked_check("locked until", f"{_when(promised)} or later", str(exc))]
        ok = until is not None and promised is not None and until >= promised - LOCK_SLACK
        actual = "not locked" if until is None else f"locked until {_when(until)}"
        checks.append(_check("locked until", f"{_when(promised)} or later", actual, ok))
    return checks


def signature_file_checks(storage: Storage, manifest: Manifest, now: datetime) -> list[Check]:
    """The protection checks of the manifest's detached signature, when it has one."""
    if manifest.detached_signature is None:
        return []
    return protection_checks(storage, manifest, signature_name(manifest.backup_id), now)


def _check(check: str, expected: str, actual: str, ok: bool) -> Check:
    return Check(check=check, expected=expected, actual=actual, ok=ok)


def _when(moment: datetime | None) -> str:
    return "an unknown date" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S} UTC"
