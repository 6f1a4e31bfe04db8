"""Local (or mounted network) disk: BACKUP_STORAGE_PATH is a folder."""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from vq_tasks.storage.base import PARTIAL_MARKER, Storage, StorageError, StoredObject
from vq_tasks.storage.location import Destination

WRITE_BUFFER = 1 << 20


class LocalStorage(Storage):
    """Objects are files in one folder; writes go to a hidden partial file renamed on success."""

    provider = "Local"

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def from_destination(cls, destination: Destination) -> LocalStorage:
        return cls(Path(destination.location.container))

    def describe(self) -> str:
        return f"Local:{self.root}"

    def _path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise StorageError(f"invalid object name {name!r}")
        return self.root / name

    @contextlib.contextmanager
    def open_write(self, name: str, retain_until: datetime | None = None) -> Iterator[_FileWriter]:
        """``retain_until``: the file is made read-only (BACKUP_IMMUTABILITY's Local form)."""
        final = self._path(name)
        partial = self.root / f".{name}{PARTIAL_MARKER}{uuid.uuid4().hex[:12]}"
        try:
            with self._translated():
                self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                stream = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)
            try:
                yield _FileWriter(stream, self._translated)
                with self._translated():
                    stream.flush()
                    if retain_until is not None:
                        os.fchmod(stream.fileno(), 0o444)
                    os.fsync(stream.fileno())
                    stream.close()
            finally:
                with contextlib.suppress(OSError):
                    stream.close()  # after an error: drop the buffer, the partial file goes below
            with self._translated():
                os.replace(partial, final)
                _fsync_dir(self.root)
        finally:
            partial.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise _storage_error(exc, self.describe()) from exc

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[BinaryIO]:
        with open(self._path(name), "rb") as stream:
            yield stream

    def stat(self, name: str) -> StoredObject | None:
        try:
            return _stored(name, self._path(name).stat())
        except FileNotFoundError:
            return None

    def list(self) -> list[StoredObject]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in os.scandir(self.root):
            if entry.is_file(follow_symlinks=False):
                found.append(_stored(entry.name, entry.stat(follow_symlinks=False)))
        return found

    def delete(self, name: str) -> bool:
        path = self.root / name if PARTIAL_MARKER in name else self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def lock_problems(self, shortest: timedelta) -> builtins.list[str]:
        """None: a file system has no retention lock, and BACKUP_IMMUTABILITY makes each file
        read-only, which stops tools that respect file modes from overwriting it, not anyone
        with the workers' rights from deleting it (README: Immutable backups)."""
        return []

    def disk_space(self) -> tuple[int, int]:
        """Return (free, capacity) bytes of the file system holding the root (or, before the first
        backup creates it, its nearest existing parent): the space an unprivileged user may use."""
        path = self.root
        while not path.exists() and path != path.parent:
            path = path.parent
        stat = os.statvfs(path)
        return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize


class _FileWriter:
    """A file's write, with OS errors turned into storage errors that name the storage."""

    def __init__(self, stream: BinaryIO, translated: Callable[[], AbstractContextManager[None]]):
        self._stream = stream
        self._translated = translated

    def write(self, data: bytes) -> int:
        with self._translated():
            return self._stream.write(data)


def _stored(name: str, st: os.stat_result) -> StoredObject:
    return StoredObject(name, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(exc: OSError, where: str) -> StorageError:
    """Translate an OS error; a full disk is permanent for this run (retrying will not free space)."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return StorageError(f"{where}: no space left on the backup disk")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"{where}: not writable ({reason}); check the folder's owner and mode")
    return StorageError(f"{where}: {reason}", transient=exc.errno in (errno.EIO, errno.ESTALE))
