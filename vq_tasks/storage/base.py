"""The storage contract every provider keeps: streamed writes that commit atomically, streamed
reads, stat, list and delete. An object is visible to ``list`` and ``stat`` only once its writer
has closed without error, so a crash never leaves a complete-looking object behind."""

from __future__ import annotations

import abc
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, ClassVar

from vq_tasks.errors import BackupError
from vq_tasks.streams import CHUNK_SIZE, Writer


class StorageError(BackupError):
    """A storage operation failed; ``transient`` says whether a retry may help."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class StoredObject:
    """One object in storage: its name relative to the storage path, size and modification time."""

    name: str
    size: int
    modified: datetime


class Storage(abc.ABC):
    """A place where backups are kept, addressed by object names relative to one root."""

    provider: ClassVar[str]

    @abc.abstractmethod
    def open_write(self, name: str) -> AbstractContextManager[Writer]:
        """Return a writer for ``name``; the object appears only when the block exits cleanly."""

    @abc.abstractmethod
    def open_read(self, name: str) -> AbstractContextManager[BinaryIO]:
        """Return a binary stream of ``name``. Raise FileNotFoundError if it does not exist."""

    @abc.abstractmethod
    def stat(self, name: str) -> StoredObject | None:
        """Return the object called ``name``, or None if there is none."""

    @abc.abstractmethod
    def list(self) -> list[StoredObject]:
        """Return every committed object under the root, in no particular order."""

    @abc.abstractmethod
    def delete(self, name: str) -> bool:
        """Delete ``name``; return False if it was already gone (deleting twice is harmless)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Return where this storage is, for messages (never with credentials)."""

    def read_bytes(self, name: str, limit: int = 16 << 20) -> bytes:
        """Return the whole of a small object such as a manifest; refuse one over ``limit``."""
        data = bytearray()
        with self.open_read(name) as stream:  # in chunks: read(limit) would set aside the whole limit
            while len(data) <= limit and (chunk := stream.read(CHUNK_SIZE)):
                data += chunk
        if len(data) > limit:
            raise StorageError(f"{name} in {self.describe()} is larger than {limit} bytes")
        return bytes(data)
