"""Assemble stored files from staged parts by copying bytes, never compressing a second time.

A ``.tar.gz`` is a tar stream inside concatenated gzip members. The bundle is written as: for each
part, one small member holding its tar header, then the part's own members (compressed by its
dump task), then a small member with the padding to the next 512-byte block; at the end a member
with the end-of-archive blocks. ``tar -tzf`` reads the result like any other archive. A ``.tar.zst``
is made the same way of zstd frames (``tar --zstd -tf`` reads it). Each staged
part's size and SHA-256 are checked while it is copied, so a part changed or cut after its task
finished fails the backup instead of entering it.
"""

from __future__ import annotations

import tarfile
from datetime import datetime
from pathlib import Path

from vq_tasks.errors import PermanentError
from vq_tasks.manifest import BUNDLED, Component, StagedMember, StagedPart
from vq_tasks.streams.compress import gzip_member, zstd_frame
from vq_tasks.streams.stages import CHUNK_SIZE, HashStage, Nowhere, Writer

BLOCK = tarfile.BLOCKSIZE
END_OF_ARCHIVE = bytes(2 * BLOCK)
SMALL_MEMBER_LEVEL = 6


class BundleWriter:
    """Write a tar (gzip- or zstd-compressed, or plain) of staged parts into ``out``."""

    def __init__(self, out: Writer, compression: str, mtime: datetime):
        self._out = out
        self._compression = compression
        self._mtime = int(mtime.timestamp())
        self._pending_padding = 0

    def _emit_small(self, data: bytes) -> None:
        if self._compression == "gzip":
            data = gzip_member(data, SMALL_MEMBER_LEVEL)
        elif self._compression == "zstd":
            data = zstd_frame(data, SMALL_MEMBER_LEVEL)
        self._out.write(data)

    def add(self, part: StagedMember) -> None:
        """Append ``part`` under its member name."""
        info = tarfile.TarInfo(part.member)
        info.size = part.content.size
        info.mode = 0o600
        info.mtime = self._mtime
        header = info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
        self._emit_small(bytes(self._pending_padding) + header)
        copy_staged(part, self._out)
        self._pending_padding = -part.content.size % BLOCK

    def close(self) -> None:
        """Write the padding of the last part and the end-of-archive marker."""
        self._emit_small(bytes(self._pending_padding) + END_OF_ARCHIVE)


def copy_staged(part: StagedMember, out: Writer) -> None:
    """Copy a staged part into ``out``, checking its size and SHA-256 against its record.
    Raise PermanentError if the part is missing or differs. The check's SHA-256 runs on a thread
    of its own, beside whatever ``out`` does with the bytes (hashing them again, writing them)."""
    path = Path(part.path)
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed below, errors translated
    except FileNotFoundError:
        raise PermanentError(
            f"the {part.describe()} at {path} is not visible on "
            "this worker: BACKUP_STAGING_DIR must be one volume shared by every worker"
        ) from None
    check = HashStage(Nowhere(), md5=False, background=True)
    try:
        with stream:
            while chunk := stream.read(CHUNK_SIZE):
                check.write(chunk)
                out.write(chunk)
        check.close()
    finally:
        check.abort()
    size = check.size
    if size != part.staged_size or check.sha256 != part.staged_sha256:
        raise PermanentError(
            f"the {part.describe()} at {path} changed after it was written "
            f"({size} bytes, expected {part.staged_size}): refusing to store it"
        )


def write_bundle(
    out: Writer, parts: dict[Component, StagedPart], compression: str, started: datetime
) -> None:
    """Write the bundle of ``parts``: each bundled component's members in order, then the end."""
    bundle = BundleWriter(out, compression, started)
    for component in BUNDLED:
        for member in [parts[component], *parts[component].extras]:
            bundle.add(member)
    bundle.close()
