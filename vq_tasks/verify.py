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

import re
import tarfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

from pydantic import BaseModel, computed_field

from vq_tasks.catalog import backup_sets, load_manifest
from vq_tasks.errors import BackupError, PermanentError
from vq_tasks.manifest import (
    ComponentEntry,
    DatabaseFacts,
    FilesFacts,
    Manifest,
    RedisFacts,
    StoredFile,
    manifest_name,
    parse_backup_id,
    split_object_name,
)
from vq_tasks.settings import Settings
from vq_tasks.sources.redis import RdbCheck
from vq_tasks.sources.sql_dump import SqlDumpInspector
from vq_tasks.storage.base import Storage
from vq_tasks.streams import (
    CHUNK_SIZE,
    Checksums,
    DamagedStream,
    GunzipReader,
    HashingReader,
    HashStage,
    Nowhere,
)

BLOCK = tarfile.BLOCKSIZE
TAR_BUFSIZE = 64 * 1024  # tarfile's reads; it reads less than this ahead of the member it is on
WINDOW = 4 * TAR_BUFSIZE  # kept behind the read position, to see what follows the tar's end
SHOWN = 5  # names shown when lists of files differ


class Check(BaseModel):
    check: str
    expected: str
    actual: str
    ok: bool


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


@dataclass
class Scan:
    """What reading one (compressed) tar stream found: checksums of its raw bytes and, if asked
    for, of the tar stream; the names of its members; why it could not be read to the end."""

    stored: Checksums
    content: Checksums | None
    members: list[str]
    error: str | None


# what reading a damaged stream raises: our own, tarfile's, zlib's, and storage read errors
READ_ERRORS = (DamagedStream, tarfile.TarError, zlib.error, OSError, EOFError, ValueError, BackupError)


def scan_archive(
    source: BinaryIO,
    compressed: bool,
    probes: dict[str, MemberProbe] | None = None,
    content_checksums: bool = False,
) -> Scan:
    """Read ``source``, a tar stream (gzip-compressed if ``compressed``), to its very end, handing
    each member named in ``probes`` to its probe; return what was found, with the checksums of the
    tar stream itself if ``content_checksums``. A stream that cannot be read to the end is reported
    in the result's ``error``; the raw bytes are counted all the same."""
    raw = HashingReader(source, keep=0 if compressed else WINDOW)
    content = HashingReader(GunzipReader(raw), WINDOW, content_checksums) if compressed else raw
    members: list[str] = []
    error = None
    try:
        end = _read_tar(content, probes or {}, members)
        _check_end(content, end)
    except READ_ERRORS as exc:
        error = _reason(exc)
    try:
        _drain(raw)
    except READ_ERRORS as exc:
        error = error or _reason(exc)
    stored = raw.checksums()
    assert stored is not None
    return Scan(stored, content.checksums() if content_checksums else None, members, error)


def _read_tar(content: HashingReader, probes: dict[str, MemberProbe], members: list[str]) -> int:
    """Read the tar's members, append their names, feed the probes; return the tar's end offset."""
    with tarfile.open(fileobj=content, mode="r|", bufsize=TAR_BUFSIZE) as tar:
        while (info := tar.next()) is not None:
            tar.members.clear()  # stream mode keeps every TarInfo otherwise
            members.append(info.name)
            probe = probes.get(info.name)
            if probe is not None and info.isfile() and not probe.found:
                stream = tar.extractfile(info)
                assert stream is not None  # a regular file always has a stream
                probe.read(stream)
        return tar.offset


def _check_end(content: HashingReader, end: int) -> None:
    """Read the rest of the tar stream after the last member. Raise DamagedStream unless it is
    zeros only, two blocks at least (the end-of-archive marker and padding)."""
    seen = content.since(end)
    rest, zeros = _drain(content)
    if seen is None or seen.strip(b"\0") or not zeros:
        raise DamagedStream(f"the tar stream has neither a header nor its end blocks at byte {end}")
    if len(seen) + rest < 2 * BLOCK:
        raise DamagedStream(f"the tar stream ends at byte {end + len(seen) + rest} without its end blocks")


def _drain(reader: HashingReader) -> tuple[int, bool]:
    """Read ``reader`` to its end; return how many bytes that was, and whether all were zeros."""
    total, zeros = 0, True
    while chunk := reader.read(CHUNK_SIZE):
        total += len(chunk)
        zeros = zeros and not chunk.strip(b"\0")
    return total, zeros


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DamagedStream | BackupError):
        return str(exc)
    if isinstance(exc, tarfile.TarError):
        return f"tar stream: {exc}"
    if isinstance(exc, OSError):
        return f"read error: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def checksum_checks(expected: Checksums | StoredFile, actual: Checksums) -> list[Check]:
    """Return the size, MD5 and SHA-256 checks of ``actual`` against ``expected``."""
    return [
        Check(check=name, expected=str(want), actual=str(got), ok=want == got)
        for name, want, got in (
            ("size", expected.size, actual.size),
            ("md5", expected.md5, actual.md5),
            ("sha256", expected.sha256, actual.sha256),
        )
    ]


def readable_check(error: str | None, compressed: bool) -> Check:
    what = "gzip and tar read to the end" if compressed else "tar read to the end"
    return Check(check="readable", expected=what, actual=error or "read to the end", ok=error is None)


def names_check(check: str, expected: list[str], actual: list[str]) -> Check:
    """Return a check that ``actual`` lists the same names as ``expected``, in the same order."""
    if expected == actual:
        return Check(
            check=check, expected=f"entries: {len(expected)}", actual=f"entries: {len(actual)}", ok=True
        )
    missing = [n for n in expected if n not in set(actual)]
    extra = [n for n in actual if n not in set(expected)]
    found = [f"missing: {_few(missing)}"] if missing else []
    found += [f"unexpected: {_few(extra)}"] if extra else []
    shown = "; ".join(found) or "another order or repeated entries"
    return Check(check=check, expected=f"entries: {len(expected)}", actual=shown, ok=False)


def _few(names: list[str]) -> str:
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


class MemberProbe:
    """Hash one bundle member as it is read; subclasses look inside it as well."""

    def __init__(self, entry: ComponentEntry):
        self.entry = entry
        self.found = False
        self._hash = HashStage(Nowhere())

    def read(self, stream: BinaryIO) -> None:
        self.found = True
        while chunk := stream.read(CHUNK_SIZE):
            self._hash.write(chunk)
            self.observe(chunk)

    def observe(self, chunk: bytes) -> None:
        """Look at the next chunk of the member."""

    def checks(self) -> list[Check]:
        if not self.found:
            return [_absent(self.entry, "missing", False)]
        return checksum_checks(self.entry.content, self._hash.checksums()) + self.inner_checks()

    def inner_checks(self) -> list[Check]:
        return []


class SqlProbe(MemberProbe):
    """database.sql: pg_dump's closing line is there, and the rows per table are the manifest's."""

    def __init__(self, entry: ComponentEntry):
        super().__init__(entry)
        self._inspector = SqlDumpInspector()

    def observe(self, chunk: bytes) -> None:
        self._inspector.feed(chunk)

    def inner_checks(self) -> list[Check]:
        complete = self._inspector.complete
        found = "present" if complete else "missing: the dump is incomplete"
        checks = [Check(check="complete", expected="pg_dump's closing line", actual=found, ok=complete)]
        if isinstance(self.entry.facts, DatabaseFacts):
            checks.append(_rows_check(self.entry.facts.tables, self._inspector.tables))
        return checks


def _rows_check(expected: dict[str, int], actual: dict[str, int]) -> Check:
    def summary(tables: dict[str, int]) -> str:
        return f"tables: {len(tables)}, rows: {sum(tables.values())}"

    if expected == actual:
        return Check(check="rows", expected=summary(expected), actual=summary(actual), ok=True)
    differ = [
        f"{t}: {actual.get(t, 'absent')}"
        for t in sorted(set(expected) | set(actual))
        if t not in expected or expected[t] != actual.get(t)
    ]
    return Check(check="rows", expected=summary(expected), actual=_few(differ), ok=False)


class RdbProbe(MemberProbe):
    """redis.rdb: its REDIS header, and the CRC64 in its trailer holds."""

    def __init__(self, entry: ComponentEntry):
        super().__init__(entry)
        self._rdb = RdbCheck(entry.member)
        self._error = ""

    def observe(self, chunk: bytes) -> None:
        if not self._error:
            try:
                self._rdb.feed(chunk)
            except BackupError as exc:
                self._error = str(exc)

    def inner_checks(self) -> list[Check]:
        facts = self.entry.facts
        with_crc = not isinstance(facts, RedisFacts) or facts.crc64_checked
        expected = "CRC64 in the trailer holds" if with_crc else "no CRC64 (rdbchecksum off)"
        info = None
        if not self._error:
            try:
                info = self._rdb.finish()
            except BackupError as exc:
                self._error = str(exc)
        if info is None:  # RdbCheck's advice is for a transfer ("a retry takes a new copy"): left out
            actual = re.sub(r" \([^()]*\)$", "", self._error)
            return [Check(check="crc64", expected=expected, actual=actual, ok=False)]
        actual = "holds" if info.crc64_checked else "no CRC64 (rdbchecksum off)"
        return [Check(check="crc64", expected=expected, actual=actual, ok=info.crc64_checked == with_crc)]


class ArchiveProbe(MemberProbe):
    """config.tar.gz (or config.tar): an archive of its own, read to its end, listing its files."""

    def __init__(self, entry: ComponentEntry, compressed: bool):
        super().__init__(entry)
        self._compressed = compressed
        self._scan: Scan | None = None

    def read(self, stream: BinaryIO) -> None:
        self.found = True
        self._scan = scan_archive(stream, self._compressed)

    def checks(self) -> list[Check]:
        if self._scan is None:
            return [_absent(self.entry, "missing", False)]
        return [
            *checksum_checks(self.entry.content, self._scan.stored),
            readable_check(self._scan.error, self._compressed),
            *_files_checks(self.entry, self._scan.members),
        ]


def _files_checks(entry: ComponentEntry, members: list[str]) -> list[Check]:
    if not isinstance(entry.facts, FilesFacts):
        return []
    return [names_check("files", entry.facts.files, members)]


def _absent(entry: ComponentEntry, actual: str, ok: bool) -> Check:
    where = "storage" if entry.member == entry.stored_in else entry.stored_in
    return Check(check="present", expected=f"{entry.member} in {where}", actual=actual, ok=ok)


def probe_for(component: str, entry: ComponentEntry, compressed: bool) -> MemberProbe:
    if component == "database":
        return SqlProbe(entry)
    if component == "redis":
        return RdbProbe(entry)
    if component == "config":
        return ArchiveProbe(entry, compressed)
    return MemberProbe(entry)


def resolve_backup_id(storage: Storage, prefix: str, requested: str) -> str:
    """Given a backup id or ``latest``, return the backup id. Raise PermanentError for a string
    that is not a backup id (such as one with ``../``), or ``latest`` with no complete backup."""
    if requested == "latest":
        complete = [b for b in backup_sets(storage.list(), prefix) if b.complete]
        if not complete:
            raise PermanentError(f"no complete backup in {storage.describe()}")
        return complete[-1].backup_id
    try:
        parse_backup_id(requested, prefix)
    except ValueError as exc:
        raise PermanentError(f"{exc} (or 'latest')") from None
    return requested


def verify_backup(
    storage: Storage, settings: Settings, backup_id: str, now: datetime | None = None
) -> VerifyReport:
    """Given a backup id or ``latest``, read every file its manifest names once and return the
    report of every check. Raise PermanentError for a bad id or a backup without a manifest."""
    now = now or datetime.now(UTC)
    prefix = settings.backup_name_prefix
    backup_id = resolve_backup_id(storage, prefix, backup_id)
    manifest = load_manifest(storage, backup_id)
    days = settings.backup_logs_retention_days
    retired = days if now - parse_backup_id(backup_id, prefix) > timedelta(days=days) else None
    files = [_manifest_report(manifest, backup_id)]
    components: dict[str, ComponentReport] = {}
    for stored in {f.name: f for f in manifest.files}.values():
        entries = {n: e for n, e in manifest.components.items() if e.stored_in == stored.name}
        report, found = _verify_file(storage, manifest, stored, entries, prefix, retired)
        files.append(report)
        components.update(found)
    for name, entry in manifest.components.items():
        if name not in components:
            checks = [_absent(entry, f"{entry.stored_in} is not among the manifest's files", False)]
            components[name] = _component_report(name, entry, checks)
    ordered = [components[name] for name in manifest.components]
    return VerifyReport(
        backup_id=backup_id, storage=storage.describe(), verified_at=now, files=files, components=ordered
    )


def _manifest_report(manifest: Manifest, backup_id: str) -> FileReport:
    same = manifest.backup_id == backup_id
    check = Check(check="backup id", expected=backup_id, actual=manifest.backup_id, ok=same)
    return FileReport(name=manifest_name(backup_id), checks=[check])


def _component_report(name: str, entry: ComponentEntry, checks: list[Check]) -> ComponentReport:
    return ComponentReport(component=name, member=entry.member, stored_in=entry.stored_in, checks=checks)


def _verify_file(
    storage: Storage,
    manifest: Manifest,
    stored: StoredFile,
    entries: dict[str, ComponentEntry],
    prefix: str,
    retired: int | None,
) -> tuple[FileReport, dict[str, ComponentReport]]:
    """Read one stored file once; return its report and those of ``entries``, the components
    stored in it. ``retired`` is BACKUP_LOGS_RETENTION_DAYS if the backup is older, else None."""
    role = split_object_name(stored.name, prefix)
    if role is None or role[0] != manifest.backup_id:  # never read a name that is not this backup's
        bad = Check(check="name", expected=f"a file of {manifest.backup_id}", actual=stored.name, ok=False)
        unread = {n: _component_report(n, e, [_absent(e, "not read", False)]) for n, e in entries.items()}
        return FileReport(name=stored.name, checks=[bad]), unread
    compressed = manifest.compression == "gzip"
    probes = {e.member: probe_for(n, e, compressed) for n, e in entries.items() if e.member != stored.name}
    whole = {n: e for n, e in entries.items() if e.member == stored.name}  # the logs: the tar stream itself
    try:
        with storage.open_read(stored.name) as stream:
            scan = scan_archive(stream, compressed, probes, content_checksums=bool(whole))
    except FileNotFoundError:
        return _missing_file(stored, entries, retired if role[1] == "logs" else None)
    checks = [*checksum_checks(stored, scan.stored), readable_check(scan.error, compressed)]
    if probes:
        checks.append(names_check("members", list(probes), scan.members))
    found = {
        n: _component_report(n, e, probes[e.member].checks()) for n, e in entries.items() if n not in whole
    }
    for name, entry in whole.items():
        assert scan.content is not None
        content_checks = checksum_checks(entry.content, scan.content) + _files_checks(entry, scan.members)
        found[name] = _component_report(name, entry, content_checks)
    return FileReport(name=stored.name, checks=checks), found


def _missing_file(
    stored: StoredFile, entries: dict[str, ComponentEntry], retired: int | None
) -> tuple[FileReport, dict[str, ComponentReport]]:
    """The report of a stored file that is not in storage: a failure, unless log retention
    (``retired`` days) removed it."""
    ok = retired is not None
    actual = f"removed by log retention (older than {retired} days)" if ok else "missing"
    check = Check(check="present", expected="in storage", actual=actual, ok=ok)
    component_actual = actual if ok else f"{stored.name} is missing"
    components = {n: _component_report(n, e, [_absent(e, component_actual, ok)]) for n, e in entries.items()}
    return FileReport(name=stored.name, checks=[check]), components


def report_rows(report: VerifyReport) -> list[tuple[str, str, str, str, str]]:
    """Return one row per check: file or component, check, expected, actual, OK or MISMATCH."""
    rows = []
    subjects = [(f.name, f.checks) for f in report.files]
    subjects += [
        (c.component if c.member == c.stored_in else f"{c.component} ({c.member})", c.checks)
        for c in report.components
    ]
    for subject, checks in subjects:
        for c in checks:
            rows.append((subject, c.check, c.expected, c.actual, "OK" if c.ok else "MISMATCH"))
    return rows
