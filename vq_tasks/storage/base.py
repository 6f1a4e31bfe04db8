"""The storage contract every provider keeps: streamed writes that commit atomically and are
checked against the provider's own integrity data, streamed reads, stat, list, delete and usage.
An object is visible to ``list`` and ``stat`` only once its writer has closed without error, so a
crash never leaves a complete-looking object behind. (Cloud stores check some checksums only
after they commit: an object that fails that check is deleted again before ``open_write`` raises.
Whole backups are guarded by the manifest, written last.)"""

from __future__ import annotations

import abc
import builtins
import io
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import BinaryIO, ClassVar

from vq_tasks.errors import BackupError
from vq_tasks.streams.stages import CHUNK_SIZE, Writer

# a provider that writes an object under a temporary name first (Local: .<name>.partial-<random>)
# puts this in the name, so that a listing shows such debris as what it is
PARTIAL_MARKER = ".partial-"


class StorageError(BackupError):
    """A storage operation failed; ``transient`` says whether a retry may help."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class ObjectLocked(StorageError):
    """A delete the provider refused because the object is under a retention lock, ``until`` the
    lock's end where the provider tells it. Not a failure of a prune: the object goes later."""

    def __init__(self, message: str, until: datetime | None = None):
        super().__init__(message)
        self.until = until


@dataclass(frozen=True)
class StoredObject:
    """One object in storage: its name relative to the storage path, size and modification time.
    ``tampered`` says what happened to it after the backup was committed (on a store that keeps
    versions: hidden by a delete marker, or overwritten), when the object listed is the version
    that was committed rather than the current one."""

    name: str
    size: int
    modified: datetime
    tampered: str | None = None


@dataclass(frozen=True)
class ObjectVersion:
    """One version of an object, or a delete marker, on a store that keeps versions."""

    name: str
    version_id: str
    modified: datetime
    size: int
    latest: bool
    delete_marker: bool


@dataclass(frozen=True)
class Usage:
    """How much a storage path holds: the number of objects and their total size in bytes."""

    objects: int
    size: int


class Storage(abc.ABC):
    """A place where backups are kept, addressed by flat object names relative to one root."""

    provider: ClassVar[str]
    keeps_versions: ClassVar[bool] = False  # True: ``list_versions`` and ``open_read_version`` exist
    can_lock: ClassVar[bool] = False  # True: ``retention`` tells an object's lock (Local's read-only is none)

    @abc.abstractmethod
    def open_write(self, name: str, retain_until: datetime | None = None) -> AbstractContextManager[Writer]:
        """Return a writer for ``name``. The object appears only when the block exits cleanly and
        the provider's own checksums of what it stored match what was written; otherwise nothing
        is committed. Raise StorageError on a mismatch (permanent) or an unreachable store.
        ``retain_until``: lock the object until then by the provider's own means, in the
        destination's ``lock_mode`` (given only when BACKUP_IMMUTABILITY is on)."""

    @abc.abstractmethod
    def open_read(self, name: str) -> AbstractContextManager[BinaryIO]:
        """Return a binary stream of ``name`` (``read`` and ``readinto``). Raise FileNotFoundError
        if it does not exist."""

    @abc.abstractmethod
    def stat(self, name: str) -> StoredObject | None:
        """Return the object called ``name``, or None if there is none."""

    @abc.abstractmethod
    def list(self) -> list[StoredObject]:
        """Return every committed object directly under the root, in no particular order."""

    @abc.abstractmethod
    def delete(self, name: str) -> bool:
        """Delete ``name``; return False if it was already gone (deleting twice is harmless)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Return where this storage is, for messages (never with credentials)."""

    def retention(self, name: str, version_id: str | None = None) -> datetime | None:
        """Return until when the stored object ``name`` (or that version of it) is locked against
        deletion and overwriting, or None when it is not locked (or the provider has no locks)."""
        return None

    def lock_problems(self, shortest: timedelta) -> builtins.list[str]:
        """Return why this destination cannot keep BACKUP_IMMUTABILITY's locks (the bucket or
        container lacks the feature, or it locks every object longer than ``shortest``, the
        shortest time retention keeps an object, so prune could never delete in time); empty
        when it can."""
        return [
            f"{self.describe()}: {self.provider} storage cannot lock objects; turn BACKUP_IMMUTABILITY off"
        ]

    def usage(self) -> Usage:
        """Return the number and total size of the objects under the root."""
        objects = self.list()
        return Usage(len(objects), sum(o.size for o in objects))

    def disk_space(self) -> tuple[int, int] | None:
        """Return (free, capacity) bytes of the file system this storage writes to, or None for a
        provider with no file system of ours (a cloud store: its limit is a quota, if any)."""
        return None

    def abort_stale_uploads(self, started_before: datetime) -> builtins.list[str]:
        """Abort uploads that never completed and began before ``started_before``; return their
        names. Providers whose unfinished uploads expire by themselves keep this default."""
        return []

    def read_bytes(self, name: str, limit: int = 16 << 20) -> bytes:
        """Return the whole of a small object such as a manifest; refuse one over ``limit``."""
        data = bytearray()
        with self.open_read(name) as stream:  # in chunks: read(limit) would set aside the whole limit
            while len(data) <= limit and (chunk := stream.read(CHUNK_SIZE)):
                data += chunk
        if len(data) > limit:
            raise StorageError(f"{name} in {self.describe()} is larger than {limit} bytes")
        return bytes(data)


class _ChunkSource(io.RawIOBase):
    """A raw stream over an iterator of byte chunks, with errors translated on the way."""

    def __init__(self, chunks: Iterator[bytes], translate: Callable[[Exception], Exception]):
        self._chunks = chunks
        self._translate = translate
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            try:
                chunk = next(self._chunks, None)
            except Exception as exc:
                raise self._translate(exc) from exc
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def chunk_reader(chunks: Iterator[bytes], translate: Callable[[Exception], Exception]) -> BinaryIO:
    """Given an iterator of downloaded chunks, return a buffered binary stream of them; an error
    raised while iterating is passed through ``translate`` (to a StorageError) first."""
    return io.BufferedReader(_ChunkSource(chunks, translate), buffer_size=CHUNK_SIZE)
