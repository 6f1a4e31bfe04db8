"""The RDB file format as far as a backup checks it: the ``REDIS`` header and its version, and the
CRC64 in the trailer, computed as the bytes pass (RdbCheck) so an RDB is never held in memory. Used
when a dump streams the RDB and when verify reads it back."""

from __future__ import annotations

from typing import NamedTuple

import anycrc

from vq_tasks.errors import PermanentError, TransientError

CRC64 = anycrc.Model("CRC64-REDIS")
MAGIC = b"REDIS"
HEADER_SIZE = 9  # b"REDIS" and four digits of RDB version
TRAILER_SIZE = 9  # the EOF opcode and the little-endian CRC64 of everything before the CRC
EOF_OPCODE = 0xFF
MIN_RDB_VERSION = 5  # the first with a CRC64 trailer (Redis 2.6)


class RdbInfo(NamedTuple):
    rdb_version: int
    crc64_checked: bool
    size: int


class RdbCheck:
    """Checks an RDB as it streams past: the REDIS header and version, and the CRC64 trailer."""

    def __init__(self, where: str = "Redis"):
        self.where = where
        self.size = 0
        self.rdb_version = 0
        self._head = b""
        self._tail = b""  # the last TRAILER_SIZE bytes seen, not yet in the CRC
        self._crc = 0

    def feed(self, data: bytes) -> None:
        """Given the next bytes of the RDB, check the header and update the CRC64. Raise
        PermanentError for data that is not an RDB."""
        if len(self._head) < HEADER_SIZE:
            self._check_head(data)
        self.size += len(data)
        if len(data) >= TRAILER_SIZE:
            done: tuple[bytes | memoryview, ...] = (self._tail, memoryview(data)[:-TRAILER_SIZE])
            self._tail = data[-TRAILER_SIZE:]
        else:
            joined = self._tail + data
            done, self._tail = (joined[:-TRAILER_SIZE],), joined[-TRAILER_SIZE:]
        for part in done:
            if part:
                self._crc = CRC64.calc(part, self._crc)

    def _check_head(self, data: bytes) -> None:
        self._head += data[: HEADER_SIZE - len(self._head)]
        head, digits = self._head, self._head[len(MAGIC) :]
        if not MAGIC.startswith(head[: len(MAGIC)]) or (digits and not digits.isdigit()):
            raise PermanentError(f"{self.where} sent data that is not an RDB: it starts with {head!r}")
        if len(head) == HEADER_SIZE:
            self.rdb_version = int(digits)
            if self.rdb_version < MIN_RDB_VERSION:
                raise PermanentError(f"{self.where} sent RDB version {self.rdb_version}: too old to check")

    def finish(self) -> RdbInfo:
        """Check the end of the RDB and return its facts. Raise PermanentError for a stream too
        short to be an RDB, TransientError for a truncated one or a CRC64 mismatch."""
        if self.size < HEADER_SIZE + TRAILER_SIZE:
            raise PermanentError(f"{self.where} sent {self.size} bytes: too short to be an RDB")
        if self._tail[0] != EOF_OPCODE:
            raise TransientError(f"the RDB from {self.where} does not end with the EOF opcode: truncated?")
        crc = CRC64.calc(self._tail[:1], self._crc)
        expected = int.from_bytes(self._tail[1:], "little")
        if expected == 0:  # the server has rdbchecksum off
            return RdbInfo(self.rdb_version, False, self.size)
        if crc != expected:
            raise TransientError(
                f"RDB checksum mismatch from {self.where}: computed {crc:016x}, the RDB says"
                f" {expected:016x} (damaged in transfer; a retry takes a new copy)"
            )
        return RdbInfo(self.rdb_version, True, self.size)
