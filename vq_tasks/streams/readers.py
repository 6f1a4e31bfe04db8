"""Reading stored bytes back as streams: a reader that hashes what passes (on a thread of its own if
asked), gzip and zstd readers that go on past the first member or frame and refuse damage by name,
and a tar opened on any of them. Memory stays bounded by a few chunks."""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import zstandard
from zlib_ng import zlib_ng as DEFLATE  # the same deflate format and levels, faster

from vq_tasks.manifest import Checksums
from vq_tasks.streams.compress import GZIP_WBITS, ZSTD_MAGIC
from vq_tasks.streams.stages import CHUNK_SIZE, HashStage, Nowhere, Readable


class DamagedStream(Exception):
    """A compressed or tar stream that cannot be read to its end; the message says why."""


class HashingReader:
    """Read from ``source``, hashing every byte read (unless not ``hashed``) and keeping the last
    ``keep`` bytes or more. With ``background`` the digests are computed on a thread of their own
    (beside the decompression that usually reads from or feeds this reader); ``close`` ends it."""

    def __init__(
        self,
        source: Readable,
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
    at a time with zlib-ng. Raise DamagedStream for data that is not
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
        except DEFLATE.error as exc:  # type: ignore[misc]  # a class, which zlib_ng.pyi types as an instance
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
        with tarfile.open(  # type: ignore[call-overload]  # stream mode only calls read()
            fileobj=source, mode="r|"
        ) as tar:
            yield tar


def forget_members(tar: tarfile.TarFile) -> None:
    """Drop the TarInfo that a tar read as a stream keeps of every member read so far."""
    tar.members.clear()  # type: ignore[attr-defined]  # CPython's own list, which typeshed leaves out


ZSTD_MAX_FRAME = 16 << 20  # the largest frame content a reader accepts (ours are ZSTD_BLOCK_SIZE)
ZSTD_HEADER_MAX = 18  # bytes of the longest frame header


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


def decompressing(source: HashingReader, compression: str) -> HashingReader | GunzipReader | UnzstdReader:
    """Return the reader of the data inside ``source`` compressed as ``compression``."""
    if compression == "gzip":
        return GunzipReader(source)
    if compression == "zstd":
        return UnzstdReader(source)
    return source
