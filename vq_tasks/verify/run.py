"""Verify a stored backup against its manifest, reading every stored file once, as a stream.

Each stored file passes through a reader that hashes its raw bytes (size, MD5, SHA-256); a
compressed one is then inflated member by member (the bundle is many concatenated gzip members,
which tarfile's own ``r|gz`` mode does not read past the first of) and read by tarfile in stream
mode. Each bundle member is hashed in chunks and looked into as it passes: the SQL dump for
pg_dump's closing line and its rows, the RDB for its CRC64, config.tar.gz as an archive of its
own. The logs archive's checksums in the manifest cover its uncompressed tar stream. After the
tar's end, the rest (end blocks, padding) is read through the same hashers, so every byte counts;
after an error the rest of the raw file still is, so its checksums are always those of the whole.
Memory stays bounded by a few chunks whatever the size of the backup.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, computed_field

from vq_tasks.audit import audit
from vq_tasks.catalog.latest import resolve_backup_id
from vq_tasks.catalog.listing import load_manifest
from vq_tasks.crypto import encryption, signing
from vq_tasks.crypto.age import X25519Identity
from vq_tasks.manifest import (
    Component,
    ComponentEntry,
    Manifest,
    StoredFile,
    is_encrypted,
    manifest_name,
    parse_backup_id,
    plain_name,
    split_object_name,
)
from vq_tasks.settings import Settings
from vq_tasks.storage.base import Storage
from vq_tasks.verify.protection import protection_checks, signature_file_checks
from vq_tasks.verify.scan import (
    Check,
    Decrypt,
    MemberProbe,
    Scan,
    absent_check,
    checksum_checks,
    files_checks,
    member_names,
    member_probes,
    names_check,
    readable_check,
    scan_archive,
    unchecked_check,
)

NOT_CHECKED = "NOT CHECKED"
Outcome = Literal["ok", "mismatch", "not checked"]


class _Checked(BaseModel):
    checks: list[Check]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


class FileReport(_Checked):
    name: str


class ComponentReport(_Checked):
    component: str
    member: str
    stored_in: str


class VerifyReport(BaseModel):
    backup_id: str
    storage: str
    verified_at: datetime
    files: list[FileReport]
    components: list[ComponentReport]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        return all(item.ok for item in [*self.files, *self.components])

    @computed_field  # type: ignore[prop-decorator]
    @property
    def outcome(self) -> Outcome:
        """``ok``; ``mismatch`` if any check failed; else ``not checked`` if the contents of an
        encrypted backup could not be read (no key, or not its key): never OK."""
        checks = [c for item in [*self.files, *self.components] for c in item.checks]
        if any(not c.ok and c.checked for c in checks):
            return "mismatch"
        return "ok" if all(c.ok for c in checks) else "not checked"


def verify_backup(
    storage: Storage,
    settings: Settings,
    backup_id: str,
    now: datetime | None = None,
    manifest: Manifest | None = None,
) -> VerifyReport:
    """Given a backup id or ``latest``, read every file its manifest names once and return the
    report of every check. Raise PermanentError for a bad id or a backup without a manifest.
    Given ``manifest`` (read by the caller, who goes on to use it), that very copy is checked."""
    now = now or datetime.now(UTC)
    prefix = settings.backup_name_prefix
    backup_id = resolve_backup_id(storage, settings, backup_id)
    manifest = manifest or load_manifest(storage, backup_id)
    days = settings.backup_logs_retention_days
    retired = days if now - parse_backup_id(backup_id, prefix) > timedelta(days=days) else None
    files = [_manifest_report(manifest, backup_id, settings)]
    files[0].checks += protection_checks(storage, manifest, manifest_name(backup_id), now)
    files[0].checks += signature_file_checks(storage, manifest, now)
    components: dict[Component, ComponentReport] = {}
    encrypted = any(is_encrypted(f.name) for f in manifest.files)
    identities = encryption.identities_of(settings) if encrypted else None
    for stored in {f.name: f for f in manifest.files}.values():
        entries = {n: e for n, e in manifest.components.items() if e.stored_in == stored.name}
        decrypt = _decrypter(stored.name, identities, manifest) if is_encrypted(stored.name) else None
        report, found = _verify_file(storage, manifest, stored, entries, prefix, retired, decrypt)
        report.checks += protection_checks(storage, manifest, stored.name, now)
        files.append(report)
        components.update(found)
    for name, entry in manifest.components.items():
        if name not in components:
            checks = [absent_check(entry, f"{entry.stored_in} is not among the manifest's files", False)]
            components[name] = _component_report(name, entry, checks)
    ordered = [components[name] for name in manifest.components]
    return VerifyReport(
        backup_id=backup_id, storage=storage.describe(), verified_at=now, files=files, components=ordered
    )


def _decrypter(name: str, identities: list[X25519Identity] | None, manifest: Manifest) -> Decrypt:
    return lambda raw: encryption.decrypting(raw, name, identities, manifest.encryption)


def is_whole(entry: ComponentEntry) -> bool:
    """Return whether a component is a stored file of its own (the logs archive), not a member
    of the bundle: stored under its member's name, with ``.age`` when encrypted."""
    return plain_name(entry.stored_in) == entry.member


def _manifest_report(manifest: Manifest, backup_id: str, settings: Settings) -> FileReport:
    """The manifest's own checks: it names this backup, and its signature (BACKUP_SIGNING_PUBLIC_KEYS)."""
    same = manifest.backup_id == backup_id
    named = Check(check="backup id", expected=backup_id, actual=manifest.backup_id, ok=same)
    signed = signing.check(manifest, signing.trusted_keys(settings))
    signature = Check(check="signature", expected=signed.expected, actual=signed.actual, ok=signed.ok)
    return FileReport(name=manifest_name(backup_id), checks=[named, signature])


def _component_report(name: str, entry: ComponentEntry, checks: list[Check]) -> ComponentReport:
    return ComponentReport(component=name, member=entry.member, stored_in=entry.stored_in, checks=checks)


def _verify_file(
    storage: Storage,
    manifest: Manifest,
    stored: StoredFile,
    entries: dict[Component, ComponentEntry],
    prefix: str,
    retired: int | None,
    decrypt: Decrypt | None = None,
) -> tuple[FileReport, dict[Component, ComponentReport]]:
    """Read one stored file once; return its report and those of ``entries``, the components
    stored in it. ``retired`` is BACKUP_LOGS_RETENTION_DAYS if the backup is older, else None;
    ``decrypt`` opens an encrypted file's plaintext."""
    role = split_object_name(stored.name, prefix)
    if role is None or role[0] != manifest.backup_id:  # never read a name that is not this backup's
        bad = Check(check="name", expected=f"a file of {manifest.backup_id}", actual=stored.name, ok=False)
        unread = {
            n: _component_report(n, e, [absent_check(e, "not read", False)]) for n, e in entries.items()
        }
        return FileReport(name=stored.name, checks=[bad]), unread
    compression = manifest.compression
    whole = {n: e for n, e in entries.items() if is_whole(e)}  # the logs: the tar stream itself
    probes: dict[str, MemberProbe] = {}
    for name, entry in entries.items():
        probes.update({} if name in whole else member_probes(name, entry, compression))
    try:
        with storage.open_read(stored.name) as stream:
            scan = scan_archive(stream, compression, probes, content_checksums=bool(whole), decrypt=decrypt)
    except FileNotFoundError:
        return _missing_file(stored, entries, retired if role[1] == "logs" else None)
    if scan.unchecked:
        return _unchecked_file(stored, scan, entries, compression)
    checks = [*checksum_checks(stored, scan.stored), readable_check(scan.error, compression, bool(decrypt))]
    if probes:
        checks.append(names_check("members", list(probes), scan.members))
    found = {
        n: _component_report(n, e, [c for m in member_names(e) for c in probes[m].checks()])
        for n, e in entries.items()
        if n not in whole
    }
    for name, entry in whole.items():
        if scan.content is None:  # not even the start of the plaintext could be read
            content_checks = [absent_check(entry, f"unreadable: {scan.error}", False)]
        else:
            content_checks = checksum_checks(entry.content, scan.content) + files_checks(entry, scan.members)
        found[name] = _component_report(name, entry, content_checks)
    return FileReport(name=stored.name, checks=checks), found


def _unchecked_file(
    stored: StoredFile, scan: Scan, entries: dict[Component, ComponentEntry], compression: str
) -> tuple[FileReport, dict[Component, ComponentReport]]:
    """The report of an encrypted file whose key is missing or wrong: its stored bytes checked,
    its contents and components NOT CHECKED (which is not OK: a restore refuses it)."""
    assert scan.unchecked is not None
    what = readable_check(None, compression, encrypted=True).expected
    checks = [*checksum_checks(stored, scan.stored), unchecked_check("contents", what, scan.unchecked)]
    found = {
        n: _component_report(n, e, [unchecked_check("contents", f"{e.member} checked", scan.unchecked)])
        for n, e in entries.items()
    }
    return FileReport(name=stored.name, checks=checks), found


def _missing_file(
    stored: StoredFile, entries: dict[Component, ComponentEntry], retired: int | None
) -> tuple[FileReport, dict[Component, ComponentReport]]:
    """The report of a stored file that is not in storage: a failure, unless log retention
    (``retired`` days) removed it."""
    ok = retired is not None
    actual = f"removed by log retention (older than {retired} days)" if ok else "missing"
    check = Check(check="present", expected="in storage", actual=actual, ok=ok)
    component_actual = actual if ok else f"{stored.name} is missing"
    components = {
        n: _component_report(n, e, [absent_check(e, component_actual, ok)]) for n, e in entries.items()
    }
    return FileReport(name=stored.name, checks=[check]), components


def report_rows(report: VerifyReport) -> list[tuple[str, str, str, str, str]]:
    """Return one row per check: file or component, check, expected, actual, OK or MISMATCH."""
    rows = []
    subjects = [(f.name, f.checks) for f in report.files]
    subjects += [
        (c.component if c.member == plain_name(c.stored_in) else f"{c.component} ({c.member})", c.checks)
        for c in report.components
    ]
    for subject, checks in subjects:
        for c in checks:
            result = "OK" if c.ok else "MISMATCH" if c.checked else NOT_CHECKED
            rows.append((subject, c.check, c.expected, c.actual, result))
    return rows


def verify_operation(
    storage: Storage, settings: Settings, backup_id: str, origin: str, task_id: str | None = None
) -> VerifyReport:
    """Run verify_backup as an operator's operation: the same report, and one audit line with its
    outcome (ok, mismatch, or the error that stopped it) and duration."""
    started = time.monotonic()
    fields = {"origin": origin, "task_id": task_id, "storage": storage.describe()}
    try:
        report = verify_backup(storage, settings, backup_id)
    except Exception as exc:
        took = round(time.monotonic() - started, 3)
        audit(settings, "verify", "failed", backup_id=backup_id, error=str(exc), duration_seconds=took,
              **fields)  # fmt: skip
        raise
    mismatches = [f"{row[0]} {row[1]}" for row in report_rows(report) if row[-1] == "MISMATCH"]
    took = round(time.monotonic() - started, 3)
    outcome = {"ok": "succeeded", "mismatch": "mismatch", "not checked": "not checked"}[report.outcome]
    audit(settings, "verify", outcome, backup_id=report.backup_id,
          mismatches=mismatches or None, duration_seconds=took, **fields)  # fmt: skip
    return report


def summary(report: VerifyReport) -> tuple[str, bool]:
    """Return the last line `vq-backup verify` prints and whether the backup counts as verified:
    all OK; N of M checks MISMATCH; or, for an encrypted backup without its key, the stored files'
    checks and N checks NOT CHECKED (not verified: a restore would refuse it)."""
    rows = report_rows(report)
    failed = sum(row[-1] == "MISMATCH" for row in rows)
    unchecked = sum(row[-1] == NOT_CHECKED for row in rows)
    if failed:
        return f"{report.backup_id}: {failed} of {len(rows)} checks MISMATCH", False
    if unchecked:
        return (
            f"{report.backup_id}: stored files OK, contents NOT CHECKED ({unchecked} checks): the backup is "
            "encrypted and BACKUP_ENCRYPTION_IDENTITY_FILE is not set or holds none of its keys",
            False,
        )
    return f"{report.backup_id}: all OK", True
