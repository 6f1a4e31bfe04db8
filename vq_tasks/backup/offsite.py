"""The off-site copy: every complete backup is copied from the primary storage to a second
destination (BACKUP_OFFSITE_PROVIDER and BACKUP_OFFSITE_PATH), for disaster recovery.

Each stored file is streamed from one provider to the other and checked against the manifest
(size, MD5, SHA-256) on the way; the target's own upload checks apply as to any backup. The
manifest is copied last, so the copy looks complete only once it is (its acceptance, if it has
one, after it). A copy that fails leaves no manifest, and the off-site prune removes its debris
like that of any unfinished backup. Encrypted files (``.age``) are copied as they are, checked
against the manifest's checksums of their encrypted bytes: the copy needs no key.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime

from vq_tasks.catalog.acceptance import MAX_BYTES as MAX_ACCEPTANCE_BYTES
from vq_tasks.catalog.listing import backup_sets, parse_manifest, read_signature
from vq_tasks.catalog.trust import check_manifest
from vq_tasks.crypto.signing import PublicKeys, distrust
from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.logs import Say
from vq_tasks.manifest import Manifest, StoredFile, acceptance_name, manifest_name, signature_name
from vq_tasks.retention.policy import LockDates, Policy, lock_dates
from vq_tasks.storage.base import Storage
from vq_tasks.streams.stages import HashStage, pump

logger = logging.getLogger(__name__)


@dataclass
class CopyResult:
    """What one call copied: backup ids copied now and those the target already held."""

    copied: list[str] = field(default_factory=list)
    already_there: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    size: int = 0


def copy_backup(
    source: Storage,
    target: Storage,
    backup_id: str,
    say: Say = logger.info,
    keys: PublicKeys | None = None,
    lock_policy: Policy | None = None,
) -> int:
    """Copy the complete backup ``backup_id`` from ``source`` to ``target``, its manifest last;
    return the bytes copied (0 if the target already holds it complete). Raise PermanentError if
    the source is incomplete or differs from its manifest (nothing is then committed for that
    file), or its manifest's signature fails ``keys`` (BACKUP_SIGNING_PUBLIC_KEYS: nothing is
    copied), StorageError if either storage fails."""
    name = manifest_name(backup_id)
    if target.stat(name) is not None:
        return 0
    try:
        document = source.read_bytes(name)
    except FileNotFoundError:
        raise PermanentError(f"no complete backup {backup_id} in {source.describe()} to copy") from None
    prefix = backup_id.rsplit("_", 2)[0]  # <prefix>_YYYYMMDD_HHMMSS
    signature = read_signature(source, backup_id)
    manifest = parse_manifest(document, f"{name} in {source.describe()}", signature)
    manifest = check_manifest(manifest, backup_id, prefix)  # it names only this backup's files
    problem = distrust(manifest, keys or {})
    if problem:
        raise PermanentError(f"{name} in {source.describe()}: manifest signature {problem}; not copied")
    logs_file = manifest.components["logs"].stored_in if "logs" in manifest.components else None
    locks = _lock_dates(manifest, lock_policy)
    backup_lock = locks.until if locks else None
    copied = 0
    for stored in manifest.files:
        if stored.name == logs_file and source.stat(stored.name) is None:
            say(f"{stored.name} is gone from {source.describe()} (BACKUP_LOGS_RETENTION_DAYS): not copied")
            continue
        say(f"copying {stored.name} ({stored.size} bytes) to {target.describe()}")
        lock = (locks.logs_until if stored.name == logs_file else locks.until) if locks else None
        copy_file(source, target, stored, backup_id, lock)
        copied += stored.size
    _check_copied(target, manifest, logs_file)
    if signature is not None:  # before the manifest, as finalize writes them
        with target.open_write(signature_name(backup_id), backup_lock) as out:
            out.write(signature.encode() + b"\n")
    with target.open_write(name, backup_lock) as out:
        out.write(document)
    return copied + len(document) + _copy_acceptance(source, target, backup_id)


def _copy_acceptance(source: Storage, target: Storage, backup_id: str) -> int:
    """Copy the backup's acceptance (`vq-backup accept`), if it has one, after its manifest: it
    names the manifest by the SHA-256 of its bytes, which the copy keeps. Return its size."""
    name = acceptance_name(backup_id)
    try:
        data = source.read_bytes(name, limit=MAX_ACCEPTANCE_BYTES)
    except FileNotFoundError:
        return 0
    with target.open_write(name) as out:
        out.write(data)
    return len(data)


def _lock_dates(manifest: Manifest, lock_policy: Policy | None) -> LockDates | None:
    """The locks of the copy (None: BACKUP_IMMUTABILITY is off): those the manifest records,
    else (a backup made before it was turned on) those the policy gives it now."""
    if lock_policy is None:
        return None
    if manifest.locks is not None:
        return LockDates(manifest.locks.until, manifest.locks.logs_until)
    return lock_dates(manifest.started_at, manifest.kind, lock_policy)


def copy_file(
    source: Storage, target: Storage, stored: StoredFile, backup_id: str, retain_until: datetime | None = None
) -> None:
    """Stream one stored file from ``source`` to ``target`` (locked there until ``retain_until``
    if given), checking it against ``stored``; a mismatch raises inside the write, so the target
    commits nothing."""
    with contextlib.ExitStack() as stack:
        try:
            stream = stack.enter_context(source.open_read(stored.name))
        except FileNotFoundError:
            raise PermanentError(f"{stored.name} is missing from {source.describe()}: not copied") from None
        out = stack.enter_context(target.open_write(stored.name, retain_until))
        hashed = HashStage(out)
        pump(stream, hashed)
        found = hashed.checksums()
        if (found.size, found.md5, found.sha256) != (stored.size, stored.md5, stored.sha256):
            raise PermanentError(
                f"{stored.name} in {source.describe()} does not match its manifest "
                f"({found.size} bytes, sha256 {found.sha256[:12]}…; expected {stored.size} bytes, "
                f"{stored.sha256[:12]}…): not copied; run `vq-backup verify {backup_id}`"
            )


def _check_copied(target: Storage, manifest: Manifest, logs_file: str | None) -> None:
    """Raise TransientError if a copied file is not in ``target`` at its size (removed by a prune
    that ran meanwhile, say): the manifest must not vouch for what is not there."""
    for stored in manifest.files:
        found = target.stat(stored.name)
        if found is None and stored.name == logs_file:
            continue
        if found is None or found.size != stored.size:
            raise TransientError(f"{stored.name} vanished from {target.describe()} while it was copied")


def missing_backups(source: Storage, target: Storage, prefix: str, since: datetime) -> list[str]:
    """Return the ids of complete backups in ``source`` started after ``since`` that ``target``
    does not hold complete, newest first."""
    held = {b.backup_id for b in backup_sets(target.list(), prefix) if b.complete}
    found = [b for b in backup_sets(source.list(), prefix) if b.complete and b.started >= since]
    return [b.backup_id for b in reversed(found) if b.backup_id not in held]


def sync(
    source: Storage,
    target: Storage,
    prefix: str,
    since: datetime,
    say: Say = logger.info,
    keys: PublicKeys | None = None,
    lock_policy: Policy | None = None,
) -> CopyResult:
    """Copy every complete backup of ``source`` since ``since`` that ``target`` lacks, newest
    first; return what was copied and, by id, the backups that could not be (a damaged source,
    or a manifest whose signature fails ``keys``).
    A storage failure (StorageError) stops the sync and is raised."""
    result = CopyResult()
    for backup_id in missing_backups(source, target, prefix, since):
        try:
            size = copy_backup(source, target, backup_id, say, keys, lock_policy)
        except PermanentError as exc:  # one damaged backup must not keep the older ones from copying
            result.failed[backup_id] = str(exc)
            continue
        (result.copied if size else result.already_there).append(backup_id)
        result.size += size
    return result
