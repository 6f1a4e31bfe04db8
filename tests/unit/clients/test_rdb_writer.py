"""RdbWriter: the RDB layout of rdb.c byte for byte (lengths, opcodes, expiry times, databases, the
CRC64 trailer), the checks of DUMP payloads, and writing in bounded chunks. Real payloads and real
redis-server loading are in tests/integration/test_redis_logical.py."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_tasks.clients.rdb import CRC64, RdbCheck
from vq_tasks.clients.rdb_writer import (
    RdbWriter,
    check_payload,
    encode_length,
    encode_string,
    payload_version,
)
from vq_tasks.errors import PermanentError

VERSION = 10


def payload(value: bytes, version: int = VERSION, kind: int = 0) -> bytes:
    """A DUMP payload as Redis makes one: type, value, 2-byte version, CRC64 of all before."""
    body = bytes((kind,)) + encode_string(value) + version.to_bytes(2, "little")
    return body + CRC64.calc(body).to_bytes(8, "little")


def function_dump(*codes: bytes) -> bytes:
    """A FUNCTION DUMP payload: a FUNCTION2 opcode and string per library, version, CRC64."""
    body = b"".join(b"\xf5" + encode_string(code) for code in codes) + VERSION.to_bytes(2, "little")
    return body + CRC64.calc(body).to_bytes(8, "little")


def written(build, **options) -> bytes:
    out = io.BytesIO()
    writer = RdbWriter(out, VERSION, **options)
    build(writer)
    writer.finish()
    return out.getvalue()


def trailer_ok(rdb: bytes) -> bool:
    return rdb[-9] == 0xFF and CRC64.calc(rdb[:-8]) == int.from_bytes(rdb[-8:], "little")


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x00"),
        (63, b"\x3f"),
        (64, b"\x40\x40"),
        (300, b"\x41\x2c"),
        (16383, b"\x7f\xff"),
        (16384, b"\x80\x00\x00\x40\x00"),
        (2**32 - 1, b"\x80\xff\xff\xff\xff"),
        (2**32, b"\x81\x00\x00\x00\x01\x00\x00\x00\x00"),
        (2**64 - 1, b"\x81" + b"\xff" * 8),
    ],
)
def test_lengths_are_encoded_as_rdb_save_len(length: int, encoded: bytes):
    assert encode_length(length) == encoded


@pytest.mark.parametrize("length", [-1, 2**64])
def test_lengths_out_of_range_are_refused(length: int):
    with pytest.raises(ValueError):
        encode_length(length)


def test_crc64_is_redis_jones_crc():
    assert CRC64.calc(b"123456789") == 0xE9C6D914C4B8D9CA  # Redis's crc64 self-test value


def test_layout_is_rdb_c_byte_for_byte():
    value = payload(b"v")
    rdb = written(
        lambda w: (w.add(0, b"plain", value), w.add(0, b"ttl", value, 1_700_000_000_123)),
        aux={"redis-ver": "7.0.15"},
    )
    expected = (
        b"REDIS0010"
        + b"\xfa\x09redis-ver\x067.0.15"
        + b"\xfe\x00"  # SELECTDB 0
        + b"\x00\x05plain\x01v"  # type, key, the payload's value
        + b"\xfc"
        + (1_700_000_000_123).to_bytes(8, "little")
        + b"\x00\x03ttl\x01v"
        + b"\xff"
    )
    assert rdb[:-8] == expected
    assert trailer_ok(rdb)


def test_empty_databases_get_no_selectdb_and_hints_follow_selectdb():
    value = payload(b"x")
    rdb = written(
        lambda w: (w.add(3, b"a", value), w.add(15, b"b", value)),
        resize_hints={3: (1, 0), 7: (5, 5), 15: (300, 64)},
    )
    assert rdb[9:-9] == (
        b"\xfe\x03\xfb\x01\x00" + b"\x00\x01a\x01x" + b"\xfe\x0f\xfb\x41\x2c\x40\x40" + b"\x00\x01b\x01x"
    )


def test_an_empty_rdb_is_header_eof_and_crc():
    rdb = written(lambda w: None)
    assert rdb[:10] == b"REDIS0010\xff" and len(rdb) == 18 and trailer_ok(rdb)


def test_the_existing_checker_accepts_it():
    rdb = written(lambda w: [w.add(db, b"k%d" % i, payload(b"v" * i)) for db in (0, 1) for i in range(500)])
    check = RdbCheck("test")
    for start in range(0, len(rdb), 777):
        check.feed(rdb[start : start + 777])
    info = check.finish()
    assert (info.rdb_version, info.crc64_checked, info.size) == (VERSION, True, len(rdb))


def test_long_and_binary_keys_are_written_verbatim():
    key = b"\x00\xff\r\n" * 5000  # 20000 bytes: a 32-bit length
    rdb = written(lambda w: w.add(0, key, payload(b"")))
    assert rdb[11:-9] == b"\x00\x80\x00\x00\x4e\x20" + key + b"\x00"


def test_writes_are_chunks_of_about_the_buffer_size():
    writes: list[int] = []

    class Out:
        def write(self, data: bytes) -> None:
            writes.append(len(data))

    writer = RdbWriter(Out(), VERSION, buffer_size=4096)
    for i in range(2000):
        writer.add_many(0, [b"key%d" % i], [payload(b"v" * 100)], [-1])
    info = writer.finish()
    assert len(writes) > 40 and max(writes) < 4096 + 200
    assert sum(writes) == info.size


def test_functions_go_first_and_keep_their_records():
    libraries = function_dump(b"#!lua name=a\nredis.register_function('f', function() return 1 end)")
    rdb = written(lambda w: (w.add_functions(libraries), w.add(0, b"k", payload(b"v"))))
    assert rdb[9:-9].startswith(libraries[:-10] + b"\xfe\x00")
    with pytest.raises(ValueError, match="before the first database"):
        written(lambda w: (w.add(0, b"k", payload(b"v")), w.add_functions(libraries)))


def test_no_functions_add_nothing():
    assert written(lambda w: w.add_functions(function_dump())) == written(lambda w: None)


def test_a_database_comes_once():
    with pytest.raises(ValueError, match="comes once"):
        written(
            lambda w: (
                w.add(1, b"a", payload(b"v")),
                w.add(0, b"b", payload(b"v")),
                w.add(1, b"c", payload(b"v")),
            )
        )


def test_counts_keys_and_expires_per_database():
    out = io.BytesIO()
    writer = RdbWriter(out, VERSION)
    writer.add_many(0, [b"a", b"b", b"c"], [payload(b"1")] * 3, [-1, 5, -1])
    writer.add(2, b"d", payload(b"2"), 7)
    writer.finish()
    assert writer.keys == {0: 3, 2: 1} and writer.expires == {0: 1, 2: 1}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (payload(b"v", version=VERSION + 1), "RDB version 11, newer than the RDB's 10"),
        (payload(b"v", kind=0xFE), "that is none"),
        (b"\x00\x01v", "that is none"),
        (payload(b"v")[:-1] + b"\x00", "CRC64 does not match"),
    ],
    ids=["newer", "opcode", "short", "crc"],
)
def test_payloads_that_do_not_fit_are_refused(bad: bytes, message: str):
    with pytest.raises(PermanentError, match=message):
        written(lambda w: w.add(0, b"k", bad))


def test_older_payloads_fit_a_newer_rdb():
    older = payload(b"v", version=9)
    assert payload_version(older) == 9
    check_payload(older, VERSION)
    assert trailer_ok(written(lambda w: w.add(0, b"k", older)))


def test_a_newer_payload_later_in_a_batch_is_refused():
    good, newer = payload(b"v"), payload(b"v", version=VERSION + 1)
    with pytest.raises(PermanentError, match="newer than the RDB's"):
        written(lambda w: w.add_many(0, [b"a", b"b"], [good, newer], [-1, -1]))


def test_finished_means_finished():
    writer = RdbWriter(io.BytesIO(), VERSION)
    writer.add(0, b"k", payload(b"v"))
    writer.finish()
    for late in (
        lambda: writer.add(0, b"l", payload(b"v")),
        lambda: writer.add_streamed(0, b"l", [payload(b"v")]),
        lambda: writer.add_many(1, [], [], []),
    ):
        with pytest.raises(ValueError, match="finished"):
            late()


def read_back(rdb: bytes) -> dict[int, dict[bytes, tuple[bytes, int | None]]]:
    """Parse an RDB of string values as rdbLoad does (enough of it for these tests)."""
    assert rdb[:9] == b"REDIS%04d" % VERSION and trailer_ok(rdb)
    pos, db, expiry = 9, -1, None
    found: dict[int, dict[bytes, tuple[bytes, int | None]]] = {}

    def length() -> int:
        nonlocal pos
        first = rdb[pos]
        kind = first >> 6
        if kind == 0:
            pos += 1
            return first & 0x3F
        if kind == 1:
            pos += 2
            return (first & 0x3F) << 8 | rdb[pos - 1]
        size = 4 if first == 0x80 else 8
        pos += 1 + size
        return int.from_bytes(rdb[pos - size : pos], "big")

    def string() -> bytes:
        nonlocal pos
        size = length()
        pos += size
        return rdb[pos - size : pos]

    while True:
        opcode = rdb[pos]
        pos += 1
        if opcode == 0xFF:
            assert pos == len(rdb) - 8
            return found
        if opcode == 0xFE:
            db = length()
            found[db] = {}
        elif opcode == 0xFC:
            expiry = int.from_bytes(rdb[pos : pos + 8], "little")
            pos += 8
        else:
            assert opcode == 0
            key = string()
            found[db][key] = (string(), expiry)
            expiry = None


edge_keys = st.tuples(st.sampled_from([63, 64, 16383, 16384]), st.binary(min_size=1, max_size=3)).map(
    lambda pattern: (pattern[1] * pattern[0])[: pattern[0]]  # lengths where the encoding changes
)
records = st.lists(
    st.tuples(
        st.binary(max_size=20) | edge_keys,
        st.binary(max_size=200),
        st.none() | st.integers(min_value=0, max_value=2**62),
    ),
    max_size=30,
    unique_by=lambda record: record[0],
)


@settings(max_examples=60, deadline=None)
@given(by_db=st.dictionaries(st.integers(min_value=0, max_value=300), records, max_size=4))
def test_what_is_written_reads_back(by_db: dict[int, list[tuple[bytes, bytes, int | None]]]):
    def build(writer: RdbWriter) -> None:
        for db in sorted(by_db):
            for key, value, expiry in by_db[db]:
                writer.add(db, key, payload(value), expiry)

    expected = {
        db: {key: (value, expiry) for key, value, expiry in by_db[db]} for db in sorted(by_db) if by_db[db]
    }
    assert read_back(written(build, buffer_size=512)) == expected


@pytest.mark.parametrize("size", [1, 7, 11, 4096])
def test_a_streamed_payload_is_written_as_a_whole_one(size: int):
    value = payload(bytes(range(256)) * 40)
    pieces = [value[start : start + size] for start in range(0, len(value), size)]
    assert written(lambda w: w.add_streamed(2, b"big", iter(pieces), 123)) == written(
        lambda w: w.add(2, b"big", value, 123)
    )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (payload(b"v" * 100, version=VERSION + 1), "newer than the RDB's"),
        (payload(b"v" * 100)[:-1] + b"\x00", "CRC64 does not match"),
        (payload(b"v" * 100, kind=0xFF), "that is none"),
        (b"\x00" * 10, "that is none"),
    ],
    ids=["newer", "crc", "opcode", "short"],
)
def test_a_streamed_payload_that_does_not_fit_is_refused(bad: bytes, message: str):
    with pytest.raises(PermanentError, match=message):
        written(lambda w: w.add_streamed(0, b"k", iter([bad[:50], bad[50:]])))
