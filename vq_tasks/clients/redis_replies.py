"""Replies parsed by hiredis (C) on a connection of our own, for the restore's stream of SCAN, DUMP
and PTTL replies: 5 to 8 times faster than redis_wire.ReplyReader's Python parsing, measured by
bench/redis_replies.py (docs/PERFORMANCE.md). ReplyReader stays for the rest: the RDB of SYNC, and
the transaction's QUEUED answers (compared many at once, faster than hiredis) and EXEC's reply
(counted as it comes; hiredis returns an array only whole, a million elements held at once).

Memory: hiredis holds the reply being received (one payload, whatever its size) and at most one
FEED_SIZE receive after it; its buffer keeps its largest size until it is next empty. A larger
receive is slower: after each reply hiredis moves what is left of its buffer to the front."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import hiredis

from vq_tasks.clients.redis_wire import Connection, RecvInto, server_error
from vq_tasks.errors import BackupError, PermanentError, TransientError, redact

FEED_SIZE = 32 << 10
WAITING = object()  # what hiredis returns until a reply has all come


class Replies:
    """Replies read from a ``recv_into``-like callable, after ``unread`` (bytes another reader
    received and did not read): errors of the server raised as ours, naming ``where`` (without
    ``secrets``)."""

    def __init__(self, recv_into: RecvInto, where: str, secrets: Sequence[str] = (), unread: bytes = b""):
        self._recv_into = recv_into
        self._reader = hiredis.Reader(notEnoughData=WAITING)
        self._reader.feed(unread)
        self._buffer = bytearray(FEED_SIZE)
        self._view = memoryview(self._buffer)
        self.where = where
        self.secrets = tuple(secrets)

    @classmethod
    def taking_over(cls, connection: Connection) -> Replies:
        """Return the replies of ``connection`` from now on: its ReplyReader is not read again."""
        reader = connection.reader
        return cls(connection.link.recv_into, connection.where, reader.secrets, reader.take_unread())

    def next(self) -> object:
        """Return the next reply: bytes (a bulk or status string), int, None (nil) or a list of
        them. Raise the server's error, TransientError if the connection closes first."""
        try:
            reply = self._reader.gets()
            while reply is WAITING:
                self._feed()
                reply = self._reader.gets()
        except hiredis.ProtocolError as exc:
            raise self._garbled(exc) from None
        if isinstance(reply, hiredis.ReplyError):
            raise server_error(str(reply), self.where, self.secrets)
        return reply

    def pairs(self, count: int) -> Iterator[tuple[bytes | None, int]]:
        """Yield the next ``count`` pairs of replies, a bulk string (None for nil) and an integer,
        as DUMP and PTTL of one key answer. Raise as ``next`` does, PermanentError for another
        reply. The hot loop of a restore: hiredis' gets() inlined."""
        gets = self._reader.gets
        try:
            for _ in range(count):
                payload = gets()
                while payload is WAITING:
                    self._feed()
                    payload = gets()
                ttl = gets()
                while ttl is WAITING:
                    self._feed()
                    ttl = gets()
                if (payload is None or type(payload) is bytes) and type(ttl) is int:
                    yield payload, ttl
                else:
                    raise self._wrong(ttl if payload is None or type(payload) is bytes else payload)
        except hiredis.ProtocolError as exc:
            raise self._garbled(exc) from None

    def _wrong(self, reply: object) -> BackupError:
        """Given a reply of another kind than awaited, return the error to raise: the server's own."""
        if isinstance(reply, hiredis.ReplyError):
            return server_error(str(reply), self.where, self.secrets)
        return self._unexpected(reply)

    def _unexpected(self, reply: object) -> PermanentError:
        """Given a reply that is not the one awaited, return the error to raise."""
        shown = redact(repr(reply), self.secrets)[:80]  # redact, then cut
        return PermanentError(f"{self.where} sent {shown}, which is not the reply awaited")

    def _garbled(self, exc: hiredis.ProtocolError) -> PermanentError:
        return PermanentError(f"{self.where} sent what is no Redis reply ({exc}): is it a Redis server?")

    def _feed(self) -> None:
        """Receive up to FEED_SIZE bytes into hiredis. Raise TransientError if the connection closed."""
        received = self._recv_into(self._view)
        if not received:
            raise TransientError(f"{self.where} closed the connection before its reply was complete")
        self._reader.feed(self._buffer, 0, received)  # type: ignore[arg-type]  # any buffer; the stub says bytes
