"""The RESP parsing (clients/redis_pipeline.py) and command building of the snapshot on a fake
socket: replies read at C speed (split at CRLF, then checked) or one by one must come out the
same whatever their content (CRLF, "$", nil, RESP3 nulls and push messages) and however the bytes
arrive; errors become ours. Against real servers: tests/integration/test_redis_logical.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_tasks.clients import redis_pipeline
from vq_tasks.clients.redis_pipeline import Keys, Wire
from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.sources import redis_logical
from vq_tasks.sources.redis_logical import _fetch


class FakeSocket:
    """Gives ``data`` back in pieces of the sizes ``sizes`` cycles through."""

    def __init__(self, data: bytes, sizes: list[int]):
        self.data, self.sizes, self.sent = data, sizes or [len(data) or 1], b""
        self._turn = 0

    def _take(self, most: int) -> bytes:
        size = min(most, self.sizes[self._turn % len(self.sizes)])
        self._turn += 1
        piece, self.data = self.data[:size], self.data[size:]
        return piece

    def recv(self, most: int) -> bytes:
        return self._take(most)

    def recv_into(self, view: memoryview, most: int = 0) -> int:
        piece = self._take(most or len(view))
        view[: len(piece)] = piece
        return len(piece)

    def sendall(self, data: bytes) -> None:
        self.sent += data


def wire(data: bytes, sizes: list[int] | None = None) -> Wire:
    return Wire(FakeSocket(data, sizes or []), "Redis test:1", ["s3cret"])  # type: ignore[arg-type]


def bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%b\r\n" % (len(value), value)


PUSH = b">3\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n:1\r\n"  # RESP3, between replies
values = st.lists(
    st.binary(max_size=40) | st.sampled_from([b"\r\n", b"$3\r\nabc", b"a\r\n$1\r\n"]) | st.none()
)
sizes = st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(found=values, pieces=sizes, push=st.booleans(), resp3=st.booleans())
def test_bulks_read_any_content_however_it_arrives(
    found: list[bytes | None], pieces: list[int], push: bool, resp3: bool
):
    encoded = [b"_\r\n" if value is None and resp3 else bulk(value) for value in found]
    if push and encoded:
        encoded.insert(len(encoded) // 2, PUSH)
    w = wire(b"".join(encoded) + b":7\r\n", pieces)
    heads, got = w.bulks(len(found))
    assert got == found
    assert [h for h, v in zip(heads, got, strict=True) if v is not None] == [
        b"$%d" % len(v) for v in found if v is not None
    ]
    assert w.integer() == 7 and w.idle()


@settings(max_examples=100, deadline=None)
@given(found=st.lists(st.integers(min_value=-2, max_value=2**62)), pieces=sizes)
def test_integers_however_they_arrive(found: list[int], pieces: list[int]):
    w = wire(b"".join(b":%d\r\n" % n for n in found) + bulk(b"next"), pieces)
    assert w.integers(len(found)) == found
    assert w.bulk() == b"next" and w.idle()


@settings(max_examples=100, deadline=None)
@given(
    names=st.lists(
        st.binary(max_size=12) | st.sampled_from([b"$x", b"a\r\n$1\r\nb", b"\r\n"]), unique=True, max_size=30
    ),
    pieces=sizes,
)
def test_scan_replies_give_keys_and_the_commands_for_them(names: list[bytes], pieces: list[int]):
    reply = b"*2\r\n$2\r\n17\r\n*%d\r\n" % len(names) + b"".join(map(bulk, names))
    cursor, keys = wire(reply, pieces).scan_reply()
    assert cursor == b"17" and keys.names == names
    expected = b"".join(
        b"*2\r\n$%d\r\n%b\r\n" % (len(c), c) + bulk(n) for c in (b"PEXPIRETIME", b"DUMP") for n in names
    )
    assert _fetch(keys, absolute=True) == expected
    assert _fetch(keys._replace(raw=None), absolute=True) == expected
    assert (
        _fetch(keys, absolute=False)
        == b"*1\r\n$4\r\nTIME\r\n" + expected.replace(b"$11\r\nPEXPIRETIME", b"$4\r\nPTTL")
        or not names
    )


def test_bulks_stop_at_a_payload_too_large_to_hold_and_stream_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(redis_pipeline, "HUGE", 100)
    monkeypatch.setattr(redis_pipeline, "RECV_SIZE", 40)  # a buffer that never holds a payload that large
    large = bytes(range(256)) * 2
    w = wire(bulk(b"a") + bulk(large) + bulk(b"b"), [7, 50])
    assert w.bulks(3) == ([b"$1"], [b"a"])
    assert w.huge == len(large) and not w.idle()
    assert b"".join(w.stream(w.huge)) == large
    assert w.bulks(1) == ([b"$1"], [b"b"]) and w.idle()


@pytest.mark.parametrize(
    ("reply", "error", "message"),
    [
        (
            b"-NOPERM this user has no permissions to run the 'dump' command s3cret\r\n",
            PermanentError,
            "allow INFO, SCAN, DUMP",
        ),
        (b"-LOADING Redis is loading the dataset in memory\r\n", TransientError, "cannot serve a copy yet"),
        (b"!21\r\nSYNTAX invalid syntax\r\n", PermanentError, "answered with an error: SYNTAX"),
        (b"+OK\r\n", PermanentError, "which is no reply to the snapshot"),
    ],
)
def test_errors_are_ours_and_never_show_secrets(reply: bytes, error: type, message: str):
    w = wire(bulk(b"a") + reply)
    with pytest.raises(error, match=message) as caught:
        w.bulks(2)
    assert "s3cret" not in str(caught.value) and not w.idle()


def test_a_connection_closed_midway_is_transient():
    w = wire(bulk(b"a") + b"$10\r\nabc")
    with pytest.raises(TransientError, match="closed the connection during the snapshot"):
        w.bulks(2)


def test_verbatim_strings_and_info_are_read():
    info = b"# Server\r\nredis_version:7.2.4\r\n"
    keyspace = b"# Keyspace\r\ndb0:keys=3,expires=1,avg_ttl=0\r\ndb15:keys=2,expires=0,avg_ttl=0\r\n"
    w = wire(b"=%d\r\ntxt:%b\r\n" % (len(info) + 4, info) + bulk(keyspace))
    assert w.server_facts() == ("7.2.4", {"0": 3, "15": 2}, {"0": 1, "15": 0})
    assert w.idle()


def test_keys_dropped_as_duplicates_lose_the_raw_bytes():
    keys = Keys([b"a", b"b"], [b"$1", b"$1"], bulk(b"a") + bulk(b"b"))
    fresh = redis_logical._fresh(keys, {hash(b"a")}, redis_logical.LogicalFacts("7.0.0", 0, 0))
    assert fresh == ([b"b"], [b"$1"], None)
    assert (
        _fetch(fresh, absolute=True)
        == b"*2\r\n$11\r\nPEXPIRETIME\r\n$1\r\nb\r\n*2\r\n$4\r\nDUMP\r\n$1\r\nb\r\n"
    )
