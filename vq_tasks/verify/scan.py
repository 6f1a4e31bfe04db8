"""Reading one stored archive to its end while checking it: the raw bytes' checksums, the tar
stream's members, and for each member its checksums and what its kind allows (a SQL dump's closing
line and row counts, an RDB's CRC64, an inner archive's file list). Used by ``verify``.
"""

from __future__ import annotations

import contextlib
import re
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import zstandard
from pydantic import BaseModel

from vq_tasks.clients.rdb import RdbCheck
from vq_tasks.clients.sql_dump import SqlDumpInspector
from vq_tasks.crypto.encryption import KeyUnavailable
from vq_tasks.errors import BackupError
from vq_tasks.manifest import (
    Checksums,
    ComponentEntry,
    DatabaseFacts,
    FilesFacts,
    GlobalsFacts,
    RedisFacts,
    StoredFile,
)
from vq_tasks.streams.readers import DamagedStream, HashingReader, decompressing, forget_members
from vq_tasks.streams.stages import CHUNK_SIZE, HashStage, Nowhere, Readable

BLOCK = tarfile.BLOCKSIZE
TAR_BUFSIZE = 64 * 1024  # tarfile's reads; it reads less than this ahead of the member it is on
WINDOW = 4 * TAR_BUFSIZE  # kept behind the read position, to see what follows the tar's end
SHOWN = 5  # names shown when lists of files differ


class Check(BaseModel):
    check: str
    expected: str
    actual: str
    ok: bool
    checked: bool = True  # False: could not be checked (an encrypted file without its key); never ok


@dataclass
class Scan:
    """What reading one (compressed) tar stream found: checksums of its raw bytes and, if asked
    for, of the tar stream; the names of its members; why it could not be read to the end."""

    stored: Checksums
    content: Checksums | None
    members: list[str]
    error: str | None
    unchecked: str | None = None  # why the contents of an encrypted file could not be read


# given the reader of a stored file's raw bytes, return the reader of its plaintext (decrypting);
# raise KeyUnavailable when the key is missing or wrong
Decrypt = Callable[[HashingReader], Readable]


MAX_NAMES = 10_000  # member names kept of a tar whose expected names are not known (the bundle)

# what reading a damaged stream raises: our own, tarfile's, zlib's, zstd's, and storage read errors
READ_ERRORS = (
    DamagedStream,
    tarfile.TarError,
    zlib.error,
    zstandard.ZstdError,
    OSError,
    EOFError,
    ValueError,
    BackupError,
)


def scan_archive(
    source: BinaryIO,
    compression: str,
    probes: dict[str, MemberProbe] | None = None,
    content_checksums: bool = False,
    decrypt: Decrypt | None = None,
    max_names: int = MAX_NAMES,
) -> Scan:
    """Read ``source``, a tar stream (compressed as ``compression`` says, encrypted if ``decrypt``
    is given), to its very end, handing each member named in ``probes`` to its probe; return what
    was found, with the checksums of the tar stream itself if ``content_checksums``. A stream that
    cannot be read to the end is reported in the result's ``error``, one whose key is missing or
    wrong in ``unchecked``; the raw bytes are counted all the same. Past ``max_names`` members
    the names are not kept: a line saying so takes their place (a forged archive of millions of
    entries must not fill the memory), which no manifest lists."""
    compressed = compression != "none"
    with contextlib.ExitStack() as readers:  # each hashes on a thread of its own, ended on the way out
        raw = readers.enter_context(
            HashingReader(source, keep=0 if compressed or decrypt else WINDOW, background=True)
        )
        members: list[str] = []
        error = unchecked = None
        content = None
        try:
            plain = raw
            if decrypt is not None:
                hashed = content_checksums and not compressed
                reader = HashingReader(decrypt(raw), 0 if compressed else WINDOW, hashed, background=True)
                plain = readers.enter_context(reader)
            if compressed:
                reader = HashingReader(decompressing(plain, compression), WINDOW, content_checksums, True)
                content = readers.enter_context(reader)
            else:
                content = plain
            end = _read_tar(content, probes or {}, members, max_names)
            _check_end(content, end)
        except KeyUnavailable as exc:
            unchecked = exc.reason
        except READ_ERRORS as exc:
            error = _reason(exc)
        try:
            _drain(raw)
        except READ_ERRORS as exc:
            error = error or _reason(exc)
        stored = raw.checksums()
        assert stored is not None
        wanted = content_checksums and content is not None and not unchecked
        found = content.checksums() if wanted and content is not None else None
    return Scan(stored, found, members, error, unchecked)


def _read_tar(
    content: HashingReader, probes: dict[str, MemberProbe], members: list[str], max_names: int
) -> int:
    """Read the tar's members, append their names (the first ``max_names``), feed the probes;
    return the tar's end offset."""
    with tarfile.open(  # type: ignore[call-overload]  # stream mode only calls read()
        fileobj=content, mode="r|", bufsize=TAR_BUFSIZE
    ) as tar:
        while (info := tar.next()) is not None:
            forget_members(tar)
            if len(members) < max_names:
                members.append(info.name)
            elif len(members) == max_names:
                members.append(f"(more than {max_names} entries, the rest not listed)")
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


def readable_check(error: str | None, compression: str, encrypted: bool = False) -> Check:
    what = f"{compression} and tar read to the end" if compression != "none" else "tar read to the end"
    what = f"age decrypted, {what}" if encrypted else what
    return Check(check="readable", expected=what, actual=error or "read to the end", ok=error is None)


def unchecked_check(check: str, expected: str, reason: str) -> Check:
    """Return a check that could not be made: never OK, and shown as NOT CHECKED, not MISMATCH."""
    return Check(check=check, expected=expected, actual=f"not checked: {reason}", ok=False, checked=False)


def names_check(check: str, expected: list[str], actual: list[str]) -> Check:
    """Return a check that ``actual`` lists the same names as ``expected``, in the same order."""
    if expected == actual:
        return Check(
            check=check, expected=f"entries: {len(expected)}", actual=f"entries: {len(actual)}", ok=True
        )
    expected_names, actual_names = set(expected), set(actual)
    missing = [n for n in expected if n not in actual_names]
    extra = [n for n in actual if n not in expected_names]
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
            return [absent_check(self.entry, "missing", False)]
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
    """config.tar.gz (.tar.zst, .tar): an archive of its own, read to its end, listing its files."""

    def __init__(self, entry: ComponentEntry, compression: str):
        super().__init__(entry)
        self._compression = compression
        self._scan: Scan | None = None

    def read(self, stream: BinaryIO) -> None:
        self.found = True
        listed = self.entry.facts.files if isinstance(self.entry.facts, FilesFacts) else []
        self._scan = scan_archive(stream, self._compression, max_names=len(listed) + 1)

    def checks(self) -> list[Check]:
        if self._scan is None:
            return [absent_check(self.entry, "missing", False)]
        return [
            *checksum_checks(self.entry.content, self._scan.stored),
            readable_check(self._scan.error, self._compression),
            *files_checks(self.entry, self._scan.members),
        ]


def files_checks(entry: ComponentEntry, members: list[str]) -> list[Check]:
    if not isinstance(entry.facts, FilesFacts):
        return []
    return [names_check("files", entry.facts.files, members)]


def absent_check(entry: ComponentEntry, actual: str, ok: bool) -> Check:
    where = "storage" if entry.member == entry.stored_in else entry.stored_in
    return Check(check="present", expected=f"{entry.member} in {where}", actual=actual, ok=ok)


class GlobalsProbe(MemberProbe):
    """globals.sql, the database component's second member: its checksums are the manifest's."""

    def __init__(self, entry: ComponentEntry, facts: GlobalsFacts):
        super().__init__(entry)
        self.facts = facts

    def checks(self) -> list[Check]:
        if not self.found:
            return [absent_check(self.entry, f"{self.facts.member} missing", False)]
        checks = checksum_checks(self.facts.content, self._hash.checksums())
        return [c.model_copy(update={"check": f"{self.facts.member} {c.check}"}) for c in checks]


def member_names(entry: ComponentEntry) -> list[str]:
    """Return the bundle members of a component, in the bundle's order: its own, then globals.sql
    for a database that has it."""
    facts = entry.facts
    extra = [facts.globals.member] if isinstance(facts, DatabaseFacts) and facts.globals else []
    return [entry.member, *extra]


def member_probes(component: str, entry: ComponentEntry, compression: str) -> dict[str, MemberProbe]:
    """Return the probes of a component's bundle members, by member name, in the bundle's order."""
    probes = {entry.member: probe_for(component, entry, compression)}
    facts = entry.facts
    if isinstance(facts, DatabaseFacts) and facts.globals:
        probes[facts.globals.member] = GlobalsProbe(entry, facts.globals)
    return probes


def probe_for(component: str, entry: ComponentEntry, compression: str) -> MemberProbe:
    if component == "database":
        return SqlProbe(entry)
    if component == "redis":
        return RdbProbe(entry)
    if component == "config":
        return ArchiveProbe(entry, compression)
    return MemberProbe(entry)
