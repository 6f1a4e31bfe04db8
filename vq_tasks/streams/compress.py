"""Compression beside the dump, in parallel blocks: each block becomes an independent gzip member or
zstd frame (zlib and zstd release the GIL), and members concatenate into one valid stream, which is
what lets a bundle be assembled later by copying bytes, never compressing twice.

Compression is what a dump spends its CPU on, so zlib-ng's deflate compresses: the same format
and levels as zlib, faster; anything zlib reads, gzip(1) and tar(1) included, reads its members.
"""

from __future__ import annotations

import collections
import functools
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import zstandard
from zlib_ng import zlib_ng as DEFLATE  # the same deflate format and levels, faster

from vq_tasks.streams.stages import Buffer, Stage, Writer

GZIP_BLOCK_SIZE = 1 << 20
GZIP_WBITS = 31  # zlib writes a gzip header and trailer
SHARED_PIECE = 64 << 10  # bytes at least this long go into gzip blocks by reference, not copied


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


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_BLOCK_SIZE = 1 << 20
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
        block = b"".join(pieces)  # on the compressing thread, not the main one (the copy holds the GIL)
        if self._level == 0:
            return [_stored_zstd_frame(block)]
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self._level, write_checksum=True)
            self._local.compressor = compressor
        return [compressor.compress(block)]


def compression_stage(downstream: Writer, compression: str, level: int, threads: int) -> Writer:
    """Return the stage compressing into ``downstream`` ("gzip" or "zstd"), or ``downstream``
    itself ("none")."""
    if compression == "gzip":
        return GzipStage(downstream, level, threads)
    if compression == "zstd":
        return ZstdStage(downstream, level, threads)
    return downstream
