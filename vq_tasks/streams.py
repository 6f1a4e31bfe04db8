"""Composable stream stages: data is pushed through ``write`` from a source to a sink, one chunk at
a time, so memory stays bounded whatever the size of the data.

A stage passes every chunk on to the next one after looking at it (hashing, counting, reporting
progress) or transforming it (compressing into independent gzip members, in parallel threads: zlib
releases the GIL). Members concatenate into a valid gzip stream, which is what lets a bundle be
assembled later by copying bytes, never compressing twice.

Compression is what a dump spends its CPU on: zlib level 6 runs at 35-50 MB/s per core on a plain
SQL dump, zlib-ng's deflate (the same format and levels) at about 93 MB/s, so zlib-ng compresses;
anything zlib reads, gzip(1) and tar(1) included, reads its members.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, NoReturn, Protocol

import zstandard
from pydantic import BaseModel
from zlib_ng import zlib_ng as DEFLATE  # the same deflate format and levels, two to three times faster

CHUNK_SIZE = 1 << 20
GZIP_BLOCK_SIZE = 1 << 20
GZIP_WBITS = 31  # zlib writes a gzip header and trailer
HASH_IN_FLIGHT = 4  # chunks handed to a background HashStage and not hashed yet
SHARED_PIECE = 64 << 10  # bytes at least this long go into gzip blocks by reference, not copied
Buffer = bytes | bytearray | memoryview


class Writer(Protocol):
    def write(self, data: bytes, /) -> object: ...


class Checksums(BaseModel):
    """Size and digests of a byte stream."""

    size: int
    md5: str
    sha256: str


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


def gzip_member(data: bytes, level: int) -> bytes:
    """Return ``data`` compressed as one complete gzip member."""
    return b"".join(_deflate_member([data], level))


def _deflate_member(pieces: list[Buffer], level: int) -> list[bytes]:
    """Compress the concatenation of ``pieces`` into one gzip member, returned in parts (no join)."""
    compressor = DEFLATE.compressobj(level, zlib.DEFLATED, GZIP_WBITS)
    out = [compressor.compress(piece) for piece in pieces]
    out.append(compressor.flush())
    return [part for part in out if part]


class BlockStage(Stage):
    """Compress blocks independently on ``threads`` threads (zlib-ng and zstd release the GIL) and
    write the results in order: what GzipStage and ZstdStage share.

    At most ``2 * threads`` blocks are in flight, so memory is bounded by a few block sizes. A block
    is a list of pieces handed to ``compress_block``: large ``bytes`` written to the stage are cut
    into it by reference (memoryview slices), never copied; small writes and mutable buffers (which
    a caller may reuse once ``write`` returns) are copied and gathered.
    """

    def __init__(
        self,
        downstream: Writer,
        threads: int,
        block_size: int,
        compress_block: Callable[[list[Buffer]], list[bytes]],
        name: str,
    ):
        super().__init__(downstream)
        self._compress_block = compress_block
        self._block_size = block_size
        self._max_in_flight = 2 * threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._pending: collections.deque[Future[list[bytes]]] = collections.deque()
        self._pieces: list[Buffer] = []
        self._buffered = 0

    def write(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        shared = isinstance(data, bytes) and len(view) >= SHARED_PIECE  # immutable: kept by reference
        while view:
            take = min(len(view), self._block_size - self._buffered)
            piece, view = view[:take], view[take:]
            if shared:
                self._pieces.append(piece)
            elif self._pieces and isinstance(self._pieces[-1], bytearray):
                self._pieces[-1] += piece
            else:
                self._pieces.append(bytearray(piece))
            self._buffered += take
            if self._buffered == self._block_size:
                self._submit()

    def _submit(self) -> None:
        block, self._pieces, self._buffered = self._pieces, [], 0
        self._pending.append(self._pool.submit(self._compress_block, block))
        while len(self._pending) >= self._max_in_flight:
            self._write_block(self._pending.popleft())

    def _write_block(self, compressed: Future[list[bytes]]) -> None:
        for part in compressed.result():
            self.downstream.write(part)

    def close(self) -> None:
        try:
            if self._pieces:
                self._submit()
            while self._pending:
                self._write_block(self._pending.popleft())
        finally:
            self.abort()
        super().close()

    def abort(self) -> None:
        """Stop the threads without writing what is pending (after an error)."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pieces = []
        self._pool.shutdown(wait=True, cancel_futures=True)


class GzipStage(BlockStage):
    """Compress blocks into independent gzip members on ``threads`` threads, written in order."""

    def __init__(self, downstream: Writer, level: int, threads: int, block_size: int = GZIP_BLOCK_SIZE):
        super().__init__(
            downstream, threads, block_size, functools.partial(_deflate_member, level=level), "gzip"
        )


def pump(source: BinaryIO, sink: Writer, chunk_size: int = CHUNK_SIZE) -> int:
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


class DamagedStream(Exception):
    """A compressed or tar stream that cannot be read to its end; the message says why."""


class Nowhere:
    """A writer that drops what it gets: the end of a chain that only hashes."""

    def write(self, data: bytes) -> None:
        pass


class HashingReader:
    """Read from ``source``, hashing every byte read (unless not ``hashed``) and keeping the last
    ``keep`` bytes or more. With ``background`` the digests are computed on a thread of their own
    (beside the decompression that usually reads from or feeds this reader); ``close`` ends it."""

    def __init__(
        self,
        source: BinaryIO | GunzipReader | UnzstdReader,
        keep: int = 0,
        hashed: bool = True,
        background: bool = False,
    ):
        self._source = source
        self._keep = keep
        self.hash = HashStage(Nowhere(), background=background) if hashed else None
        self.position = 0
        self._recent = bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.position += len(data)
        if self.hash is not None:
            self.hash.write(data)
        if self._keep:
            self._recent += data
            if len(self._recent) > 2 * self._keep:
                del self._recent[: -self._keep]
        return data

    def since(self, offset: int) -> bytes | None:
        """Return what was read from ``offset`` on, or None if that is no longer kept."""
        back = self.position - offset
        if back < 0 or back > len(self._recent):
            return None
        return bytes(self._recent[len(self._recent) - back :])

    def checksums(self) -> Checksums | None:
        return self.hash.checksums() if self.hash is not None else None

    def close(self) -> None:
        """End the hashing thread, if any (the digests are lost if not read before)."""
        if self.hash is not None:
            self.hash.abort()

    def __enter__(self) -> HashingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Decoder:
    """What the readers of compressed streams share: a buffer of decoded data that ``read``
    serves, filled by the subclass's ``_decode_some``, and a failure that stays."""

    def __init__(self, source: HashingReader):
        self._source = source
        self._input = b""
        self._buffer = bytearray()
        self._failure = ""

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._buffer) < size) and self._more():
            pass
        size = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _more(self) -> bool:
        if self._failure:
            raise DamagedStream(self._failure)
        return self._decode_some()

    def _decode_some(self) -> bool:
        """Decode more into the buffer; return False at the end of the stream."""
        raise NotImplementedError

    def _fail(self, reason: str) -> NoReturn:
        self._failure = reason
        raise DamagedStream(reason)


class GunzipReader(_Decoder):
    """Read the data of concatenated gzip members from ``source``, inflating at most CHUNK_SIZE
    at a time (zlib-ng: about 1.5 times zlib's speed). Raise DamagedStream for data that is not
    gzip or ends inside a member."""

    def __init__(self, source: HashingReader):
        super().__init__(source)
        self._inflate = DEFLATE.decompressobj(GZIP_WBITS)
        self._in_member = False

    def _decode_some(self) -> bool:
        if not self._input:
            self._input = self._source.read(CHUNK_SIZE)
            if not self._input:
                return self._end_of_input()
        try:
            self._buffer += self._inflate.decompress(self._input, CHUNK_SIZE)
        except DEFLATE.error as exc:
            self._fail(f"damaged gzip data at byte {self._source.position} or before ({exc})")
        self._in_member = not self._inflate.eof
        if self._inflate.eof:
            self._input = self._inflate.unused_data
            self._inflate = DEFLATE.decompressobj(GZIP_WBITS)
        else:
            self._input = self._inflate.unconsumed_tail
        return True

    def _end_of_input(self) -> bool:
        if not self._in_member:
            return False
        self._buffer += self._inflate.flush()
        if not self._inflate.eof:
            self._fail(f"the gzip data ends inside a member at byte {self._source.position}: truncated")
        self._in_member = False
        self._inflate = DEFLATE.decompressobj(GZIP_WBITS)
        return True


GZIP_MAGIC = b"\x1f\x8b"


@contextlib.contextmanager
def open_tar_stream(path: Path) -> Iterator[tarfile.TarFile]:
    """Open a plain, gzip- or zstd-compressed tar file for reading as a stream. Python's own
    ``r|gz`` stops after the first gzip member; our archives are many members, read by GunzipReader
    (or UnzstdReader)."""
    with open(path, "rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        compression = "gzip" if magic[:2] == GZIP_MAGIC else "zstd" if magic == ZSTD_MAGIC else "none"
        source = decompressing(HashingReader(raw, hashed=False), compression)
        with tarfile.open(fileobj=source, mode="r|") as tar:
            yield tar


# zstd: the same design as gzip above (independent frames made in parallel blocks by BlockStage,
# which concatenate into one valid zstd stream).

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_BLOCK_SIZE = 1 << 20
ZSTD_MAX_FRAME = 16 << 20  # the largest frame content a reader accepts (ours are ZSTD_BLOCK_SIZE)
ZSTD_HEADER_MAX = 18  # bytes of the longest frame header
ZSTD_RAW_BLOCK = 1 << 17  # the largest block of a frame


def zstd_frame(data: bytes, level: int) -> bytes:
    """Return ``data`` as one complete zstd frame with its size and checksum; level 0 stores it
    in raw blocks (for data already compressed)."""
    if level == 0:
        return _stored_zstd_frame(data)
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)


def _stored_zstd_frame(data: bytes) -> bytes:
    """A zstd frame of raw (uncompressed) blocks: single segment, 4-byte content size."""
    frame = bytearray(ZSTD_MAGIC + b"\xa0" + len(data).to_bytes(4, "little"))
    offset = 0
    while True:
        block = data[offset : offset + ZSTD_RAW_BLOCK]
        offset += len(block)
        last = offset >= len(data)
        frame += ((len(block) << 3) | last).to_bytes(3, "little") + block
        if last:
            return bytes(frame)


class ZstdStage(BlockStage):
    """Compress blocks into independent zstd frames on ``threads`` threads, written in order;
    level 0 stores them."""

    def __init__(self, downstream: Writer, level: int, threads: int, block_size: int = ZSTD_BLOCK_SIZE):
        self._level = level
        self._local = threading.local()  # one compressor per thread: a compressor is not shared
        super().__init__(downstream, threads, block_size, self._frame, "zstd")

    def _frame(self, pieces: list[Buffer]) -> list[bytes]:
        block = b"".join(pieces)  # on the compressing thread: ~0.1 ms a MiB, holding the GIL
        if self._level == 0:
            return [_stored_zstd_frame(block)]
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self._level, write_checksum=True)
            self._local.compressor = compressor
        return [compressor.compress(block)]


class UnzstdReader(_Decoder):
    """Read the data of concatenated zstd frames from ``source``, one frame at a time. Raise
    DamagedStream for data that is not zstd, fails a frame's checksum, ends inside a frame, or
    has a frame without its size or larger than ZSTD_MAX_FRAME (memory stays bounded)."""

    def __init__(self, source: HashingReader):
        super().__init__(source)
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame: zstandard.ZstdDecompressionObj | None = None

    def _decode_some(self) -> bool:
        if self._frame is None:
            while len(self._input) < ZSTD_HEADER_MAX and (more := self._source.read(CHUNK_SIZE)):
                self._input += more
            if not self._input:
                return False
            self._start_frame()
        if not self._input:
            self._input = self._source.read(CHUNK_SIZE)
            if not self._input:
                self._fail(f"the zstd data ends inside a frame at byte {self._source.position}: truncated")
        assert self._frame is not None
        try:
            self._buffer += self._frame.decompress(self._input)
        except zstandard.ZstdError as exc:
            self._fail(f"damaged zstd data at byte {self._source.position} or before ({exc})")
        if self._frame.eof:
            self._input = self._frame.unused_data
            self._frame = None
        else:
            self._input = b""
        return True

    def _start_frame(self) -> None:
        where = f"at byte {self._source.position - len(self._input)}"
        try:
            size = zstandard.frame_content_size(self._input)
        except zstandard.ZstdError:
            self._fail(f"damaged zstd data {where}: not a zstd frame header")
        if size < 0 or size > ZSTD_MAX_FRAME:
            self._fail(f"zstd frame {where} does not say its size or is larger than {ZSTD_MAX_FRAME} bytes")
        self._frame = self._decompressor.decompressobj()


def compression_stage(downstream: Writer, compression: str, level: int, threads: int) -> Writer:
    """Return the stage compressing into ``downstream`` ("gzip" or "zstd"), or ``downstream``
    itself ("none")."""
    if compression == "gzip":
        return GzipStage(downstream, level, threads)
    if compression == "zstd":
        return ZstdStage(downstream, level, threads)
    return downstream


def decompressing(source: HashingReader, compression: str) -> HashingReader | GunzipReader | UnzstdReader:
    """Return the reader of the data inside ``source`` compressed as ``compression``."""
    if compression == "gzip":
        return GunzipReader(source)
    if compression == "zstd":
        return UnzstdReader(source)
    return source
