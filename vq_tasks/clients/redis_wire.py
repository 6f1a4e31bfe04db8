"""The Redis wire protocol on a connection of our own: commands encoded as RESP, replies parsed from
any ``recv_into``-like callable (so the parsing is tested without a socket), the server's facts
from INFO, and redis-py's and the server's errors turned into ours, transient or permanent, with the
password never in a message. Used by the dump (sources/redis.py) and by the restore."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import redis

from vq_tasks.clients.redis_connect import auth_args, open_socket, password_of, redis_client, tls_error
from vq_tasks.errors import BackupError, PermanentError, TransientError, redact
from vq_tasks.settings import Settings
from vq_tasks.streams.stages import CHUNK_SIZE

RecvInto = Callable[[memoryview], int]
MAX_LINE = 4096
KEEPALIVE = 0x0A  # a bare "\n", sent while the server prepares the RDB
TRANSIENT_CODES = ("LOADING", "MASTERDOWN", "BUSY", "TRYAGAIN")
REPLICATION = ("sync", "psync", "replconf")  # the commands a SYNC backup needs besides INFO
TRANSIENT_TEXTS = ("background save", "bgsave", "not connected with my master")


# a server's version, and its keys and expiring keys per database (numbers as strings), from INFO
ServerFacts = tuple[str, dict[str, int], dict[str, int]]


def server_facts(settings: Settings) -> ServerFacts:
    """Given settings naming a Redis, return its version and its keys and expiring keys per
    database (keyed by the database number as a string). Raise as dump_redis does."""
    password = password_of(settings)
    client = redis_client(settings)
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
    return redis_address(settings.redis_host, settings.redis_port)


def redis_address(host: str, port: int | str) -> str:
    """Return how messages name a Redis: "Redis host:port", an IPv6 host in brackets."""
    return f"Redis [{host}]:{port}" if ":" in host else f"Redis {host}:{port}"


def client_error(exc: redis.exceptions.RedisError, where: str, password: str | None) -> BackupError:
    """Given an error of redis-py, return the TransientError or PermanentError to raise."""
    errors = redis.exceptions
    text = redact(str(exc), [password] if password else [])
    failed_tls = tls_error(exc, where)
    if failed_tls is not None:
        return failed_tls
    if isinstance(exc, errors.AuthenticationError):
        if password is None:
            return PermanentError(f"{where} requires a password: set REDIS_PASSWORD ({text})")
        if "without any password configured" in text or "no password is set" in text:
            return server_error(text, where)
        return PermanentError(
            f"{where} refused the password (REDIS_PASSWORD) or user (REDIS_USERNAME): {text}"
        )
    if isinstance(exc, errors.BusyLoadingError | errors.MasterDownError):
        return TransientError(f"{where} cannot serve a copy yet: {text}")
    if isinstance(exc, errors.TimeoutError):
        return TransientError(f"{where} did not answer in time (REDIS_TIMEOUT): {text}")
    if isinstance(exc, errors.ConnectionError):
        return TransientError(f"cannot reach {where} (check REDIS_HOST, REDIS_PORT, REDIS_TLS): {text}")
    if isinstance(exc, errors.NoPermissionError):
        return server_error(f"NOPERM {text}", where)
    return server_error(text, where)


class ReplicationRefused(PermanentError):
    """The server refuses SYNC or REPLCONF (renamed away on a managed service, or not granted to
    the ACL user): the RDB cannot come over the replication protocol."""


def server_error(reply: str, where: str, secrets: Sequence[str] = ()) -> BackupError:
    """Given an error reply of Redis (without its "-"), return the error to raise: TransientError
    for a server that is busy or starting, PermanentError for anything a retry cannot fix."""
    text = redact(reply, secrets)
    code, lower = text.split(" ", 1)[0].upper(), text.lower()
    if code == "WRONGPASS" or "invalid password" in lower or "invalid username-password" in lower:
        return PermanentError(
            f"{where} refused the password (REDIS_PASSWORD) or user (REDIS_USERNAME): {text}"
        )
    if code == "NOAUTH":
        return PermanentError(f"{where} requires a password: set REDIS_PASSWORD ({text})")
    if "without any password configured" in lower or "no password is set" in lower:
        return PermanentError(
            f"{where} has no password but REDIS_PASSWORD is set: unset it or set requirepass ({text})"
        )
    named = any(f"{quote}{c}{quote}" in lower for c in REPLICATION for quote in "'`")  # 7.x: 'x', 6.x: `x`
    if (code == "NOPERM" or "unknown command" in lower) and named:
        return ReplicationRefused(
            f"{where} will not replicate to us ({text}): REDIS_BACKUP_METHOD=auto or dump takes a logical "
            "snapshot instead; or allow REPLCONF and SYNC"
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
    """A socket to the Redis (TLS when REDIS_TLS, as redis_connect.open_socket makes it) whose
    failures become TransientErrors naming the server, or PermanentErrors for TLS failures a
    retry cannot fix (the server's certificate, a client certificate wanted)."""

    def __init__(self, settings: Settings):
        self.where = _where(settings)
        self._timeout = settings.redis_timeout
        try:
            self._sock = open_socket(settings)
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

    def _error(self, exc: OSError, doing: str) -> BackupError:
        failed_tls = tls_error(exc, self.where)
        if failed_tls is not None:
            return failed_tls
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
            login = auth_args(settings.redis_username, password)
            if login:
                self.call(*login)
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

    def take_unread(self) -> bytes:
        """Return the bytes received and not read yet, and forget them: another reader goes on
        with the connection (redis_replies.Replies)."""
        data = bytes(self._view[self._start : self._end])
        self._start = self._end = 0
        return data

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
