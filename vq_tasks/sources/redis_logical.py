"""A logical snapshot of a Redis that refuses SYNC (ElastiCache, Memorystore, OCI Cache), written
as a real RDB: SCAN each database, then for each key its expiry time and its DUMP payload, which
clients/rdb_writer.py turns into RDB records. It is not one point in time: a key written during
the snapshot is in it as it was when its turn came, so its start and end are recorded.

Speed: commands go out pipelined on one of the caller's redis-py connections, used raw (redis-py's
per-command work would be the cost), a batch of keys at a time; the next batch is on its way to
the server while this one's replies are read, in C loops (split at CRLF, then checked) where they
can be; records leave in ~1 MiB writes. Memory holds two batches (the next batch has fewer keys when values
were large; the first is BATCH_SIZE keys whatever their size), values up to HUGE whole (longer
ones stream through), and a 64-bit digest per key of the
database being read: SCAN may return a key twice (when the server shrinks its table meanwhile),
and an RDB with a key twice makes redis-server stop on loading it ("Duplicated key found in RDB
file"). That set, about 70 bytes a key, is the one thing that grows with the keyspace.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain, repeat

import redis

from vq_tasks.clients.rdb import RdbInfo
from vq_tasks.clients.rdb_writer import RdbWriter, payload_version
from vq_tasks.clients.redis_pipeline import CRLF, Keys, Wire, borrowed
from vq_tasks.clients.redis_wire import ServerFacts, command
from vq_tasks.errors import PermanentError
from vq_tasks.streams.stages import Writer

logger = logging.getLogger(__name__)
BATCH_SIZE = 1000  # keys per SCAN and per pipelined batch of DUMPs
BATCH_BYTES = 4 << 20  # fewer keys per batch when values are large: the server buffers a batch's replies
DUMP = b"*2\r\n$4\r\nDUMP\r\n"
PEXPIRETIME = b"*2\r\n$11\r\nPEXPIRETIME\r\n"  # Redis 7+: the absolute time, as the server keeps it
PTTL = b"*2\r\n$4\r\nPTTL\r\n"  # before Redis 7: the time left, added to the server's TIME
TIME = command("TIME")
NO_KEY = -2  # PEXPIRETIME and PTTL of a key that is not there; -1: no expiry
# The RDB version of each Redis release, for a snapshot with no key to learn it from a payload.
RDB_VERSIONS = (((7, 4), 12), ((7, 2), 11), ((7, 0), 10), ((5, 0), 9), ((4, 0), 8), ((3, 2), 7), ((2, 6), 6))


@dataclass
class LogicalFacts:
    """What a logical snapshot wrote: per database (numbers as strings, as in the manifest) the
    keys and the keys with an expiry; the keys skipped; when it started and ended (unix time)."""

    redis_version: str
    rdb_version: int
    size: int
    keys: dict[str, int] = field(default_factory=dict)
    expires: dict[str, int] = field(default_factory=dict)
    vanished: int = 0  # gone between SCAN and DUMP: deleted or expired meanwhile
    duplicates: int = 0  # returned again by SCAN, written once
    functions: bool = False  # the function libraries are in it (FUNCTION DUMP, Redis 7+)
    started: float = 0.0
    finished: float = 0.0

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def logical_snapshot(
    client_for_db: Callable[[int], redis.Redis],
    databases: list[int],
    out: Writer,
    *,
    server: ServerFacts | None = None,
    batch_size: int = BATCH_SIZE,
    batch_bytes: int = BATCH_BYTES,
) -> LogicalFacts:
    """Write an RDB of ``databases`` (in that order) of the Redis into ``out`` from SCAN, DUMP and
    the keys' expiry times, and return its facts.

    ``client_for_db`` gives a redis-py client of a database (TLS, user and password as the
    caller sets them); one connection of each is borrowed and given back. ``server`` is what
    redis_wire.server_facts returns (version, keys and expiring keys per database), read with
    INFO when not given. Raise TransientError when a retry may help (connection lost, server
    loading), PermanentError when it cannot (a command denied, a payload that is none).
    """
    facts = LogicalFacts("", 0, 0, started=time.time())
    first, *rest = databases or [0]
    with borrowed(client_for_db(first)) as wire:
        output = _begin(wire, out, server, facts)
        if databases:
            _snapshot_db(wire, first, output, facts, batch_size, batch_bytes)
    for db in rest:
        with borrowed(client_for_db(db)) as wire:
            _snapshot_db(wire, db, output, facts, batch_size, batch_bytes)
    info = output.finish()
    facts.rdb_version, facts.size, facts.finished = info.rdb_version, info.size, time.time()
    facts.keys = {str(db): n for db, n in output.keys.items()}
    facts.expires = {str(db): n for db, n in output.expires.items()}
    return facts


def _begin(
    wire: Wire,
    out: Writer,
    server: ServerFacts | None,
    facts: LogicalFacts,
) -> _Output:
    """Given the first connection, learn the server's version (and RESIZEDB hints) from INFO
    unless ``server`` has them, and begin the RDB with the function libraries if there are any."""
    version, keys, expires = server or wire.server_facts()
    facts.redis_version = version
    output = _Output(out, wire.where, version, facts.started, _hints(keys, expires))
    facts.functions = _add_functions(wire, output, version)
    return output


def rdb_version_for(redis_version: str) -> int:
    """Given a Redis version such as "7.0.15", return the RDB version it writes (9 if unknown)."""
    release = _release(redis_version)
    return next((rdb for since, rdb in RDB_VERSIONS if release >= since), 9)


def _release(redis_version: str) -> tuple[int, int]:
    parts = redis_version.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return (0, 0)


def _hints(keys: Mapping[str, int], expires: Mapping[str, int]) -> dict[int, tuple[int, int]]:
    """Given keys and expiring keys per database (from INFO), return RESIZEDB hints by database."""
    return {int(db): (count, expires.get(db, 0)) for db, count in keys.items() if db.isdigit()}


class _Output:
    """The RDB writer, made once the RDB version is known: from FUNCTION DUMP's payload, else from
    the first DUMP payload (every payload of a server carries its RDB version), else, with no key
    at all, from the server's version."""

    def __init__(
        self, out: Writer, where: str, redis_version: str, started: float, hints: dict[int, tuple[int, int]]
    ):
        self.writer: RdbWriter | None = None
        self.keys: dict[int, int] = {}  # records per database, once finished
        self.expires: dict[int, int] = {}
        self._out, self._where, self._redis_version = out, where, redis_version
        self._aux = {"redis-ver": redis_version, "ctime": str(int(started))}
        self._hints = hints

    def start(self, rdb_version: int) -> RdbWriter:
        self.writer = RdbWriter(
            self._out, rdb_version, aux=self._aux, resize_hints=self._hints, where=self._where
        )
        return self.writer

    def add_many(self, db: int, keys: list[bytes], payloads: list[bytes], expiries: list[int]) -> None:
        if keys:
            writer = self.writer or self.start(payload_version(payloads[0]))
            writer.add_many(db, keys, payloads, expiries)

    def add_streamed(self, db: int, key: bytes, chunks: Iterator[bytes], expiry: int) -> None:
        writer = self.writer or self.start(rdb_version_for(self._redis_version))  # a guess, checked
        writer.add_streamed(db, key, chunks, expiry)

    def finish(self) -> RdbInfo:
        writer = self.writer or self.start(rdb_version_for(self._redis_version))
        self.keys, self.expires = writer.keys, writer.expires
        return writer.finish()


def _add_functions(wire: Wire, output: _Output, redis_version: str) -> bool:
    """Write the server's function libraries (Redis 7+) before any key, and so learn its RDB
    version. Return whether they are in; they are not when the server or the user has no
    FUNCTION DUMP."""
    if _release(redis_version) < (7, 0):
        return False
    wire.send(command("FUNCTION", "DUMP"))
    try:
        payload = wire.bulk()
    except PermanentError as exc:
        if "noperm" not in str(exc).lower() and "unknown command" not in str(exc).lower():
            raise  # not a refusal: a reply we did not understand
        logger.warning("%s: the function libraries are not in the backup (%s)", wire.where, exc)
        return False  # denied to this user, or renamed away: the manifest says so
    if payload is None:
        return False
    output.start(payload_version(payload)).add_functions(payload)
    return True


def _snapshot_db(
    wire: Wire, db: int, output: _Output, facts: LogicalFacts, batch_size: int, batch_bytes: int
) -> None:
    """Write every key of database ``db`` (the one ``wire`` is connected to): SCAN a batch of
    keys, send their expiry and DUMP commands with the next SCAN, and read the previous batch's
    replies while the server works on them."""
    absolute = _release(facts.redis_version) >= (7, 0)
    seen: set[int] = set()
    count = batch_size
    wire.send(_scan(b"0", count))
    cursor, keys = wire.scan_reply()
    keys = _fresh(keys, seen, facts)
    pending: Keys | None = None
    while True:
        scan = _scan(cursor, count) if cursor != b"0" else b""
        wire.send(scan + _fetch(keys, absolute))
        if pending is not None:
            size = _read_batch(wire, db, pending.names, absolute, output, facts)
            count = _adapt(size, len(pending.names), batch_size, batch_bytes)
        if not scan:
            _read_batch(wire, db, keys.names, absolute, output, facts)
            return
        pending = keys
        cursor, keys = wire.scan_reply()
        keys = _fresh(keys, seen, facts)


def _scan(cursor: bytes, count: int) -> bytes:
    return command(b"SCAN", cursor, b"COUNT", count)


def _fetch(keys: Keys, absolute: bool) -> bytes:
    """Given keys, return the commands that fetch every key's expiry time (PEXPIRETIME, or TIME
    then PTTL), then every key's DUMP: a command is a prefix, then the key as SCAN gave it. Built
    in C loops; from the SCAN reply's bytes in one replace when no key there holds CRLF "$"."""
    if not keys.names:
        return b""
    ttl = PEXPIRETIME if absolute else PTTL
    raw = keys.raw
    if raw is not None and raw.count(CRLF + b"$") == len(keys.names) - 1:  # only between keys
        commands = b"".join(prefix + raw.replace(CRLF + b"$", CRLF + prefix + b"$") for prefix in (ttl, DUMP))
    else:
        parts = (zip(repeat(p), keys.heads, repeat(CRLF), keys.names, repeat(CRLF)) for p in (ttl, DUMP))
        commands = b"".join(chain.from_iterable(chain.from_iterable(parts)))
    return commands if absolute else TIME + commands


def _read_batch(
    wire: Wire, db: int, keys: list[bytes], absolute: bool, output: _Output, facts: LogicalFacts
) -> int:
    """Read the replies to _fetch(keys) and write the keys' records, streaming the payloads too
    large to hold; count the keys gone meanwhile. Return the bytes of payload read."""
    if not keys:
        return 0
    now_ms = 0 if absolute else wire.time_ms()
    expiries = wire.integers(len(keys))
    if not absolute:
        expiries = [now_ms + ttl if ttl >= 0 else ttl for ttl in expiries]
    size = done = 0
    while done < len(keys):
        _, payloads = wire.bulks(len(keys) - done)  # up to the next payload too large to hold
        part = slice(done, done + len(payloads))
        size += _write(db, keys[part], payloads, expiries[part], output, facts)
        done += len(payloads)
        if done < len(keys):
            size += _stream(wire, db, keys[done], expiries[done], output, facts)
            done += 1
    return size


def _write(
    db: int,
    keys: list[bytes],
    payloads: list[bytes | None],
    expiries: list[int],
    output: _Output,
    facts: LogicalFacts,
) -> int:
    """Write the records of the keys still there; count the others. Return their payloads' bytes."""
    if None in payloads or NO_KEY in expiries:
        keys, payloads, expiries = _present(keys, payloads, expiries, facts)
    output.add_many(db, keys, payloads, expiries)  # type: ignore[arg-type]  # no None left
    return sum(map(len, payloads))  # type: ignore[arg-type]


def _stream(wire: Wire, db: int, key: bytes, expiry: int, output: _Output, facts: LogicalFacts) -> int:
    """Stream the payload ``wire`` stopped at into the record of ``key`` (skip it if the key has
    gone). Return its size."""
    length = wire.huge
    chunks = wire.stream(length)
    if expiry == NO_KEY:
        facts.vanished += 1
        for _ in chunks:
            pass
    else:
        output.add_streamed(db, key, chunks, expiry)
    return length


def _present(
    keys: list[bytes], payloads: list[bytes | None], expiries: list[int], facts: LogicalFacts
) -> tuple[list[bytes], list[bytes | None], list[int]]:
    """Given a batch's keys, payloads and expiry times, return those of the keys still there
    (a payload, an expiry time), counting the others as vanished."""
    kept = [
        i
        for i, (payload, expiry) in enumerate(zip(payloads, expiries, strict=True))
        if payload is not None and expiry != NO_KEY
    ]
    facts.vanished += len(keys) - len(kept)
    return [keys[i] for i in kept], [payloads[i] for i in kept], [expiries[i] for i in kept]


def _adapt(size: int, keys: int, batch_size: int, batch_bytes: int) -> int:
    """Given the payload bytes of the last batch and its number of keys, return how many keys the
    next SCAN asks for: fewer when values are large, so that a batch stays near ``batch_bytes``."""
    average = max(size // max(keys, 1), 1)
    return max(1, min(batch_size, batch_bytes // average))


def _fresh(keys: Keys, seen: set[int], facts: LogicalFacts) -> Keys:
    """Given keys SCAN returned, return those not seen before in this database (by 64-bit
    digest), counting the others, and add them to ``seen``."""
    if seen.isdisjoint(map(hash, keys.names)):  # bytes keep their hash: the next map is cheap
        before = len(seen)
        seen.update(map(hash, keys.names))
        if len(seen) - before == len(keys.names):
            return keys
        seen.difference_update(map(hash, keys.names))  # a key twice in one reply: none was seen before
    fresh = Keys([], [])
    for name, head in zip(keys.names, keys.heads, strict=True):
        digest = hash(name)
        if digest in seen:
            facts.duplicates += 1
        else:
            seen.add(digest)
            fresh.names.append(name)
            fresh.heads.append(head)
    return fresh
