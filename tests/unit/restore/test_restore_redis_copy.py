"""The restore's reading without servers, its replies cut at every byte: copy_database turns SCAN,
DUMP and PTTL replies (read by hiredis) into RESTOREs; the transaction skips QUEUED answers, counts
EXEC's reply and reports an error inside it as a partial restore."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.unit.clients.test_redis_replies import Feed, bulk
from vq_tasks.clients.redis_replies import Replies
from vq_tasks.clients.redis_wire import ReplyReader
from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.restore import redis_transaction
from vq_tasks.restore.redis import RESTORE, copy_database
from vq_tasks.restore.redis_transaction import Transaction

WHERE = "Redis 127.0.0.1:6390"
SECRET = "target-Pa$$"


def every_cut(stream: bytes) -> list[list[bytes]]:
    """The stream in two pieces cut at every byte, then a byte at a time."""
    cuts = [[stream[:cut], stream[cut:]] for cut in range(len(stream) + 1)]
    return [*cuts, [stream[i : i + 1] for i in range(len(stream))]]


class Sent:
    """A connection's sending side: what was sent, and where it goes."""

    where = WHERE

    def __init__(self) -> None:
        self.data = b""

    def send(self, data: bytes) -> None:
        self.data += data


class Queue:
    """A transaction that keeps what is queued."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []
        self.databases: list[str] = []

    def use(self, db: str) -> None:
        self.databases.append(db)

    def queue_encoded(self, data: bytes) -> None:
        self.commands.append(data)


def scan_reply(cursor: int, keys: list[bytes]) -> bytes:
    return b"*2\r\n%b*%d\r\n%b" % (bulk(b"%d" % cursor), len(keys), b"".join(map(bulk, keys)))


def restore(key: bytes, ttl: bytes, payload: bytes) -> bytes:
    return RESTORE % (len(key), key, len(ttl), ttl, len(payload), payload)


# two SCAN batches: a key gone since SCAN (nil), one expiring now (PTTL 0), one gone (-2)
STREAM = (
    scan_reply(17, [b"a", b"b\r\nc", b"gone"])
    + bulk(b"\x00pa\r\nyload") + b":-1\r\n"
    + bulk(b"\x00two") + b":1500\r\n"
    + bulk(None) + b":-2\r\n"
    + scan_reply(0, [b"now", b"late", b"x"])
    + bulk(b"\x00now") + b":0\r\n"
    + bulk(b"\x00late") + b":-2\r\n"
    + bulk(b"\x00x") + b":86400000\r\n"
)  # fmt: skip
RESTORES = [
    restore(b"a", b"0", b"\x00pa\r\nyload"),
    restore(b"b\r\nc", b"1500", b"\x00two"),
    restore(b"x", b"86400000", b"\x00x"),
]


def copy(pieces: list[bytes]) -> tuple[tuple[int, int], Queue, Sent]:
    sent, queue = Sent(), Queue()
    session = SimpleNamespace(dump_connection=lambda db: (sent, Replies(Feed(pieces), WHERE)))
    return copy_database(session, queue, "3", 3, None), queue, sent  # type: ignore[arg-type]


def test_copy_turns_replies_into_restores_in_any_cut():
    for pieces in every_cut(STREAM):
        counts, queue, sent = copy(pieces)
        assert counts == (3, 3) and queue.commands == RESTORES and queue.databases == ["3"]
        assert sent.data.count(b"SCAN") == 2 and sent.data.count(b"DUMP") == 6


def test_a_payload_larger_than_a_receive_is_restored_whole():
    payload = bytes(range(256)) * 1000
    stream = scan_reply(0, [b"big", b"small"]) + bulk(payload) + b":-1\r\n" + bulk(b"s") + b":7\r\n"
    for pieces in ([stream], [stream[i : i + 4099] for i in range(0, len(stream), 4099)]):
        counts, queue, _ = copy(pieces)
        assert counts == (2, 0)
        assert queue.commands == [restore(b"big", b"0", payload), restore(b"small", b"7", b"s")]


def test_copy_reports_the_servers_error():
    stream = scan_reply(0, [b"a"]) + b"-ERR no such command 'DUMP'\r\n" + b":-1\r\n"
    with pytest.raises(PermanentError, match=f"{WHERE} answered with an error: ERR no such command"):
        copy([stream])


def test_a_scan_reply_without_cursor_is_refused():
    with pytest.raises(PermanentError, match="answered SCAN with no cursor"):
        copy([b"*2\r\n$1\r\nx\r\n*0\r\n"])
    with pytest.raises(PermanentError, match="answered SCAN with no cursor"):
        copy([b"+OK\r\n"])


def test_copy_cut_short_is_transient():
    with pytest.raises(TransientError, match="closed the connection"):
        copy([STREAM[:-5]])


class FakeConnection:
    """Transaction's connection: replies from ``replies``, MULTI's +OK first."""

    def __init__(self, settings: object) -> None:
        self.where = WHERE
        self.reader = ReplyReader(Feed(FakeConnection.pieces), WHERE, [SECRET])
        self.link = SimpleNamespace(set_timeout=lambda seconds: None)
        self.sent = b""

    def send(self, data: bytes) -> None:
        self.sent += data

    def call(self, *args: str) -> None:
        assert args == ("MULTI",) and self.reader.line() == b"+OK"

    def close(self) -> None:
        pass

    pieces: list[bytes] = []


def transaction(monkeypatch: pytest.MonkeyPatch, pieces: list[bytes]) -> Transaction:
    """A Transaction of batches of 2 commands reading ``pieces`` (after MULTI's +OK)."""
    monkeypatch.setattr(redis_transaction, "Connection", FakeConnection)
    monkeypatch.setattr(FakeConnection, "pieces", [b"+OK\r\n", *pieces])
    return Transaction(SimpleNamespace(redis_timeout=5.0), batch=2)  # type: ignore[arg-type]


def queue_five(done: Transaction) -> None:
    done.use("0")
    for number in range(4):
        done.queue("SET", f"k{number}", number)


def test_queued_answers_are_skipped_and_exec_counted_in_any_cut(monkeypatch: pytest.MonkeyPatch):
    stream = b"+QUEUED\r\n" * 5 + b"*5\r\n+OK\r\n+OK\r\n:1\r\n+OK\r\n+OK\r\n"
    for pieces in every_cut(stream):
        done = transaction(monkeypatch, pieces)
        queue_five(done)
        assert done.queued == 4  # sent in two batches of two; the fifth at execute
        assert done.execute() == 5


def test_a_refusal_while_queueing_is_raised_in_any_cut(monkeypatch: pytest.MonkeyPatch):
    stream = b"+QUEUED\r\n" * 3 + b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
    for pieces in every_cut(stream):
        done = transaction(monkeypatch, pieces)
        with pytest.raises(PermanentError, match="no room for the restore"):
            queue_five(done)


def test_an_error_inside_exec_is_a_partial_restore_in_any_cut(monkeypatch: pytest.MonkeyPatch):
    error = f"-ERR Bad data format ({SECRET})\r\n".encode()
    stream = b"+QUEUED\r\n" * 5 + b"*5\r\n+OK\r\n" + error + b":1\r\n-ERR second\r\n+OK\r\n"
    for pieces in every_cut(stream):
        done = transaction(monkeypatch, pieces)
        queue_five(done)
        with pytest.raises(PermanentError) as caught:
            done.execute()
        message = str(caught.value)
        assert "2 of its 5 commands failed (the first: ERR Bad data format (***))" in message
        assert "partly restored" in message and SECRET not in message


def test_exec_refused_or_cut_short(monkeypatch: pytest.MonkeyPatch):
    done = transaction(monkeypatch, [b"+QUEUED\r\n" * 5 + b"-EXECABORT Transaction discarded\r\n"])
    queue_five(done)
    with pytest.raises(PermanentError, match="EXECABORT"):
        done.execute()
    done = transaction(monkeypatch, [b"+QUEUED\r\n" * 5 + b"*5\r\n+OK\r\n+OK\r\n"])
    queue_five(done)
    with pytest.raises(TransientError, match="either as it was or fully restored"):
        done.execute()
