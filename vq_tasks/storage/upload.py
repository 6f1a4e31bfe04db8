"""Uploads in parts, shared by the cloud providers (the idea of Barman's cloud base class): this
module owns buffering, part numbering, parallel sending with bounded memory, whole-object
checksums and clean-up after a failure; each provider implements five small primitives and declares
its limits.

Memory per upload is at most ``(concurrency + 2)`` parts: the one being filled, the one being cut,
and those in flight. Parts start at ``part_size`` and double after every fifth of the provider's
part limit, so an object of any size the provider accepts fits without knowing its size in advance
(S3 with 8 MiB parts: 16 GiB in the first 2000 parts, about 480 GiB in all).
"""

from __future__ import annotations

import abc
import base64
import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from vq_tasks.storage.base import Storage, StorageError

logger = logging.getLogger(__name__)
T = TypeVar("T")
MIB = 1 << 20


@dataclass(frozen=True)
class Part:
    """One part of an upload: its 1-based number, its bytes and their MD5 digest."""

    number: int
    data: bytes
    md5: bytes
    last: bool

    @property
    def md5_base64(self) -> str:
        return base64.b64encode(self.md5).decode()


@dataclass
class UploadSums:
    """What was written: size, MD5 and (where the provider wants it) CRC32C of the whole object,
    and each part's MD5 digest."""

    size: int
    md5: bytes
    crc32c: int | None = None
    part_md5s: list[bytes] = field(default_factory=list)

    @property
    def md5_base64(self) -> str:
        return base64.b64encode(self.md5).decode()

    @property
    def crc32c_base64(self) -> str:
        if self.crc32c is None:
            raise ValueError("no CRC32C was computed for this upload")
        return base64.b64encode(self.crc32c.to_bytes(4, "big")).decode()


def part_digest(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


class PartedStorage(Storage):
    """A storage whose writes are uploaded in parts. Subclasses set the limits and implement
    ``_put_whole``, ``_begin``, ``_send_part``, ``_complete`` and ``_abort``."""

    max_parts: ClassVar[int]
    min_part_size: ClassVar[int]
    part_multiple: ClassVar[int] = 1  # GCS chunks must be multiples of 256 KiB
    parallel_parts: ClassVar[bool] = True  # False: parts are sent one after another, in order
    wants_crc32c: ClassVar[bool] = False  # GCS reports CRC32C; computed only where it is checked

    def __init__(self, *, part_size: int = 8 * MIB, concurrency: int = 4):
        size = max(part_size, self.min_part_size)
        self.part_size = size - size % self.part_multiple
        self.concurrency = concurrency if self.parallel_parts else 1

    @contextlib.contextmanager
    def open_write(self, name: str, retain_until: datetime | None = None) -> Iterator[PartWriter]:
        self._check_name(name)
        writer = PartWriter(self, name, retain_until)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        writer.finish()

    def _check_name(self, name: str) -> None:
        if not name or "/" in name or name.startswith(".") or name in {"..", "."}:
            raise StorageError(f"invalid object name {name!r}")

    def part_size_for(self, number: int) -> int:
        """Return the size of part ``number``: doubled after every fifth of the part limit."""
        return self.part_size << ((number - 1) // max(1, self.max_parts // 5))

    @abc.abstractmethod
    def _put_whole(self, name: str, data: bytes, sums: UploadSums, retain_until: datetime | None) -> None:
        """Store a small object in one request, locked until ``retain_until`` if given, and check
        the provider's checksums of it."""

    @abc.abstractmethod
    def _begin(self, name: str, retain_until: datetime | None) -> Any:
        """Start a multipart upload of ``name`` whose object is locked until ``retain_until`` if
        given; return what later calls need to continue it."""

    @abc.abstractmethod
    def _send_part(self, upload: Any, part: Part) -> Any:
        """Send one part; return its receipt (what ``_complete`` needs of it)."""

    @abc.abstractmethod
    def _complete(self, upload: Any, receipts: list[Any], sums: UploadSums) -> None:
        """Commit the parts, in number order, as the object; check the provider's checksums."""

    @abc.abstractmethod
    def _abort(self, upload: Any) -> None:
        """Throw away an unfinished upload, so that nothing of it is visible or billed."""

    def mismatch(self, name: str, what: str, ours: str, theirs: str) -> StorageError:
        """Return the (permanent) error for a checksum the provider reports differently."""
        return StorageError(
            f"{self.describe()}/{name}: the stored object's {what} is {theirs}, but {ours} was sent; "
            "the upload was corrupted on the way or by the store, so it is not accepted"
        )


class PartWriter:
    """The writer ``PartedStorage.open_write`` yields: cuts parts and sends them on a thread pool."""

    def __init__(self, storage: PartedStorage, name: str, retain_until: datetime | None = None):
        self._storage = storage
        self._name = name
        self._retain_until = retain_until
        self._buffer = bytearray()
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._crc32c = _crc32c() if storage.wants_crc32c else None
        self._size = 0
        self._upload: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: collections.deque[Future[tuple[Any, bytes]]] = collections.deque()
        self._receipts: list[tuple[Any, bytes]] = []
        self._parts_cut = 0

    def write(self, data: bytes) -> None:
        self._md5.update(data)
        if self._crc32c is not None:
            self._crc32c.update(data)
        self._size += len(data)
        self._buffer += data
        # strictly more than a part: the last part is always sent by finish(), flagged as last
        while len(self._buffer) > (size := self._storage.part_size_for(self._parts_cut + 1)):
            with memoryview(self._buffer) as view:
                part = bytes(view[:size])  # one copy (a bytearray slice would make two)
            del self._buffer[:size]
            self._submit(part, last=False)

    def _submit(self, data: bytes, last: bool) -> None:
        self._parts_cut += 1
        if self._parts_cut > self._storage.max_parts:
            raise StorageError(
                f"{self._storage.describe()}/{self._name}: more than {self._storage.max_parts} parts; "
                "raise BACKUP_UPLOAD_PART_SIZE_MB"
            )
        if self._upload is None:
            self._upload = self._storage._begin(self._name, self._retain_until)
            self._pool = ThreadPoolExecutor(self._storage.concurrency, thread_name_prefix="upload")
        while len(self._in_flight) >= self._storage.concurrency:
            self._receipts.append(self._in_flight.popleft().result())
        assert self._pool is not None
        self._in_flight.append(self._pool.submit(self._send, self._parts_cut, data, last))

    def _send(self, number: int, data: bytes, last: bool) -> tuple[Any, bytes]:
        part = Part(number, data, part_digest(data), last)  # hashed here: in parallel, off the producer
        return self._storage._send_part(self._upload, part), part.md5

    def _sums(self) -> UploadSums:
        crc = int.from_bytes(self._crc32c.digest(), "big") if self._crc32c is not None else None
        return UploadSums(self._size, self._md5.digest(), crc)

    def finish(self) -> None:
        """Send what is left and commit the object, or store it whole if it fits one part."""
        if self._upload is None:
            self._storage._put_whole(self._name, bytes(self._buffer), self._sums(), self._retain_until)
            return
        try:
            self._submit(bytes(self._buffer), last=True)
            self._buffer.clear()
            while self._in_flight:
                self._receipts.append(self._in_flight.popleft().result())
            sums = self._sums()
            sums.part_md5s = [md5 for _, md5 in self._receipts]
            self._storage._complete(self._upload, [receipt for receipt, _ in self._receipts], sums)
        except BaseException:
            self.abort()
            raise
        self._shutdown()

    def abort(self) -> None:
        """Stop sending and throw away the unfinished upload (errors only logged: the original
        failure is what the caller must see)."""
        for future in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        self._shutdown()
        if self._upload is not None:
            try:
                self._storage._abort(self._upload)
            except Exception as exc:
                logger.warning("could not abort the upload of %s: %s", self._name, exc)
            self._upload = None

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _crc32c() -> Any:
    import google_crc32c  # installed with google-cloud-storage, the only provider that wants it

    return google_crc32c.Checksum()


def with_retries(
    call: Callable[[], T], *, attempts: int, what: str, base_delay: float = 0.5, max_delay: float = 8.0
) -> T:
    """Return ``call()``, calling it again after a transient StorageError, up to ``attempts`` calls
    in all with exponential backoff. For providers whose SDK does not retry a request itself."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except StorageError as exc:
            if not exc.transient or attempt >= attempts:
                raise
            delay = min(base_delay * 2 ** (attempt - 1), max_delay)
            logger.warning("%s failed (%d of %d), again in %.1fs: %s", what, attempt, attempts, delay, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")
