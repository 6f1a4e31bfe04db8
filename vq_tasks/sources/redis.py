"""Dump a Redis as ``redis-cli --rdb`` does: ask for a full resync over the replication protocol and
stream the RDB the server sends, checking it as it passes (the ``REDIS`` header and version, and the
CRC64 in its trailer) without ever holding it in memory.

The parsing works on any ``recv_into``-like callable, so it is tested without a socket.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import anycrc
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from vq_tasks.errors import BackupError, PermanentError, TransientError, redact
from vq_tasks.manifest import RedisFacts
from vq_tasks.settings import Settings
from vq_tasks.streams import CHUNK_SIZE, Writer

RecvInto = Callable[[memoryview], int]
CRC64 = anycrc.Model("CRC64-REDIS")
MAGIC = b"REDIS"
HEADER_SIZE = 9  # b"REDIS" and four digits of RDB version
TRAILER_SIZE = 9  # the EOF opcode and the little-endian CRC64 of everything before the CRC
EOF_OPCODE = 0xFF
MIN_RDB_VERSION = 5  # the first with a CRC64 trailer (Redis 2.6)
MARK_SIZE = 40
MAX_LINE = 4096
KEEPALIVE = 0x0A  # a bare "\n", sent while the server prepares the RDB
TRANSIENT_CODES = ("LOADING", "MASTERDOWN", "BUSY", "TRYAGAIN")
TRANSIENT_TEXTS = ("background save", "bgsave", "not connected with my master")


class RdbInfo(NamedTuple):
    rdb_version: int
    crc64_checked: bool
    size: int


def dump_redis(settings: Settings, out: Writer) -> RedisFacts:
    """Stream the RDB of the Redis at settings.redis_host:redis_port into `out` and return its facts.

    Given settings naming a Redis, take its version and keys per database from INFO, then stream
    its RDB into ``out`` and return both. Raise TransientError when a retry may help (refused,
    timed out, loading, checksum mismatch), PermanentError when it cannot (password, permissions,
    not an RDB).
    """
    redis_version, keys, expires = server_facts(settings)
    password = password_of(settings)
    link = Link(settings)
    try:
        reader = ReplyReader(link.recv_into, link.where, secrets=[password] if password else [])
        request_rdb(link.send, reader, password)
        rdb = read_rdb(reader, out)
    finally:
        link.close()  # without rdb-only, the server would go on streaming its commands
    return RedisFacts(
        redis_version=redis_version,
        rdb_version=rdb.rdb_version,
        keys=keys,
        expires=expires,
        crc64_checked=rdb.crc64_checked,
    )


def server_facts(settings: Settings) -> tuple[str, dict[str, int], dict[str, int]]:
    """Given settings naming a Redis, return its version and its keys and expiring keys per
    database (keyed by the database number as a string). Raise as dump_redis does."""
    password = password_of(settings)
    client = redis.Redis(
        host=settings.redis_host,
        port=settings.redis_port,
        password=password,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        retry=Retry(NoBackoff(), 0),  # the task retries, with backoff
    )
    try:
        server = client.info("server")
        keyspace = client.info("keyspace")
    except redis.exceptions.RedisError as exc:
        raise client_error(exc, _where(settings), password) from None
    finally:
        client.close()
    databases = {name[2:]: stats for name, stats in keyspace.items() if name.startswith("db")}
    keys = {db: int(stats["keys"]) for db, stats in databases.items()}
    expires = {db: int(stats.get("expires", 0)) for db, stats in databases.items()}
    return str(server["redis_version"]), keys, expires


def _where(settings: Settings) -> str:
    """Given settings, return how messages name the Redis: "Redis host:port"."""
    host = settings.redis_host
    return f"Redis [{host}]:{settings.redis_port}" if ":" in host else f"Redis {host}:{settings.redis_port}"


def password_of(settings: Settings) -> str | None:
    secret = settings.redis_password
    if secret is None:
        return None
    return secret.get_secret_value() or None


def client_error(exc: redis.exceptions.RedisError, where: str, password: str | None) -> BackupError:
    """Given an error of redis-py, return the TransientError or PermanentError to raise."""
    errors = redis.exceptions
    text = redact(str(exc), [password] if password else [])
    if isinstance(exc, errors.AuthenticationError):
        if password is None:
            return PermanentError(f"{where} requires a password: set REDIS_PASSWORD ({text})")
        if "without any password configured" in text or "no password is set" in text:
            return server_error(text, where)
        return PermanentError(f"{where} refused the password (REDIS_PASSWORD): {text}")
    if isinstance(exc, errors.BusyLoadingError | errors.MasterDownError):
        return TransientError(f"{where} cannot serve a copy yet: {text}")
    if isinstance(exc, errors.TimeoutError):
        return TransientError(f"{where} did not answer in time (REDIS_TIMEOUT): {text}")
    if isinstance(exc, errors.ConnectionError):
        return TransientError(f"cannot reach {where} (check REDIS_HOST, REDIS_PORT): {text}")
    if isinstance(exc, errors.NoPermissionError):
        return server_error(f"NOPERM {text}", where)
    return server_error(text, where)


def server_error(reply: str, where: str, secrets: Sequence[str] = ()) -> BackupError:
    """Given an error reply of Redis (without its "-"), return the error to raise: TransientError
    for a server that is busy or starting, PermanentError for anything a retry cannot fix."""
    text = redact(reply, secrets)
    code, lower = text.split(" ", 1)[0].upper(), text.lower()
    if code == "WRONGPASS" or "invalid password" in lower or "invalid username-password" in lower:
        return PermanentError(f"{where} refused the password (REDIS_PASSWORD): {text}")
    if code == "NOAUTH":
        return PermanentError(f"{where} requires a password: set REDIS_PASSWORD ({text})")
    if "without any password configured" in lower or "no password is set" in lower:
        return PermanentError(
            f"{where} has no password but REDIS_PASSWORD is set: unset it or set requirepass ({text})"
        )
    if code == "NOPERM":
        return PermanentError(f"{where} denies this user a command: allow INFO, REPLCONF and SYNC ({text})")
    if code in TRANSIENT_CODES or any(part in lower for part in TRANSIENT_TEXTS):
        return TransientError(f"{where} cannot serve a copy yet: {text}")
    return PermanentError(f"{where} answered with an error: {text}")


def command(*args: str | bytes | int) -> bytes:
    """Given a command and its arguments, return them encoded in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class Link:
    """A socket to the Redis whose failures become TransientErrors naming the server."""

    def __init__(self, settings: Settings):
        self.where = _where(settings)
        self._timeout = settings.redis_timeout
        try:
            address = (settings.redis_host, settings.redis_port)
            self._sock = socket.create_connection(address, timeout=self._timeout)
        except OSError as exc:
            raise self._error(exc, "cannot connect to") from None

    def send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise self._error(exc, "lost the connection to") from None

    def recv_into(self, view: memoryview) -> int:
        try:
            return self._sock.recv_into(view)
        except OSError as exc:
            raise self._error(exc, "lost the connection to") from None

    def set_timeout(self, seconds: float) -> None:
        """Wait up to ``seconds`` for each send and receive from now on."""
        self._timeout = seconds
        self._sock.settimeout(seconds)

    def close(self) -> None:
        self._sock.close()

    def _error(self, exc: OSError, doing: str) -> TransientError:
        if isinstance(exc, TimeoutError):
            return TransientError(f"{self.where} did not answer within {self._timeout:g} s (REDIS_TIMEOUT)")
        reason = exc.strerror or str(exc) or type(exc).__name__
        return TransientError(f"{doing} {self.where} (check REDIS_HOST, REDIS_PORT): {reason}")


class Connection:
    """A connection of our own to the Redis of ``settings`` (named ``where`` in messages, if given),
    authenticated: raw commands go out with ``send``, replies are read one at a time from
    ``reader``. For streams of many commands, where redis-py's per-command work is the cost."""

    def __init__(self, settings: Settings, where: str | None = None):
        password = password_of(settings)
        self.link = Link(settings)
        self.where = self.link.where = where or self.link.where
        self.reader = ReplyReader(self.link.recv_into, self.where, [password] if password else [])
        try:
            if password:
                self.call("AUTH", password)
        except BaseException:
            self.close()
            raise

    def send(self, data: bytes) -> None:
        self.link.send(data)

    def call(self, *args: str) -> None:
        """Send one command and read its status reply. Raise the server's error."""
        call(self.link.send, self.reader, *args)

    def close(self) -> None:
        self.link.close()


def request_rdb(send: Callable[[bytes], object], reader: ReplyReader, password: str | None) -> None:
    """Given a way to send to a Redis and a reader of its replies, authenticate if ``password``,
    then ask for a full resync: diskless if the server is set so, and the RDB only, with no
    command stream after it (older servers refuse that option, which is harmless). Raise the
    server's error as server_error classifies it."""
    if password:
        call(send, reader, "AUTH", password)
    call(send, reader, "REPLCONF", "capa", "eof")
    call(send, reader, "REPLCONF", "rdb-only", "1", optional=True)
    send(command("SYNC"))


def call(send: Callable[[bytes], object], reader: ReplyReader, *args: str, optional: bool = False) -> None:
    """Send one command and read its status reply. Raise the server's error, unless ``optional``
    and the server only does not know the option."""
    send(command(*args))
    reply = reader.line()
    if reply.startswith(b"+"):
        return
    if reply.startswith(b"-"):
        text = reply[1:].decode(errors="replace")
        if optional and "unrecognized replconf option" in text.lower():
            return
        raise server_error(text, reader.where, reader.secrets)
    raise reader.unexpected(reply)


class ReplyReader:
    """Reads replies from a ``recv_into``-like callable through one reused buffer: reply lines,
    then a bulk payload as views into that buffer, each valid until the next is asked for."""

    def __init__(
        self, recv_into: RecvInto, where: str = "Redis", secrets: Sequence[str] = (), size: int = CHUNK_SIZE
    ):
        self._recv_into = recv_into
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0
        self._max_line = min(MAX_LINE, size)
        self.where = where
        self.secrets = tuple(secrets)

    def line(self) -> bytes:
        """Return the next reply line without its CRLF, skipping bare "\\n" keepalives. Raise
        TransientError if the connection closes first, PermanentError if no line comes."""
        while True:
            while self._start < self._end and self._buffer[self._start] == KEEPALIVE:
                self._start += 1
            end = self._buffer.find(b"\r\n", self._start, self._end)
            if end >= 0:
                line = bytes(self._view[self._start : end])
                self._start = end + 2
                return line
            if self._end - self._start >= self._max_line:
                raise self.unexpected(bytes(self._view[self._start : self._end]))
            self._fill()

    def exactly(self, length: int) -> Iterator[memoryview]:
        """Yield the next ``length`` bytes. Raise TransientError if the connection closes first."""
        while length:
            if self._start == self._end:
                self._fill()
            size = min(length, self._end - self._start)
            yield self._view[self._start : self._start + size]
            self._start += size
            length -= size

    def until_mark(self, mark: bytes) -> Iterator[memoryview]:
        """Yield the bytes before ``mark``, which ends the data, and consume the mark. As Redis's
        replicas do, look for it at the end of what each receive brings (the server sends nothing
        after it until the replica acknowledges). Raise TransientError if the connection closes."""
        size = len(mark)
        while True:
            ready = self._end - self._start
            if ready >= size and self._view[self._end - size : self._end] == mark:
                if ready > size:
                    yield self._view[self._start : self._end - size]
                self._start = self._end
                return
            if ready > size:  # keep a possible start of the mark for the next receive
                yield self._view[self._start : self._end - size]
                self._start = self._end - size
            self._fill()

    def bulk(self) -> bytes | None:
        """Return the next reply, a bulk string (None for nil), whole. Raise the server's error."""
        line = self._reply(b"$")
        if line == b"$-1":
            return None
        if not line[1:].isdigit():
            raise self.unexpected(line)
        length = int(line[1:])
        if self._end - self._start >= length + 2:  # all received already: one copy, no generator
            data = bytes(self._view[self._start : self._start + length])
            self._start += length + 2
            return data
        return b"".join([bytes(view) for view in self.exactly(length + 2)])[:-2]

    def array_length(self) -> int:
        """Return the next reply's element count, an array's (the elements follow). Raise the
        server's error."""
        line = self._reply(b"*")
        if not line[1:].isdigit():
            raise self.unexpected(line)
        return int(line[1:])

    def skip_repeated(self, reply: bytes, count: int) -> int:
        """Consume the next replies while they are exactly ``reply`` (such as ``+QUEUED\r\n``),
        at most ``count`` of them, comparing many at a time; return how many were consumed. The
        first other reply stays, for ``line`` to read. Raise TransientError if the connection
        closes first."""
        size, done = len(reply), 0
        while done < count:
            ready = (self._end - self._start) // size
            if not ready:
                if self._view[self._start : self._end] != reply[: self._end - self._start]:
                    break  # another reply has begun: it may be all the server sends
                self._fill()
                continue
            take = min(ready, count - done)
            if self._view[self._start : self._start + take * size] != reply * take:
                break
            self._start += take * size
            done += take
        while done < count and self._view[self._start : self._start + size] == reply:
            self._start += size  # the replies before the first other one
            done += 1
        return done

    def integer(self) -> int:
        """Return the next reply, an integer. Raise the server's error."""
        line = self._reply(b":")
        try:
            return int(line[1:])
        except ValueError:
            raise self.unexpected(line) from None

    def _reply(self, kind: bytes) -> bytes:
        """Return the next reply line, which must be of ``kind``. Raise the server's error."""
        line = self.line()
        if line.startswith(b"-"):
            raise server_error(line[1:].decode(errors="replace"), self.where, self.secrets)
        if not line.startswith(kind):
            raise self.unexpected(line)
        return line

    def unexpected(self, reply: bytes) -> PermanentError:
        """Given a reply that is not Redis's, return the error to raise."""
        shown = repr(redact(reply.decode(errors="backslashreplace"), self.secrets)[:80])  # redact, then cut
        return PermanentError(
            f"{self.where} sent {shown}, which is no reply to a replica: is it a Redis server"
            " (check REDIS_HOST, REDIS_PORT)?"
        )

    def _fill(self) -> None:
        """Receive more bytes after those kept. Raise TransientError if the connection closed."""
        if self._start:
            kept = self._end - self._start
            self._buffer[:kept] = bytes(self._view[self._start : self._end])
            self._start, self._end = 0, kept
        received = self._recv_into(self._view[self._end :])
        if not received:
            raise TransientError(f"{self.where} closed the connection before its reply was complete")
        self._end += received


def read_rdb(reader: ReplyReader, out: Writer) -> RdbInfo:
    """Given a reader at the reply to SYNC, stream the RDB it announces into ``out`` in chunks of
    at most the reader's buffer size, checking it on the way, and return its version, whether its
    CRC64 was checked, and its size. Raise as RdbCheck and ReplyReader do, or the server's error."""
    line = reader.line()
    if line.startswith(b"-"):
        raise server_error(line[1:].decode(errors="replace"), reader.where, reader.secrets)
    if line.startswith(b"$EOF:") and len(line) == 5 + MARK_SIZE:
        chunks = reader.until_mark(line[5:])  # diskless: the end is marked, the size unknown
    elif line.startswith(b"$") and line[1:].isdigit():
        chunks = reader.exactly(int(line[1:]))
    else:
        raise reader.unexpected(line)
    check = RdbCheck(reader.where)
    for view in chunks:
        data = bytes(view)
        check.feed(data)
        out.write(data)
    return check.finish()


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
