"""Composable stream stages: data is pushed through ``write`` from a source to a sink, one chunk at
a time, so memory stays bounded whatever the size of the data. A stage passes every chunk on after
looking at it (hashing, counting, reporting progress); compress.py's stages transform it."""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Protocol

from vq_tasks.manifest import Checksums

CHUNK_SIZE = 1 << 20
HASH_IN_FLIGHT = 4  # chunks handed to a background HashStage and not hashed yet
Buffer = bytes | bytearray | memoryview


class Writer(Protocol):
    def write(self, data: bytes, /) -> object: ...


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Stage:
    """A writer that passes chunks to ``downstream``; ``close`` flushes and closes the chain."""

    def __init__(self, downstream: Writer):
        self.downstream = downstream

    def write(self, data: bytes) -> None:
        self.downstream.write(data)

    def close(self) -> None:
        if isinstance(self.downstream, Stage):
            self.downstream.close()


class HashStage(Stage):
    """Count bytes and compute MD5 and SHA-256 of everything that passes.

    With ``background``, the digests are computed on a thread of their own (hashlib releases the
    GIL), in order, at most HASH_IN_FLIGHT chunks behind: the thread that writes only hands chunks
    on. ``close`` (or ``abort``) ends the thread; the digests are complete once ``close`` returns.
    """

    def __init__(self, downstream: Writer, md5: bool = True, background: bool = False):
        super().__init__(downstream)
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self._sha256 = hashlib.sha256()
        self.size = 0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="hash") if background else None
        self._pending: collections.deque[Future[None]] = collections.deque()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._thread is None:
            self._update(data)
        else:
            if not isinstance(data, bytes):
                data = bytes(data)  # the caller may reuse its buffer once write returns
            self._pending.append(self._thread.submit(self._update, data))
            if len(self._pending) > HASH_IN_FLIGHT:
                self._pending.popleft().result()
        self.downstream.write(data)

    def _update(self, data: bytes) -> None:
        if self._md5 is not None:
            self._md5.update(data)
        self._sha256.update(data)

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self._drain()
        finally:
            self.abort()
        super().close()

    def abort(self) -> None:
        """Stop the hashing thread, if any, without waiting for what is pending (after an error)."""
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)

    @property
    def sha256(self) -> str:
        self._drain()
        return self._sha256.hexdigest()

    def checksums(self) -> Checksums:
        self._drain()
        md5 = self._md5.hexdigest() if self._md5 is not None else ""
        return Checksums(size=self.size, md5=md5, sha256=self._sha256.hexdigest())


class TapStage(Stage):
    """Show every chunk to ``observe`` before passing it on (row counting, format checks)."""

    def __init__(self, downstream: Writer, observe: Callable[[bytes], object]):
        super().__init__(downstream)
        self._observe = observe

    def write(self, data: bytes) -> None:
        self._observe(data)
        self.downstream.write(data)


class ProgressStage(Stage):
    """Call ``report(bytes_so_far)`` at most every ``interval`` seconds, and once at close."""

    def __init__(self, downstream: Writer, report: Callable[[int], object], interval: float = 2.0):
        super().__init__(downstream)
        self._report = report
        self._interval = interval
        self._next = time.monotonic() + interval
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self.downstream.write(data)
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self._interval
            self._report(self.size)

    def close(self) -> None:
        self._report(self.size)
        super().close()


def pump(source: IO[bytes], sink: Writer, chunk_size: int = CHUNK_SIZE) -> int:
    """Copy ``source`` into ``sink`` chunk by chunk; return the number of bytes copied."""
    total = 0
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    while True:
        n = source.readinto(view)  # type: ignore[attr-defined]
        if not n:
            return total
        sink.write(bytes(view[:n]))
        total += n


class Nowhere:
    """A writer that drops what it gets: the end of a chain that only hashes."""

    def write(self, data: bytes) -> None:
        pass
