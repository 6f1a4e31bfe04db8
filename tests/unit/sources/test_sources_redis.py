"""The RDB reader against synthetic replication streams, cut at every kind of chunk boundary."""

from __future__ import annotations

import collections
import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_tasks.clients.rdb import CRC64
from vq_tasks.clients.redis_wire import ReplyReader, command, server_error
from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.sources.redis import read_rdb, request_rdb

MARK = b"0123456789abcdef0123456789abcdef01234567"
WHERE = "Redis 127.0.0.1:6380"
# What a server may send after a disk-based RDB without rdb-only: the replication stream.
COMMANDS_AFTER = b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"


def make_rdb(body: bytes, version: bytes = b"0011", crc: int | None = None) -> bytes:
    """Return an RDB-shaped payload: header, body, EOF opcode and CRC64 (computed unless given)."""
    before_crc = b"REDIS" + version + body + b"\xff"
    if crc is None:
        crc = CRC64.calc(before_crc)
    return before_crc + crc.to_bytes(8, "little")


def length_reply(rdb: bytes, keepalives: int = 0) -> bytes:
    return b"\n" * keepalives + b"$%d\r\n" % len(rdb) + rdb


def marked_reply(rdb: bytes, keepalives: int = 0) -> bytes:
    return b"\n" * keepalives + b"$EOF:" + MARK + b"\r\n" + rdb + MARK


class Feed:
    """A ``recv_into`` that hands out ``pieces`` one per call (cut to the buffer it gets), then 0;
    ``received`` counts the bytes handed out."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = collections.deque(p for p in pieces if p)
        self.received = 0

    def __call__(self, view: memoryview) -> int:
        if not self.pieces:
            return 0
        piece = self.pieces.popleft()
        size = min(len(view), len(piece))
        view[:size] = piece[:size]
        if size < len(piece):
            self.pieces.appendleft(piece[size:])
        self.received += size
        return size


class Sink:
    """A Writer that keeps what it is given, and the size of every write."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes: list[int] = []

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes), "the reader must hand over bytes, not views of its buffer"
        self.data += data
        self.writes.append(len(data))


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted({p % (len(stream) + 1) for p in points}), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


def read(pieces: list[bytes], size: int = 1 << 20):
    sink = Sink()
    info = read_rdb(ReplyReader(Feed(pieces), WHERE, size=size), sink)
    return info, sink


bodies = st.binary(min_size=0, max_size=3000)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=30)
buffer_sizes = st.sampled_from([64, 100, 1024, 1 << 20])


@settings(max_examples=300, deadline=None)
@given(body=bodies, points=cuts, keepalives=st.integers(0, 5), size=buffer_sizes)
def test_length_prefixed_rdb_in_any_chunking(body: bytes, points: list[int], keepalives: int, size: int):
    rdb = make_rdb(body)
    stream = length_reply(rdb, keepalives) + COMMANDS_AFTER
    info, sink = read(cut(stream, points), size)
    assert bytes(sink.data) == rdb
    assert info == (11, True, len(rdb))
    assert max(sink.writes) <= size


@settings(max_examples=300, deadline=None)
@given(body=bodies, points=cuts, keepalives=st.integers(0, 5), size=buffer_sizes)
def test_eof_marked_rdb_in_any_chunking(body: bytes, points: list[int], keepalives: int, size: int):
    rdb = make_rdb(body)
    info, sink = read(cut(marked_reply(rdb, keepalives), points), size)
    assert bytes(sink.data) == rdb
    assert info == (11, True, len(rdb))
    assert max(sink.writes) <= size


@pytest.mark.parametrize("size", [64, 1 << 20])
def test_mark_split_at_every_position(size: int):
    rdb = make_rdb(bytes(range(256)) * 3)
    stream = marked_reply(rdb)
    for at in range(len(stream) - len(MARK) - 2, len(stream)):
        info, sink = read([stream[:at], stream[at:]], size)
        assert bytes(sink.data) == rdb, at
        assert info.crc64_checked


def test_mark_ends_data_only_at_the_end_of_a_receive():
    """A payload that happens to hold the mark in its middle is not cut there (Redis's rule)."""
    rdb = make_rdb(b"x" + MARK + b"y")
    info, sink = read([marked_reply(rdb)])
    assert bytes(sink.data) == rdb
    assert info.crc64_checked


def test_a_byte_at_a_time():
    rdb = make_rdb(b"\r\n\n$EOF:" + MARK[:20] + b"\xff" * 50)
    for reply in (length_reply(rdb, 3), marked_reply(rdb, 3)):
        stream = reply
        info, sink = read([stream[i : i + 1] for i in range(len(stream))], 64)
        assert bytes(sink.data) == rdb
        assert info == (11, True, len(rdb))


def test_rdb_version_is_read_from_the_header():
    info, _ = read([length_reply(make_rdb(b"abc", version=b"0009"))])
    assert info.rdb_version == 9


@pytest.mark.parametrize("wrap", [length_reply, marked_reply])
def test_crc_mismatch_is_transient(wrap):
    rdb = bytearray(make_rdb(b"some keys and values"))
    rdb[12] ^= 0x01
    with pytest.raises(TransientError, match=re.escape(f"RDB checksum mismatch from {WHERE}")):
        read([wrap(bytes(rdb))])


@pytest.mark.parametrize("wrap", [length_reply, marked_reply])
def test_damaged_crc_itself_is_a_mismatch(wrap):
    rdb = bytearray(make_rdb(b"some keys and values"))
    rdb[-1] ^= 0x80
    with pytest.raises(TransientError, match="checksum mismatch"):
        read([wrap(bytes(rdb))])


@pytest.mark.parametrize("wrap", [length_reply, marked_reply])
def test_zero_crc_means_unchecked(wrap):
    rdb = make_rdb(b"written with rdbchecksum no", crc=0)
    info, sink = read([wrap(rdb)])
    assert bytes(sink.data) == rdb
    assert info == (11, False, len(rdb))


def test_missing_eof_opcode_is_transient():
    rdb = make_rdb(b"body")
    damaged = rdb[:-9] + b"\x00" + rdb[-8:]
    with pytest.raises(TransientError, match="EOF opcode"):
        read([length_reply(damaged)])


@pytest.mark.parametrize(
    "payload", [b"HELLO0011" + b"\x00" * 20, b"REDIS00x1" + b"\x00" * 20, b"\x00REDIS0011" + b"\x00" * 20]
)
def test_payload_that_is_not_an_rdb_is_permanent_and_not_written(payload: bytes):
    sink = Sink()
    with pytest.raises(PermanentError, match="not an RDB"):
        read_rdb(ReplyReader(Feed([length_reply(payload)]), WHERE), sink)
    assert not sink.data


@pytest.mark.parametrize("payload", [b"", b"REDIS", b"REDIS0011\xff"])
def test_payload_too_short_is_permanent(payload: bytes):
    with pytest.raises(PermanentError):
        read([length_reply(payload)])


def test_old_rdb_version_is_permanent():
    with pytest.raises(PermanentError, match="RDB version 4"):
        read([length_reply(make_rdb(b"body", version=b"0004"))])


@pytest.mark.parametrize("wrap", [length_reply, marked_reply])
def test_connection_closed_mid_payload_is_transient(wrap):
    stream = wrap(make_rdb(b"x" * 500))
    with pytest.raises(TransientError, match="closed the connection"):
        read([stream[:300]])


def test_connection_closed_before_reply_is_transient():
    with pytest.raises(TransientError, match="closed the connection"):
        read([b"\n\n\n"])


@pytest.mark.parametrize(
    "reply, error, text",
    [
        (b"-LOADING Redis is loading the dataset in memory", TransientError, "cannot serve a copy yet"),
        (b"-MASTERDOWN Link with MASTER is down", TransientError, "Link with MASTER is down"),
        (b"-ERR Background save already in progress", TransientError, "Background save"),
        (b"-ERR BGSAVE failed, replication can't continue", TransientError, "BGSAVE failed"),
        (
            b"-WRONGPASS invalid username-password pair",
            PermanentError,
            r"refused the password \(REDIS_PASSWORD",
        ),
        (b"-ERR invalid password", PermanentError, "refused the password"),
        (b"-NOAUTH Authentication required.", PermanentError, "requires a password: set REDIS_PASSWORD"),
        (b"-NOPERM this user has no permissions to run the 'sync' command", PermanentError, "SYNC"),
        (b"-ERR unknown command 'SYNC'", PermanentError, "unknown command 'SYNC'"),
        (b"+FULLRESYNC 8de1787ba490483314a4d30f1c628bc5025eb761 2443808505", PermanentError, "is it a Redis"),
        (b"HTTP/1.1 400 Bad Request", PermanentError, "is it a Redis server"),
        (b"$-1", PermanentError, "is it a Redis"),
        (b"$EOF:short", PermanentError, "is it a Redis"),
    ],
)
def test_replies_are_classified(reply: bytes, error: type[Exception], text: str):
    with pytest.raises(error, match=text) as caught:
        read([b"\n" + reply + b"\r\n"])
    assert WHERE in str(caught.value)


def test_endless_line_is_permanent():
    with pytest.raises(PermanentError, match="is it a Redis server"):
        read([b"x" * 10_000])


def test_server_error_never_shows_the_secret():
    error = server_error(
        "ERR unknown command 'AUTH', with args beginning with: 's3cret!'", WHERE, ["s3cret!"]
    )
    assert isinstance(error, PermanentError)
    assert "s3cret!" not in str(error)
    assert "***" in str(error)


def test_auth_without_server_password_is_permanent():
    error = server_error(
        "ERR AUTH <password> called without any password configured for the default user.", WHERE
    )
    assert isinstance(error, PermanentError)
    assert "REDIS_PASSWORD" in str(error)


def test_crc64_is_redis_crc64():
    """Redis's own test vector (src/crc64.c): crc64("123456789") == 0xe9c6d914c4b8d9ca."""
    assert CRC64.calc(b"123456789") == 0xE9C6D914C4B8D9CA
    assert CRC64.calc(b"6789", CRC64.calc(b"12345")) == 0xE9C6D914C4B8D9CA


def test_command_is_resp():
    assert command("AUTH", "p w") == b"*2\r\n$4\r\nAUTH\r\n$3\r\np w\r\n"
    assert command("SYNC") == b"*1\r\n$4\r\nSYNC\r\n"


def handshake(replies: bytes, password: str | None) -> list[bytes]:
    """Run request_rdb against canned ``replies``; return the commands it sent."""
    sent: list[bytes] = []
    reader = ReplyReader(Feed([replies]), WHERE, secrets=[password] if password else [])
    request_rdb(sent.append, reader, password)
    return sent


def test_request_rdb_authenticates_then_asks_for_the_rdb_only():
    sent = handshake(b"+OK\r\n+OK\r\n+OK\r\n", "pw")
    assert sent == [
        command("AUTH", "pw"),
        command("REPLCONF", "capa", "eof"),
        command("REPLCONF", "rdb-only", "1"),
        command("SYNC"),
    ]


def test_request_rdb_without_password_sends_no_auth():
    assert handshake(b"+OK\r\n+OK\r\n", None)[0] == command("REPLCONF", "capa", "eof")


def test_server_without_rdb_only_is_still_asked_to_sync():
    sent = handshake(b"+OK\r\n-ERR Unrecognized REPLCONF option: rdb-only\r\n", None)
    assert sent[-1] == command("SYNC")


@pytest.mark.parametrize(
    "replies, error, text",
    [
        (b"-WRONGPASS invalid username-password pair\r\n", PermanentError, "refused the password"),
        (b"-ERR AUTH <password> called without any password configured\r\n", PermanentError, "no password"),
        (b"+OK\r\n-NOPERM no permissions to run the 'replconf' command\r\n", PermanentError, "NOPERM"),
        (b"+OK\r\n-ERR Unrecognized REPLCONF option: capa\r\n", PermanentError, "Unrecognized"),
        (b"+OK\r\n+OK\r\n-LOADING Redis is loading\r\n", TransientError, "LOADING"),
        (b"+OK\r\n:1\r\n", PermanentError, "is it a Redis"),
    ],
)
def test_request_rdb_raises_the_server_error(replies: bytes, error: type[Exception], text: str):
    with pytest.raises(error, match=text) as caught:
        handshake(replies, "s3cret")
    assert "s3cret" not in str(caught.value)


def test_an_echoed_password_is_never_shown_even_in_part():
    """A server that is not Redis may echo the AUTH command; the reply shown is cut after redaction."""
    password = "p" * 70 + "-long-secret-tail"
    echoed = command("AUTH", password).replace(b"\r\n", b" ") + b"\r\n"
    with pytest.raises(PermanentError, match="is it a Redis server") as caught:
        handshake(echoed, password)
    assert "ppppp" not in str(caught.value)


QUEUED = b"+QUEUED\r\n"


@settings(max_examples=300, deadline=None)
@given(
    before=st.integers(0, 40),
    error=st.sampled_from([b"", b"-OOM command not allowed\r\n", b"-ERR x\r\n"]),
    after=st.integers(0, 5),
    more=st.booleans(),
    points=cuts,
    size=buffer_sizes,
)
def test_repeated_replies_are_skipped_up_to_the_first_other_one(before, error, after, more, points, size):
    """A transaction's QUEUED answers, compared many at a time in any chunking: the first other
    answer (an error) is left for ``line``, nothing after the count is consumed, and no more is
    waited for once another answer has begun (it may be the last thing the server sends)."""
    stream = QUEUED * before + error + QUEUED * after + (b":7\r\n" if more else b"")
    reader = ReplyReader(Feed(cut(stream, points)), WHERE, size=size)
    count = before + (1 if error else 0) + after
    assert reader.skip_repeated(QUEUED, count) == (before if error else count)
    if error:
        assert reader.line() == error[:-2]
        assert reader.skip_repeated(QUEUED, after) == after
    if more:
        assert reader.integer() == 7


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.one_of(st.none(), st.binary(max_size=300)), max_size=20),
    points=cuts,
    size=buffer_sizes,
)
def test_bulk_and_array_replies_in_any_chunking(values, points, size):
    """A SCAN-like reply: an array of bulk strings and nils, read whole whatever the receives."""
    stream = b"*%d\r\n" % len(values) + b"".join(
        b"$-1\r\n" if v is None else b"$%d\r\n%b\r\n" % (len(v), v) for v in values
    )
    reader = ReplyReader(Feed(cut(stream, points)), WHERE, size=size)
    assert [reader.bulk() for _ in range(reader.array_length())] == values
    with pytest.raises(TransientError, match="closed the connection"):
        reader.line()
