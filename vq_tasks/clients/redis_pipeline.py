"""Pipelined Redis commands on a connection of redis-py's pool, used raw: commands out as RESP
bytes, replies parsed here from one buffer (RESP2 or RESP3) in C loops where they can be (runs of
replies split at CRLF, then checked against their stated lengths), errors turned into ours. For
the logical snapshot (sources/redis_logical.py), where redis-py's per-command work would be the
cost of a million keys. It reads redis-py's private ``Connection._sock``: a redis-py release that
renames it fails here first (tests/unit/sources/test_redis_logical_wire.py)."""

from __future__ import annotations

import operator
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import redis

from vq_tasks.clients.redis_wire import ServerFacts, client_error, command, redis_address, server_error
from vq_tasks.errors import BackupError, PermanentError, TransientError, redact
from vq_tasks.streams.stages import CHUNK_SIZE

RECV_SIZE = 256 << 10  # bytes received at a time; runs of replies are split in C from a buffer of it
HUGE = 8 << 20  # payloads longer are streamed into the RDB, never held whole (well above RECV_SIZE)
RUN = 64  # replies read at once (split at CRLF) after which another run is worth trying
CRLF = b"\r\n"
HEADS = [b"$%d" % length for length in range(4096)]  # bulk string headers, by length
NO_EXPIRY_REPLY = b":-1\r\n"
INTEGER_LINE = 24  # the longest integer reply: ":", a sign, 19 digits, CRLF


class Keys(NamedTuple):
    """Keys from a SCAN reply, the header of each there ($length), and, when they came in one
    piece, the reply's bytes for them: $length CRLF key CRLF, as commands take keys too."""

    names: list[bytes]
    heads: list[bytes]
    raw: bytes | None = None


def fitting(heads: list[bytes], bodies: list[bytes]) -> int:
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


def where_of(options: Mapping[str, object]) -> str:
    """Given a redis-py pool's connection options, return how messages name the server."""
    if options.get("path"):
        return f"Redis {options['path']}"
    return redis_address(str(options.get("host", "localhost")), str(options.get("port", 6379)))


@contextmanager
def borrowed(client: redis.Redis) -> Iterator[Wire]:
    """Borrow a connection of ``client`` from its pool as a Wire (authenticated, its database
    selected, TLS-wrapped with TLS, as redis-py connects), and give it back after: disconnected
    first if replies may be left unread. Whichever parser redis-py uses (hiredis' when installed,
    as it is: a dependency), it holds no byte of the socket here: the pool hands out a connection
    only once can_read() finds nothing buffered (ConnectionPool.ensure_connection)."""
    options = client.connection_pool.connection_kwargs
    where, password = where_of(options), options.get("password")
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
        wire = Wire(sock, where, [password] if isinstance(password, str) and password else [])
        yield wire
    finally:
        if wire is None or not wire.idle():
            connection.disconnect()
        pool.release(connection)


class Wire:
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

    def server_facts(self) -> ServerFacts:
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

    def scan_reply(self) -> tuple[bytes, Keys]:
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
        return cursor, Keys(names, heads, raw)  # type: ignore[arg-type]  # no None

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
        good = fitting(heads, bodies)
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
