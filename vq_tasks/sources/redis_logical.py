"""A logical snapshot of a Redis that refuses SYNC (ElastiCache, Memorystore, OCI Cache), written
as a real RDB: SCAN each database, then for each key its expiry time and its DUMP payload, which
clients/rdb_writer.py turns into RDB records. It is not one point in time: a key written during
the snapshot is in it as it was when its turn came, so its start and end are recorded.

Speed: commands go out pipelined on one of the caller's redis-py connections, used raw (redis-py's
per-command work would be the cost), a batch of keys at a time; the next batch is on its way to
the server while this one's replies are read, in C loops (split at CRLF, then checked) where they
can be; records leave in ~1 MiB writes. Memory holds two batches (fewer keys when values are
large), values up to HUGE whole (longer ones stream through), and a 64-bit digest per key of the
database being read: SCAN may return a key twice (when the server shrinks its table meanwhile),
and an RDB with a key twice makes redis-server stop on loading it ("Duplicated key found in RDB
file"). That set, about 70 bytes a key, is the one thing that grows with the keyspace.
"""

from __future__ import annotations

import operator
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import NamedTuple

import redis

from vq_tasks.clients.rdb import RdbInfo
from vq_tasks.clients.rdb_writer import RdbWriter, payload_version
from vq_tasks.clients.redis_wire import client_error, command, server_error
from vq_tasks.errors import BackupError, PermanentError, TransientError, redact
from vq_tasks.streams.stages import CHUNK_SIZE, Writer

BATCH_SIZE = 1000  # keys per SCAN and per pipelined batch of DUMPs
BATCH_BYTES = 4 << 20  # fewer keys per batch when values are large: the server buffers a batch's replies
RECV_SIZE = 256 << 10  # bytes received at a time; runs of replies are split in C from a buffer of it
HUGE = 8 << 20  # payloads longer are streamed into the RDB, never held whole (well above RECV_SIZE)
RUN = 64  # replies read at once (split at CRLF) after which another run is worth trying
CRLF = b"\r\n"
HEADS = [b"$%d" % length for length in range(4096)]  # bulk string headers, by length
DUMP = b"*2\r\n$4\r\nDUMP\r\n"
PEXPIRETIME = b"*2\r\n$11\r\nPEXPIRETIME\r\n"  # Redis 7+: the absolute time, as the server keeps it
PTTL = b"*2\r\n$4\r\nPTTL\r\n"  # before Redis 7: the time left, added to the server's TIME
TIME = command("TIME")
NO_KEY = -2  # PEXPIRETIME and PTTL of a key that is not there; -1: no expiry
NO_EXPIRY_REPLY = b":-1\r\n"
INTEGER_LINE = 24  # the longest integer reply: ":", a sign, 19 digits, CRLF
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
    server: tuple[str, Mapping[str, int], Mapping[str, int]] | None = None,
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
    with _borrowed(client_for_db(first)) as wire:
        output = _begin(wire, out, server, facts)
        if databases:
            _snapshot_db(wire, first, output, facts, batch_size, batch_bytes)
    for db in rest:
        with _borrowed(client_for_db(db)) as wire:
            _snapshot_db(wire, db, output, facts, batch_size, batch_bytes)
    info = output.finish()
    facts.rdb_version, facts.size, facts.finished = info.rdb_version, info.size, time.time()
    facts.keys = {str(db): n for db, n in output.keys.items()}
    facts.expires = {str(db): n for db, n in output.expires.items()}
    return facts


def _begin(
    wire: _Wire,
    out: Writer,
    server: tuple[str, Mapping[str, int], Mapping[str, int]] | None,
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


def _add_functions(wire: _Wire, output: _Output, redis_version: str) -> bool:
    """Write the server's function libraries (Redis 7+) before any key, and so learn its RDB
    version. Return whether they are in; they are not when the server or the user has no
    FUNCTION DUMP."""
    if _release(redis_version) < (7, 0):
        return False
    wire.send(command("FUNCTION", "DUMP"))
    try:
        payload = wire.bulk()
    except PermanentError:
        return False  # denied to this user, or renamed away
    if payload is None:
        return False
    output.start(payload_version(payload)).add_functions(payload)
    return True


class _Keys(NamedTuple):
    """Keys from a SCAN reply, the header of each there ($length), and, when they came in one
    piece, the reply's bytes for them: $length CRLF key CRLF, as commands take keys too."""

    names: list[bytes]
    heads: list[bytes]
    raw: bytes | None = None


def _snapshot_db(
    wire: _Wire, db: int, output: _Output, facts: LogicalFacts, batch_size: int, batch_bytes: int
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
    pending: _Keys | None = None
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


def _fetch(keys: _Keys, absolute: bool) -> bytes:
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
    wire: _Wire, db: int, keys: list[bytes], absolute: bool, output: _Output, facts: LogicalFacts
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


def _stream(wire: _Wire, db: int, key: bytes, expiry: int, output: _Output, facts: LogicalFacts) -> int:
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


def _fresh(keys: _Keys, seen: set[int], facts: LogicalFacts) -> _Keys:
    """Given keys SCAN returned, return those not seen before in this database (by 64-bit
    digest), counting the others, and add them to ``seen``."""
    if seen.isdisjoint(map(hash, keys.names)):  # bytes keep their hash: the next map is cheap
        before = len(seen)
        seen.update(map(hash, keys.names))
        if len(seen) - before == len(keys.names):
            return keys
        seen.difference_update(map(hash, keys.names))  # a key twice in one reply: none was seen before
    fresh = _Keys([], [])
    for name, head in zip(keys.names, keys.heads, strict=True):
        digest = hash(name)
        if digest in seen:
            facts.duplicates += 1
        else:
            seen.add(digest)
            fresh.names.append(name)
            fresh.heads.append(head)
    return fresh


def _fitting(heads: list[bytes], bodies: list[bytes]) -> int:
    """Given the headers and contents of bulk strings as split at CRLF, return how many of the
    first fit: a header stating its content's length (a content holding CRLF was cut short)."""
    sizes = list(map(len, bodies))
    if sizes and max(sizes) < len(HEADS):
        stated = list(map(HEADS.__getitem__, sizes))
    else:
        stated = list(map(b"$%d".__mod__, sizes))
    if heads == stated:
        return len(heads)
    return list(map(operator.eq, heads, stated)).index(False)


def _where(options: Mapping[str, object]) -> str:
    """Given a redis-py pool's connection options, return how messages name the server."""
    if options.get("path"):
        return f"Redis {options['path']}"
    host, port = options.get("host", "localhost"), options.get("port", 6379)
    return f"Redis [{host}]:{port}" if ":" in str(host) else f"Redis {host}:{port}"


@contextmanager
def _borrowed(client: redis.Redis) -> Iterator[_Wire]:
    """Borrow a connection of ``client`` from its pool as a _Wire (authenticated, its database
    selected, TLS-wrapped with TLS, as redis-py connects), and give it back after: disconnected
    first if replies may be left unread."""
    options = client.connection_pool.connection_kwargs
    where, password = _where(options), options.get("password")
    pool = client.connection_pool
    try:
        connection = pool.get_connection()
    except redis.exceptions.RedisError as exc:
        raise client_error(exc, where, password if isinstance(password, str) else None) from None
    wire = None
    try:
        sock = connection._sock  # redis-py's socket, every reply to its commands read
        if sock is None:
            raise TransientError(f"cannot reach {where}: redis-py gave a closed connection")
        wire = _Wire(sock, where, [password] if isinstance(password, str) and password else [])
        yield wire
    finally:
        if wire is None or not wire.idle():
            connection.disconnect()
        pool.release(connection)


class _Wire:
    """Commands out and replies in on a connected socket (``sendall``, ``recv``, ``recv_into``):
    commands as RESP bytes, replies parsed here from one buffer, RESP2 or RESP3, errors turned
    into ours naming ``where`` (without ``secrets``)."""

    huge = 0  # the length of the payload bulks() stopped at

    def __init__(self, sock: socket.socket, where: str, secrets: list[str]):
        self.where = where
        self.secrets = secrets
        self._sock = sock
        self._buffer = b""
        self._pos = 0
        self._clean = True
        self._kept = 0  # how many times the buffer was replaced (received into, or cut)

    def idle(self) -> bool:
        """Whether every reply was read whole: the connection can serve another command."""
        return self._clean and self._pos == len(self._buffer)

    def send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise self._lost(exc) from None

    def server_facts(self) -> tuple[str, dict[str, int], dict[str, int]]:
        """Return the server's version and its keys and expiring keys per database, from INFO,
        as redis_wire.server_facts does."""
        self.send(command("INFO", "server") + command("INFO", "keyspace"))
        server, keyspace = self._info(), self._info()
        keys, expires = {}, {}
        for name, value in keyspace.items():
            if name.startswith("db") and name[2:].isdigit():
                stats = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
                keys[name[2:]], expires[name[2:]] = int(stats.get("keys", 0)), int(stats.get("expires", 0))
        return server.get("redis_version", ""), keys, expires

    def _info(self) -> dict[str, str]:
        text = (self.bulk() or b"").decode(errors="replace")
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and line[0] != "#")

    def scan_reply(self) -> tuple[bytes, _Keys]:
        """Read a reply to SCAN: the next cursor and the keys, with the bytes they came in when
        received in one piece (commands take keys as SCAN gives them)."""
        if self._line() != b"*2":
            raise self._unexpected(b"no SCAN reply")
        cursor = self.bulk()
        count = self._line()
        if cursor is None or count[:1] != b"*":
            raise self._unexpected(count)
        self._keep(self._buffer[self._pos :])
        kept = self._kept
        heads, names = self.bulks(int(count[1:]), whole=True)
        if None in names:
            raise self._unexpected(b"a nil key")
        raw = self._buffer[: self._pos] if self._kept == kept else None  # all in one piece
        return cursor, _Keys(names, heads, raw)  # type: ignore[arg-type]  # no None

    def integers(self, count: int) -> list[int]:
        """Read ``count`` integer replies: at once (C loops) once they have all come, else, when
        another reply is among them, one by one."""
        while True:
            pos = self._pos
            if self._buffer.startswith(NO_EXPIRY_REPLY * count, pos):  # most keys have no expiry
                self._pos = pos + len(NO_EXPIRY_REPLY) * count
                return [-1] * count
            region = self._buffer[pos : pos + count * INTEGER_LINE]
            lines = region.split(CRLF, count)
            whole = min(count, len(lines) - 1)  # lines received with their CRLF
            used = len(region) - len(lines[-1]) if whole < count else len(region) - len(lines[count])
            if whole and (region[:1] != b":" or region.count(b"\r\n:", 0, used) != whole - 1):
                return [self.integer() for _ in range(count)]  # not all integers: let integer() say
            if whole == count:
                self._pos = pos + used
                return [int(line[1:]) for line in lines[:count]]
            if len(region) == count * INTEGER_LINE:
                return [self.integer() for _ in range(count)]  # longer lines: not all integers
            self._fill()

    def bulks(self, count: int, whole: bool = False) -> tuple[list[bytes], list[bytes | None]]:
        """Read up to ``count`` bulk string replies: their headers ($length) and contents (None
        for nil). Unless ``whole``, stop at the header of one longer than HUGE, whose length
        ``self.huge`` then says: it is for ``stream``. Runs of replies go at C speed
        (_split_bulks), the rest one by one; after a short run, all the rest."""
        heads: list[bytes] = []
        found: list[bytes | None] = []
        while len(found) < count:
            run_heads, run, waiting = self._split_bulks(count - len(found))
            heads += run_heads
            found += run
            if len(found) == count:
                break
            if waiting and len(self._buffer) - self._pos < RECV_SIZE // 2:
                self._fill()  # the next reply has not all come, and it is not a long one
                continue
            step = 1 if len(run) >= RUN else count - len(found)
            more_heads, more = self._one_by_one(step, None if whole else HUGE)
            heads += more_heads
            found += more
            if len(more) < step:
                break  # at a payload too large to hold
        return heads, found

    def _split_bulks(self, count: int) -> tuple[list[bytes], list[bytes], bool]:
        """Read the longest run, up to ``count``, of bulk string replies received whole and
        without CRLF inside: split at CRLF, checked against their stated lengths. Return their
        headers and contents, and whether the run ended at a bulk string not received whole."""
        if self._pos:
            self._keep(self._buffer[self._pos :])
        parts = self._buffer.split(CRLF, 2 * count)
        pairs = (len(parts) - 1) // 2  # with both CRLFs received
        heads, bodies = parts[0 : 2 * pairs : 2], parts[1 : 2 * pairs : 2]
        good = _fitting(heads, bodies)
        if good:
            self._pos = sum(map(len, parts[: 2 * good])) + 4 * good
        rest = parts[2 * good :]  # the next reply's first line, whole if its CRLF came, and more
        waiting = len(rest) == 1 or (len(rest) == 2 and rest[0][:1] == b"$" and rest[0] != b"$-1")
        return heads[:good], bodies[:good], waiting

    def _one_by_one(self, count: int, huge: int | None) -> tuple[list[bytes], list[bytes | None]]:
        """Read up to ``count`` bulk string replies one at a time, as ``bulks`` does."""
        heads: list[bytes] = []
        found: list[bytes | None] = []
        for _ in range(count):
            kind, length = self._bulk_header()
            if huge is not None and length > huge:
                self.huge = length
                break
            heads.append(b"$%d" % length)
            found.append(self._bulk_body(kind, length))
        return heads, found

    def stream(self, length: int) -> Iterator[bytes]:
        """Yield the ``length`` bytes of the bulk string whose header was read, as they come."""
        clean, self._clean = self._clean, False  # until the last chunk is read
        while length:
            if self._pos == len(self._buffer):
                self._fill()
            chunk = self._buffer[self._pos : self._pos + length]
            self._pos += len(chunk)
            length -= len(chunk)
            yield chunk
        self._blob(0)  # its CRLF
        self._clean = clean

    def time_ms(self) -> int:
        """Read a reply to TIME: the server's clock, in unix milliseconds."""
        if self._line() != b"*2":
            raise self._unexpected(b"no TIME reply")
        seconds, micros = self.bulk(), self.bulk()
        return int(seconds or 0) * 1000 + int(micros or 0) // 1000

    def integer(self) -> int:
        line = self._line()
        if line[:1] != b":":
            raise self._unexpected(line)
        return int(line[1:])

    def bulk(self) -> bytes | None:
        """Read a bulk string reply (None for nil; a RESP3 verbatim string without its format),
        whole."""
        return self._bulk_body(*self._bulk_header())

    def _bulk_header(self) -> tuple[bytes, int]:
        """Read a bulk string's header: its kind ($, or = for a verbatim string) and length (-1
        for nil)."""
        line = self._line()
        kind = line[:1]
        if kind == b"_":
            return b"$", -1
        if kind != b"$" and kind != b"=":
            raise self._unexpected(line)
        return kind, int(line[1:])

    def _bulk_body(self, kind: bytes, length: int) -> bytes | None:
        """Read the bulk string whose header said ``kind`` and ``length``."""
        if length < 0:
            return None
        end = self._pos + length
        if end + 2 > len(self._buffer):
            data = self._long_bulk(length)
        else:
            data = self._buffer[self._pos : end]
            self._pos = end + 2
        return data[4:] if kind == b"=" else data

    def _long_bulk(self, length: int) -> bytes:
        """Read a bulk string not received yet: straight into a buffer of its size."""
        data = bytearray(length + 2)
        view = memoryview(data)
        done = len(self._buffer) - self._pos
        view[:done] = self._buffer[self._pos :]
        self._keep(b"")
        while done < len(data):
            done += self._recv_into(view[done:])
        return bytes(view[:length])

    def _line(self) -> bytes:
        """Read the next reply's first line, skipping RESP3 push messages and attributes (which
        come between replies). Raise the server's error."""
        while True:
            end = self._buffer.find(b"\r\n", self._pos)
            while end < 0:
                self._fill()
                end = self._buffer.find(b"\r\n", self._pos)
            line = self._buffer[self._pos : end]
            self._pos = end + 2
            kind = line[:1]
            if kind == b">" or kind == b"|":
                self._skip(line)
                continue
            if kind == b"-" or kind == b"!":
                self._clean = False
                text = line[1:] if kind == b"-" else self._blob(int(line[1:]))
                raise self._refused(text.decode(errors="replace"))
            return line

    def _skip(self, line: bytes) -> None:
        """Given the first line of a reply, read the rest of it."""
        kind, count = line[:1], int(line[1:]) if line[1:].lstrip(b"-").isdigit() else 0
        if kind in b"$=!" and count >= 0:
            self._blob(count)
        elif kind in b"*>~":
            for _ in range(count):
                self._skip(self._line())
        elif kind in b"%|":
            for _ in range(2 * count):
                self._skip(self._line())

    def _blob(self, length: int) -> bytes:
        """Read ``length`` bytes and their CRLF."""
        while len(self._buffer) - self._pos < length + 2:
            self._fill()
        data = self._buffer[self._pos : self._pos + length]
        self._pos += length + 2
        return data

    def _fill(self) -> None:
        try:
            data = self._sock.recv(RECV_SIZE)
        except OSError as exc:
            raise self._lost(exc) from None
        if not data:
            raise TransientError(f"{self.where} closed the connection during the snapshot")
        self._keep(self._buffer[self._pos :] + data)

    def _keep(self, data: bytes) -> None:
        """Make ``data`` the buffer, read from its start."""
        self._buffer, self._pos = data, 0
        self._kept += 1

    def _recv_into(self, view: memoryview) -> int:
        try:
            received = self._sock.recv_into(view, min(len(view), CHUNK_SIZE))
        except OSError as exc:
            raise self._lost(exc) from None
        if not received:
            raise TransientError(f"{self.where} closed the connection during the snapshot")
        return received

    def _lost(self, exc: OSError) -> TransientError:
        self._clean = False
        if isinstance(exc, TimeoutError):
            return TransientError(f"{self.where} did not answer in time (REDIS_TIMEOUT)")
        return TransientError(f"lost the connection to {self.where}: {exc.strerror or exc}")

    def _refused(self, text: str) -> BackupError:
        if text.startswith("NOPERM"):
            text = redact(text, self.secrets)
            return PermanentError(
                f"{self.where} denies this user a command of the snapshot: allow INFO, SCAN, DUMP,"
                f" PEXPIRETIME (PTTL and TIME before Redis 7) on every key ({text})"
            )
        return server_error(text, self.where, self.secrets)

    def _unexpected(self, reply: bytes) -> PermanentError:
        self._clean = False
        shown = redact(reply[:80].decode(errors="backslashreplace"), self.secrets)
        return PermanentError(f"{self.where} sent {shown!r}, which is no reply to the snapshot's commands")
