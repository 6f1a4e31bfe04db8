"""Replies read by hiredis (redis_replies.Replies): DUMP and PTTL pairs and SCAN replies cut at every
byte, the server's errors raised as ours, other replies refused, and no more received than needed."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.sources.test_sources_redis import Feed
from vq_tasks.clients.redis_replies import FEED_SIZE, Replies
from vq_tasks.clients.redis_wire import ReplyReader
from vq_tasks.errors import PermanentError, TransientError

WHERE = "Redis 127.0.0.1:41234"
SECRET = "throwaway-Pa$$"


def bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%b\r\n" % (len(value), value)


def pairs_stream(pairs: list[tuple[bytes | None, int]]) -> bytes:
    return b"".join(bulk(payload) + b":%d\r\n" % ttl for payload, ttl in pairs)


PAIRS = [
    (b"\x00\x05hello\x0a\x00" + bytes(8), -1),
    (None, -2),  # gone since SCAN
    (b"a\r\nb", 0),
    (b"", 1234),
    (bytes(range(256)) * 3, -1),
    (b"$5\r\n:-1\r\n", 99_999_999_999),  # a payload that looks like replies
]


def replies_of(stream: bytes, pieces: list[int] | None = None) -> Replies:
    """Return Replies of ``stream`` received in pieces cut at ``pieces`` (offsets)."""
    edges = [0, *(pieces or []), len(stream)]
    return Replies(Feed([stream[a:b] for a, b in itertools.pairwise(edges)]), WHERE, [SECRET])


def test_pairs_cut_at_every_byte():
    stream = pairs_stream(PAIRS)
    for cut in range(len(stream) + 1):
        assert list(replies_of(stream, [cut]).pairs(len(PAIRS))) == PAIRS, cut


def test_pairs_a_byte_at_a_time():
    stream = pairs_stream(PAIRS)
    replies = replies_of(stream, list(range(1, len(stream))))
    assert list(replies.pairs(len(PAIRS))) == PAIRS


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.one_of(st.none(), st.binary(max_size=200)), st.integers(-2, 2**62))),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_pairs_in_any_chunking(pairs, cuts):
    stream = pairs_stream(pairs)
    replies = replies_of(stream, sorted({c % (len(stream) + 1) for c in cuts}))
    assert list(replies.pairs(len(pairs))) == pairs


def test_payload_longer_than_a_receive_is_read_whole():
    payload = bytes(range(256)) * (3 * FEED_SIZE // 256) + b"\r\n"
    stream = pairs_stream([(payload, 5), (b"x", -1)])
    assert list(replies_of(stream).pairs(2)) == [(payload, 5), (b"x", -1)]


def test_no_more_is_received_than_one_receive_past_the_replies_read():
    """Memory stays bounded: the replies of a batch are parsed as they come, not gathered first."""
    stream = pairs_stream([(b"v" * 100, -1)] * 5000)
    feed = Feed([stream])
    replies = Replies(feed, WHERE)
    used = len(pairs_stream([(b"v" * 100, -1)] * 10))
    assert len(list(replies.pairs(10))) == 10
    assert feed.received <= used + FEED_SIZE


def test_scan_reply_with_cursor_and_keys():
    stream = b"*2\r\n$3\r\n128\r\n*3\r\n$1\r\na\r\n$0\r\n\r\n$4\r\nb\r\nc\r\n"
    for cut in range(len(stream) + 1):
        assert replies_of(stream, [cut]).next() == [b"128", [b"a", b"", b"b\r\nc"]], cut


def test_bytes_another_reader_received_come_first():
    """A connection's ReplyReader read SELECT's answer and more had come: Replies goes on from there."""
    reader = ReplyReader(Feed([b"+OK\r\n:7\r\n$2\r\nab", b"\r\n:-1\r\n"]), WHERE)
    assert reader.line() == b"+OK"
    replies = Replies(Feed([b"\r\n:-1\r\n"]), WHERE, unread=reader.take_unread())
    assert replies.next() == 7
    assert list(replies.pairs(1)) == [(b"ab", -1)]
    assert reader.take_unread() == b""


@pytest.mark.parametrize("before", [0, 1, 3])
def test_an_error_in_place_of_dump_is_the_servers_error_without_the_secret(before: int):
    stream = pairs_stream(PAIRS[:before]) + f"-ERR unknown command 'DUMP' ({SECRET})\r\n".encode()
    replies = replies_of(stream + b":-1\r\n", [len(stream) - 3])
    got = replies.pairs(before + 1)
    assert [next(got) for _ in range(before)] == PAIRS[:before]
    with pytest.raises(PermanentError, match="answered with an error: ERR unknown command") as caught:
        next(got)
    assert SECRET not in str(caught.value) and WHERE in str(caught.value)


def test_an_error_in_place_of_pttl_is_the_servers_error():
    with pytest.raises(TransientError, match="LOADING"):
        list(replies_of(bulk(b"payload") + b"-LOADING Redis is loading the dataset in memory\r\n").pairs(1))


@pytest.mark.parametrize(
    "stream",
    [
        b"+OK\r\n+OK\r\n",  # a status where the integer should be
        b"$1\r\nx\r\n$1\r\ny\r\n",  # a bulk string where the integer should be
        b"*1\r\n:1\r\n:1\r\n",  # an array where the payload should be
        b":5\r\n:1\r\n",  # an integer where the payload should be
    ],
)
def test_another_reply_is_refused(stream: bytes):
    with pytest.raises(PermanentError, match="not the reply awaited"):
        list(replies_of(stream).pairs(1))


def test_what_is_no_redis_reply_is_refused():
    with pytest.raises(PermanentError, match="no Redis reply"):
        list(replies_of(b"HTTP/1.1 400 Bad Request\r\n\r\n").pairs(1))
    with pytest.raises(PermanentError, match="no Redis reply"):
        replies_of(b"SSH-2.0-OpenSSH_9.2\r\n").next()


@pytest.mark.parametrize("stream", [b"", b"$10\r\nabc", pairs_stream(PAIRS)[:-3]])
def test_connection_closed_before_the_replies_is_transient(stream: bytes):
    with pytest.raises(TransientError, match=f"{WHERE} closed the connection"):
        list(replies_of(stream).pairs(len(PAIRS)))
