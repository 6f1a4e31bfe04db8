"""Writing an RDB file from DUMP payloads, for servers that refuse SYNC (managed Redis services):
a DUMP payload is the RDB encoding of one value (its type byte, then the value) followed by the
payload's 2-byte RDB version and the CRC64 of all before it, so a key's RDB record is the payload's
type byte, the key as an RDB string, and the payload's value, preceded by the expiry opcode when
the key has a TTL. The layout is Redis's rdb.c (rdbSaveRio, rdbSaveKeyValuePair, rdbSaveLen):

    "REDIS" + 4 digits | AUX fields | functions | per database: SELECTDB [RESIZEDB] records | EOF CRC64

The stream is written as it comes, in chunks of about ``buffer_size`` bytes (and a batch of
records), with its CRC64 (rdb.CRC64, the one the checks use) computed on the way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import chain
from operator import itemgetter

from vq_tasks.clients.rdb import CRC64, EOF_OPCODE, MAGIC, RdbInfo
from vq_tasks.errors import PermanentError
from vq_tasks.streams.stages import CHUNK_SIZE, Writer

FUNCTION2_OPCODE = 0xF5  # a function library (Redis 7+), as FUNCTION DUMP gives them
AUX_OPCODE = 0xFA
RESIZEDB_OPCODE = 0xFB
EXPIRETIME_MS_OPCODE = 0xFC
SELECTDB_OPCODE = 0xFE
FIRST_OPCODE = 0xF4  # types at or above are opcodes, never a value's type (rdb.h)
TRAILER = 10  # a payload's 2-byte RDB version and 8-byte CRC64
MAX_RDB_VERSION = 9999  # four digits in the header
MAX_LENGTH = (1 << 64) - 1
LONG = 0x4000  # lengths from here take five bytes or more
TYPE, VALUE = itemgetter(slice(0, 1)), itemgetter(slice(1, -TRAILER))  # of a payload
FIRST, VERSION = itemgetter(0), itemgetter(slice(-TRAILER, -TRAILER + 2))  # its type byte; its version
EXPIRETIME_MS = bytes((EXPIRETIME_MS_OPCODE,))


def encode_length(length: int) -> bytes:
    """Given a length, return it as rdbSaveLen writes it: 6 bits in one byte, 14 bits in two
    (big-endian), else 0x80 and 32 bits or 0x81 and 64 bits, big-endian."""
    if not 0 <= length <= MAX_LENGTH:
        raise ValueError(f"an RDB length is 0 to 2**64 - 1, not {length}")
    if length < 0x40:
        return bytes((length,))
    if length < 0x4000:
        return bytes((0x40 | length >> 8, length & 0xFF))
    if length <= 0xFFFFFFFF:
        return b"\x80" + length.to_bytes(4, "big")
    return b"\x81" + length.to_bytes(8, "big")


LENGTHS = [encode_length(length) for length in range(LONG)]


def encode_string(data: bytes) -> bytes:
    """Given bytes, return them as an RDB string: the length, then the bytes verbatim (a loader
    takes any string so, whatever encoding the server would have chosen)."""
    return encode_length(len(data)) + data


def payload_version(payload: bytes) -> int:
    """Given a DUMP (or FUNCTION DUMP) payload, return the RDB version in its trailer."""
    return int.from_bytes(payload[-TRAILER : -TRAILER + 2], "little")


def check_payload(payload: bytes, rdb_version: int, where: str = "Redis", crc: bool = True) -> None:
    """Given a DUMP payload and the version of the RDB it goes into, check it is one: long enough,
    a value's type first, a version the RDB can hold, and (with ``crc``) its CRC64 right. Raise
    PermanentError."""
    if len(payload) < TRAILER + 1 or payload[0] >= FIRST_OPCODE:
        raise PermanentError(f"{where} sent a DUMP payload that is none ({len(payload)} bytes)")
    check_version(payload_version(payload), rdb_version, where)
    if crc and CRC64.calc(payload[:-8]) != int.from_bytes(payload[-8:], "little"):
        raise PermanentError(f"{where} sent a DUMP payload whose CRC64 does not match")


def check_version(version: int, rdb_version: int, where: str = "Redis") -> None:
    """Given a payload's RDB version, raise PermanentError if an RDB of ``rdb_version`` cannot
    hold it (its encodings may be unknown to that version's loader)."""
    if version > rdb_version:
        raise PermanentError(
            f"{where} sent a DUMP payload of RDB version {version}, newer than the RDB's {rdb_version}"
            " (the server changed version during the snapshot?): take the backup again"
        )


class RdbWriter:
    """Writes an RDB to ``out``: the header and AUX fields at once, then records given one
    database after another (``add``), then the EOF and CRC64 (``finish``). A database without
    records gets no SELECTDB. Expiry times are absolute unix milliseconds, as the RDB keeps them."""

    def __init__(
        self,
        out: Writer,
        rdb_version: int,
        *,
        aux: Mapping[str, str] | None = None,
        resize_hints: Mapping[int, tuple[int, int]] | None = None,
        buffer_size: int = CHUNK_SIZE,
        where: str = "Redis",
    ):
        if not 1 <= rdb_version <= MAX_RDB_VERSION:
            raise ValueError(f"an RDB version has 1 to 4 digits, not {rdb_version}")
        self.rdb_version = rdb_version
        self.where = where
        self.size = 0
        self.keys: dict[int, int] = {}  # records written per database
        self.expires: dict[int, int] = {}  # of which with an expiry time
        self._out = out
        self._crc = 0
        self._parts: list[bytes] = []
        self._pending = 0
        self._buffer_size = buffer_size
        self._hints = resize_hints or {}
        self._db: int | None = None
        self._finished = False
        self._put(MAGIC + b"%04d" % rdb_version)
        for name, value in (aux or {}).items():
            self._put(bytes((AUX_OPCODE,)) + encode_string(name.encode()) + encode_string(value.encode()))

    def add_functions(self, payload: bytes) -> None:
        """Given a FUNCTION DUMP payload, write the function libraries it holds (records of the
        FUNCTION2 opcode, as in an RDB). Only before the first key, as Redis writes them."""
        if self._db is not None:
            raise ValueError("functions go before the first database")
        if len(payload) < TRAILER or CRC64.calc(payload[:-8]) != int.from_bytes(payload[-8:], "little"):
            raise PermanentError(f"{self.where} sent a FUNCTION DUMP payload whose CRC64 does not match")
        check_version(payload_version(payload), self.rdb_version, self.where)
        body = payload[:-TRAILER]
        if body and body[0] != FUNCTION2_OPCODE:
            raise PermanentError(f"{self.where} sent a FUNCTION DUMP payload in a format not known here")
        self._put(body)

    def add(self, db: int, key: bytes, payload: bytes, expire_ms: int | None = None) -> None:
        """Write the record of ``key`` of database ``db`` from its DUMP payload (checked with
        check_payload), with its absolute expiry time in unix ms if it has one. Databases come
        one after another: a database once left does not come back."""
        self.add_many(db, [key], [payload], [-1 if expire_ms is None else expire_ms])

    def add_many(self, db: int, keys: list[bytes], payloads: list[bytes], expires_ms: list[int]) -> None:
        """Write the records of ``keys`` of database ``db``, as ``add`` does, from their payloads
        and expiry times (negative for none). Every payload's type and version is checked, the
        first one's CRC64 too (a CRC64 per payload would cost a third of the server's time).
        Built in C loops (map, zip): per-key Python would cost more than the server's work."""
        self._at(db)
        if not keys:
            return
        check_payload(payloads[0], self.rdb_version, self.where)
        self._check_all(payloads)
        sizes = list(map(len, keys))
        heads = map(LENGTHS.__getitem__, sizes) if max(sizes) < LONG else map(encode_length, sizes)
        columns: list[Iterable[bytes]] = [map(TYPE, payloads), heads, keys, map(VALUE, payloads)]
        expiring = sum(map((-1).__lt__, expires_ms))  # expiry times from 0
        if expiring:
            columns.insert(0, map(self._head, expires_ms))
        self._parts.extend(chain.from_iterable(zip(*columns, strict=True)))
        self.keys[db] += len(keys)
        self.expires[db] += expiring
        self._pending += sum(map(len, payloads)) + sum(sizes)
        if self._pending >= self._buffer_size:
            self.flush()

    def _check_all(self, payloads: list[bytes]) -> None:
        """Check every payload's length, type and version at once; find and name a bad one."""
        version = self.rdb_version
        if (
            min(map(len, payloads)) <= TRAILER
            or max(map(FIRST, payloads)) >= FIRST_OPCODE
            or max(int.from_bytes(found, "little") for found in set(map(VERSION, payloads))) > version
        ):
            for payload in payloads:
                check_payload(payload, version, self.where, crc=False)

    def add_streamed(self, db: int, key: bytes, chunks: Iterable[bytes], expire_ms: int = -1) -> None:
        """Write the record of ``key`` as ``add`` does, from its DUMP payload given in chunks, for
        a payload too large to hold: the value goes out as it comes; its version and CRC64 are
        checked at its end (raising PermanentError, the RDB then unusable)."""
        self._at(db)
        held, crc, started = b"", 0, False
        for chunk in chunks:
            held += chunk
            if len(held) <= TRAILER:
                continue
            data, held = held[:-TRAILER], held[-TRAILER:]
            crc = CRC64.calc(data, crc)
            if not started:
                if data[0] >= FIRST_OPCODE:
                    raise PermanentError(f"{self.where} sent a DUMP payload that is none (type {data[0]})")
                self._put(self._head(expire_ms) + data[:1] + encode_string(key))
                data, started = data[1:], True
            self._put(data)
        if not started:
            raise PermanentError(f"{self.where} sent a DUMP payload that is none ({len(held)} bytes)")
        check_version(int.from_bytes(held[:2], "little"), self.rdb_version, self.where)
        if CRC64.calc(held[:2], crc) != int.from_bytes(held[2:], "little"):
            raise PermanentError(f"{self.where} sent a DUMP payload whose CRC64 does not match")
        self.keys[db] += 1
        self.expires[db] += int(expire_ms >= 0)

    @staticmethod
    def _head(expire_ms: int) -> bytes:
        """The expiry opcode and time of a record, if it has one."""
        return EXPIRETIME_MS + expire_ms.to_bytes(8, "little") if expire_ms >= 0 else b""

    def _at(self, db: int) -> None:
        """Make ``db`` the database of the next records: a SELECTDB when it changes."""
        if self._finished:
            raise ValueError("the RDB is finished")
        if db != self._db:
            self._select(db)

    def _select(self, db: int) -> None:
        if db in self.keys or db < 0:
            raise ValueError(f"database {db} comes once, in order: the RDB has {list(self.keys)}")
        self._db = db
        self.keys[db] = self.expires[db] = 0
        self._put(bytes((SELECTDB_OPCODE,)) + encode_length(db))
        if db in self._hints:
            keys, expires = self._hints[db]
            self._put(bytes((RESIZEDB_OPCODE,)) + encode_length(keys) + encode_length(expires))

    def _put(self, data: bytes) -> None:
        if self._finished:
            raise ValueError("the RDB is finished")
        self._parts.append(data)
        self._pending += len(data)
        if self._pending >= self._buffer_size:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered to ``out`` in one write."""
        if not self._parts:
            return
        data = b"".join(self._parts)
        self._parts.clear()
        self._pending = 0
        self._crc = CRC64.calc(data, self._crc)
        self.size += len(data)
        self._out.write(data)

    def finish(self) -> RdbInfo:
        """Write the EOF opcode and the CRC64 of everything before it, and return the RDB's
        version, size and that its CRC64 is set."""
        self._put(bytes((EOF_OPCODE,)))
        self.flush()
        trailer = self._crc.to_bytes(8, "little")
        self._out.write(trailer)
        self.size += len(trailer)
        self._finished = True
        return RdbInfo(self.rdb_version, True, self.size)
