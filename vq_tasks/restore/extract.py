"""Take components of a stored backup out of storage, checking every byte on the way.

The bundle is read once, as a stream: storage -> HashingReader (its raw bytes, compared with the
manifest's entry for the stored file) -> GunzipReader or UnzstdReader when compressed -> tarfile in
stream mode. Both digests (of the raw bytes, of each member) are computed on threads of their own,
beside the decompression: on two cores that takes a third off a restore's read.
Each wanted member is written to a file whose name the caller chose (never the member's own name),
hashed as it is written and compared with the manifest's checksums of that component; every other
member is skipped. The logs archive is copied as stored, its raw bytes and its tar stream both
checked. Files are created new (mode 600); when anything fails, those written are removed.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import time
import uuid
import zlib
from pathlib import Path
from typing import BinaryIO, NamedTuple

import zstandard

from vq_tasks.crypto import encryption
from vq_tasks.crypto.age import X25519Identity
from vq_tasks.errors import PermanentError
from vq_tasks.logs import Say, human_size
from vq_tasks.manifest import (
    GLOBALS_MEMBER,
    Checksums,
    Component,
    ComponentEntry,
    DatabaseFacts,
    GlobalsFacts,
    Manifest,
    StoredFile,
    is_encrypted,
    plain_name,
)
from vq_tasks.settings import Settings, get_settings
from vq_tasks.storage.base import Storage
from vq_tasks.streams.readers import (
    DamagedStream,
    GunzipReader,
    HashingReader,
    UnzstdReader,
    decompressing,
    forget_members,
)
from vq_tasks.streams.stages import CHUNK_SIZE, HashStage

TAR_BUFSIZE = 64 * 1024
PROGRESS_INTERVAL = 5.0
READ_ERRORS = (DamagedStream, tarfile.TarError, zlib.error, zstandard.ZstdError, EOFError)


class Wanted(NamedTuple):
    """A bundle member to write: what it is (for messages), its checksums, the file it goes to."""

    what: str
    content: Checksums
    path: Path


def _quiet(line: str) -> None:
    """Say nothing."""


def local_name(component: str, entry: ComponentEntry) -> str:
    """Given a component and its manifest entry, return the file name it gets in a work folder:
    ``database.sql``, ``redis.rdb``, ``config.tar[.gz|.zst]`` or ``logs.tar[.gz|.zst]``."""
    fixed = {"database": "database.sql", "redis": "redis.rdb"}
    if component in fixed:
        return fixed[component]
    suffix = next((s for s in (".tar.gz", ".tar.zst") if entry.member.endswith(s)), ".tar")
    return f"{'config' if component == 'config' else 'logs'}{suffix}"


def component_named(manifest: Manifest, name: str) -> Component:
    """Given a component (``database``) or its member's name (``database.sql``, the logs
    archive's name), return the component. Raise PermanentError naming the choices."""
    for component, entry in manifest.components.items():
        if name in (component, entry.member):
            return component
    choices = ", ".join(f"{c} ({e.member})" for c, e in manifest.components.items())
    raise PermanentError(f"backup {manifest.backup_id} has no component {name!r}; it has: {choices}")


def globals_file(sql_path: Path) -> Path:
    """Where a database component extracted to ``sql_path`` has its globals.sql: beside it."""
    return sql_path.with_name(f"{sql_path.stem}.{GLOBALS_MEMBER}")


def extra_files(manifest: Manifest, targets: dict[Component, Path]) -> list[Path]:
    """Return the files extract_to writes beside ``targets``: the database's globals.sql, if it has one."""
    database = manifest.components.get("database")
    if "database" not in targets or database is None or not _globals(database):
        return []
    return [globals_file(targets["database"])]


def _globals(entry: ComponentEntry) -> GlobalsFacts | None:
    return entry.facts.globals if isinstance(entry.facts, DatabaseFacts) else None


def _members(component: Component, entry: ComponentEntry, path: Path, roles: bool) -> dict[str, Wanted]:
    """Return the bundle members of a component to write, by name: its own to ``path``, and with
    ``roles`` the database's globals.sql beside it."""
    members = {entry.member: Wanted(f"{component} ({entry.member})", entry.content, path)}
    facts = _globals(entry) if roles else None
    if facts is not None:
        members[facts.member] = Wanted(f"{component} ({facts.member})", facts.content, globals_file(path))
    return members


def extract_to(
    storage: Storage,
    manifest: Manifest,
    targets: dict[Component, Path],
    say: Say = _quiet,
    settings: Settings | None = None,
    roles: bool = True,
) -> None:
    """Given components and the new file each goes to, write each one's content there after
    checking it against the manifest, reading each stored file once (an encrypted one is
    decrypted on the way with the keys of ``settings``' BACKUP_ENCRYPTION_IDENTITY_FILE; None:
    the process's settings). Raise PermanentError (the files written removed) when a file is
    missing or unreadable, a checksum differs, or the key to decrypt is missing or wrong (then
    before anything is written). With ``roles``, the database's globals.sql, if it has one, goes
    beside its file (globals_file)."""
    entries = {c: manifest.components[c] for c in targets}
    try:
        opener = _Opener(manifest, settings)
        for stored_name in dict.fromkeys(e.stored_in for e in entries.values()):
            stored = _stored_file(manifest, stored_name)
            group = {c: (e, targets[c]) for c, e in entries.items() if e.stored_in == stored_name}
            compression = manifest.compression
            if any(e.member == plain_name(stored_name) for e, _ in group.values()):
                entry, path = next(iter(group.values()))
                _copy_whole(storage, stored, compression, entry, path, say, opener)
            else:
                wanted = {m: w for c, (e, p) in group.items() for m, w in _members(c, e, p, roles).items()}
                _read_bundle(storage, stored, compression, wanted, say, opener)
    except BaseException as exc:
        for path in [*targets.values(), *(extra_files(manifest, targets) if roles else [])]:
            path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            where = f" ({exc.filename})" if exc.filename else ""
            raise PermanentError(f"extracting {manifest.backup_id}: {exc.strerror or exc}{where}") from None
        raise


def extract_one(
    storage: Storage,
    manifest: Manifest,
    component: Component,
    path: Path,
    say: Say = _quiet,
    settings: Settings | None = None,
    roles: bool = False,
) -> None:
    """Write one component to ``path``, a new file, after checking its checksums (decrypting as
    extract_to does); it appears only once checked. With ``roles``, write the database's
    globals.sql instead. Raise PermanentError if ``path`` exists or a check fails."""
    if path.exists() or path.is_symlink():
        raise PermanentError(f"{path} exists; refusing to overwrite it")
    partial = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        if roles:
            _extract_globals(storage, manifest, partial, say, settings)
        else:
            extract_to(storage, manifest, {component: partial}, say, settings, roles=False)
        try:
            os.link(partial, path)  # fails, rather than overwrite, if path appeared meanwhile
        except FileExistsError:
            raise PermanentError(f"{path} exists; refusing to overwrite it") from None
    finally:
        partial.unlink(missing_ok=True)


def _extract_globals(
    storage: Storage, manifest: Manifest, path: Path, say: Say, settings: Settings | None
) -> None:
    """Write the database's globals.sql alone to ``path``, checked. Raise PermanentError if the
    backup has none (it was made before roles were backed up) or a check fails."""
    entry = manifest.components.get("database")
    facts = _globals(entry) if entry else None
    if entry is None or facts is None:
        raise PermanentError(f"backup {manifest.backup_id} has no {GLOBALS_MEMBER}: it holds no roles")
    wanted: dict[str, Wanted] = {facts.member: Wanted(f"database ({facts.member})", facts.content, path)}
    try:
        stored = _stored_file(manifest, entry.stored_in)
        _read_bundle(storage, stored, manifest.compression, wanted, say, _Opener(manifest, settings))
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _stored_file(manifest: Manifest, name: str) -> StoredFile:
    """Return the manifest's entry of the stored file ``name``. Raise PermanentError if it has none."""
    stored = next((f for f in manifest.files if f.name == name), None)
    if stored is None:
        raise PermanentError(f"{name} is not among the files of {manifest.backup_id}")
    return stored


def _opened(storage: Storage, name: str) -> contextlib.AbstractContextManager[BinaryIO]:
    """Open a stored file. Raise PermanentError if it is not in storage."""
    if storage.stat(name) is None:
        raise PermanentError(
            f"{name} is missing from {storage.describe()} (a logs archive goes after "
            "BACKUP_LOGS_RETENTION_DAYS)"
        )
    return storage.open_read(name)


def _create(path: Path) -> BinaryIO:
    """Create ``path`` as a new file, readable by its owner only."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


class _Opener:
    """Opens the plaintext of stored files: as is, or decrypted with the identities of
    BACKUP_ENCRYPTION_IDENTITY_FILE (read once, when the first encrypted file is opened)."""

    def __init__(self, manifest: Manifest, settings: Settings | None):
        self._manifest, self._settings = manifest, settings
        self._identities: list[X25519Identity] | None = None
        self._loaded = False

    def plaintext(self, raw: HashingReader, stored: StoredFile) -> HashingReader:
        """Return the reader of the plaintext of ``raw``, the stored file ``stored``: ``raw``
        itself unless it is encrypted. Raise PermanentError if the key is missing or wrong, or
        the file is not a readable age file."""
        if not is_encrypted(stored.name):
            return raw
        if not self._loaded:
            self._identities = encryption.identities_of(self._settings or get_settings())
            self._loaded = True
        reader = encryption.decrypting(raw, stored.name, self._identities, self._manifest.encryption)
        return HashingReader(reader, hashed=False)


class _Source:
    """A stored file's stream that reports progress."""

    def __init__(self, stream: BinaryIO, stored: StoredFile, say: Say):
        self._stream, self._stored, self._say = stream, stored, say
        self._read = 0
        self._next = time.monotonic() + PROGRESS_INTERVAL

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._read += len(data)
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + PROGRESS_INTERVAL
            done, whole = human_size(self._read), human_size(self._stored.size)
            self._say(f"  {self._stored.name}: {done} of {whole} read")
        return data


class _Tee:
    """A reader that writes what is read from ``source`` to ``out`` as well."""

    def __init__(self, source: HashingReader, out: BinaryIO):
        self._source, self._out = source, out

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._out.write(data)
        return data


def _drain(reader: HashingReader | GunzipReader | UnzstdReader) -> None:
    while reader.read(CHUNK_SIZE):
        pass


def _compare(what: str, expected: Checksums | StoredFile, actual: Checksums | None) -> None:
    """Raise PermanentError naming the first of size, MD5 and SHA-256 that differs."""
    assert actual is not None
    for name in ("size", "md5", "sha256"):
        want, got = getattr(expected, name), getattr(actual, name)
        if want != got:
            raise PermanentError(f"{what}: {name} is {got}, the manifest says {want}; nothing was restored")


def _read_bundle(
    storage: Storage,
    stored: StoredFile,
    compression: str,
    wanted: dict[str, Wanted],
    say: Say,
    opener: _Opener,
) -> None:
    """Read the bundle once; write each wanted member (by member name) to its file, checked."""
    say(f"reading {stored.name} ({human_size(stored.size)}) from {storage.describe()}")
    found: set[str] = set()
    with (
        _opened(storage, stored.name) as stream,
        HashingReader(_Source(stream, stored, say), background=True) as raw,
    ):
        plain = opener.plaintext(raw, stored)
        content = decompressing(plain, compression)
        try:
            with tarfile.open(  # type: ignore[call-overload]  # stream mode only calls read()
                fileobj=content, mode="r|", bufsize=TAR_BUFSIZE
            ) as tar:
                while (info := tar.next()) is not None:
                    forget_members(tar)
                    if info.name in wanted:
                        _write_member(tar, info, wanted[info.name], found, say)
            _drain(content)
            _drain(plain)
            _drain(raw)
        except READ_ERRORS as exc:
            raise PermanentError(f"{stored.name} cannot be read to its end: {exc}") from None
        checks = raw.checksums()
    missing = [member for member in wanted if member not in found]
    if missing:
        raise PermanentError(f"{stored.name} lacks {', '.join(missing)}; nothing was restored")
    _compare(stored.name, stored, checks)


def _write_member(
    tar: tarfile.TarFile, info: tarfile.TarInfo, want: Wanted, found: set[str], say: Say
) -> None:
    """Write one member of the bundle to its file, hashed on the way, and check it."""
    what, content, path = want
    if info.name in found or not info.isfile():
        problem = "appears twice" if info.name in found else "is not a regular file"
        raise PermanentError(f"the bundle's {info.name} {problem}; nothing was restored")
    found.add(info.name)
    stream = tar.extractfile(info)
    assert stream is not None  # a regular file always has a stream
    with _create(path) as out:
        hashed = HashStage(out, background=True)  # digests beside the decompression
        try:
            while chunk := stream.read(CHUNK_SIZE):
                hashed.write(chunk)
            checks = hashed.checksums()
        finally:
            hashed.abort()
    _compare(what, content, checks)
    say(f"  {what}: {human_size(checks.size)}, checksums OK")


def _copy_whole(
    storage: Storage,
    stored: StoredFile,
    compression: str,
    entry: ComponentEntry,
    path: Path,
    say: Say,
    opener: _Opener,
) -> None:
    """Copy a stored file that is a component of its own (the logs archive) as stored, decrypted
    if it is encrypted; check its raw bytes and its tar stream."""
    say(f"reading {stored.name} ({human_size(stored.size)}) from {storage.describe()}")
    with _opened(storage, stored.name) as stream:
        raw = HashingReader(_Source(stream, stored, say))
        plain = opener.plaintext(raw, stored)  # the key is checked before the file is created
        with _create(path) as out:
            compressed = compression != "none"
            copied = HashingReader(_Tee(plain, out), hashed=not compressed)
            content = HashingReader(decompressing(copied, compression)) if compressed else copied
            try:
                _drain(content)
                _drain(copied)
                _drain(raw)
            except READ_ERRORS as exc:
                raise PermanentError(f"{stored.name} cannot be read to its end: {exc}") from None
    _compare(stored.name, stored, raw.checksums())
    _compare(f"{entry.member} (its tar stream)", entry.content, content.checksums())
    say(f"  {entry.member}: {human_size(stored.size)}, checksums OK")
