"""logical_snapshot against real redis-servers: every kind of value in databases 0, 3 and 15 goes
into an RDB that redis-check-rdb passes, that rdb.RdbCheck accepts, and that a new redis-server
loads with every key equal (type, value, expiry time); on servers that refuse replication as
managed services do (SYNC renamed away, an ACL user without it); with memory that does not grow
with the values; on every redis-server version found on this machine."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.servers import RedisServer, free_port, redis_server_binaries, redis_settings, start_redis
from vq_tasks.clients import redis_pipeline
from vq_tasks.clients.rdb import RdbCheck
from vq_tasks.clients.redis_wire import ReplicationRefused
from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.sources import redis_logical
from vq_tasks.sources.redis import dump_redis
from vq_tasks.sources.redis_logical import LogicalFacts, logical_snapshot
from vq_tasks.streams.stages import CHUNK_SIZE

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-Pa$$-word"
BINARIES = redis_server_binaries()
DATABASES = [0, 3, 15]
TTL_TOLERANCE_MS = 1500  # before Redis 7 the expiry time is the server's TIME plus PTTL
LIBRARY = "#!lua name=vqlib\nredis.register_function('vq_one', function() return 1 end)"
NO_RETRY = Retry(NoBackoff(), 0)  # as redis_connect.redis_client makes clients: the task retries
Snapshot = dict[bytes, tuple[bytes, object, int | None]]


@pytest.fixture(params=sorted(BINARIES), ids=lambda version: f"redis-{version}")
def binary(request: pytest.FixtureRequest) -> str:
    return BINARIES[request.param]


def version_of(client: redis.Redis) -> tuple[int, ...]:
    return tuple(int(part) for part in client.info("server")["redis_version"].split(".")[:2])


def fill(server: RedisServer) -> None:
    """Every type in every encoding, binary keys, keys at the RDB length edges, TTLs, in DATABASES."""
    for db in DATABASES:
        with server.client(db) as c:
            tag = f"db{db}-"
            c.set("int", 12345)
            c.set("short", tag + "value")
            c.set("long", b"\x00\xfe" + bytes(range(256)) * 40)  # 10 KiB, not compressible much
            c.set("compressible", "a" * 5000)  # LZF in the payload
            c.set(b"\x00\xff binary\r\nkey", bytes(range(256)) + tag.encode())
            c.set(b"\xc3\x28 not utf-8 \xff", b"\xc3\x28")
            c.set(b"$looks like a header", "$")
            c.set(b"a\r\n$1\r\nb", "a key that looks like two")
            c.set(b"k" * 63, "63")
            c.set(b"k" * 64, "64")
            c.set(b"K" * 16384, "16384")
            c.rpush("small-list", "a", "b", 3)
            c.rpush("big-list", *[f"{tag}{i}" for i in range(5000)])
            c.sadd("int-set", *range(100))
            c.sadd("small-set", "a", "b", tag)
            c.sadd("big-set", *[f"{tag}member{i}" for i in range(600)])
            c.zadd("small-zset", {"a": 1, "b": 2.5, tag: -3})
            c.zadd("big-zset", {f"{tag}m{i}": i / 7 for i in range(600)})
            c.hset("small-hash", mapping={"a": "1", b"\xfe\x00": b"\x00\xff"})
            c.hset("big-hash", mapping={f"field{i}": f"{tag}{i}" for i in range(600)})
            for i in range(20):
                c.xadd("stream", {"n": i, "tag": tag})
            c.xgroup_create("stream", "group", id="0")
            c.xgroup_create("stream", "other", id="$")
            c.xreadgroup("group", "alice", {"stream": ">"}, count=5)  # pending, not acknowledged
            c.xreadgroup("group", "bob", {"stream": ">"}, count=3)
            c.xack("stream", "group", c.xpending_range("stream", "group", "-", "+", 1)[0]["message_id"])
            c.pfadd("hll", *[f"{tag}{i}" for i in range(1000)])
            c.set("expiring", "soon", ex=3600)
            c.hset("expiring-hash", "a", "b")
            c.pexpire("expiring-hash", 7_200_000)
            c.mset({f"{tag}key:{i}": i for i in range(300 + db)})
    with server.client(0) as c:
        if version_of(c) >= (7, 0):
            c.execute_command("FUNCTION", "LOAD", LIBRARY)


def snapshot(server: RedisServer, db: int, client: redis.Redis | None = None) -> Snapshot:
    """Every key of database ``db``: its TYPE, its value (value()) and its expiry time in ms."""
    with client or server.client(db) as c:
        return {key: (c.type(key), value(c, key), expiry(c, key)) for key in c.scan_iter(count=1000)}


def value(c: redis.Redis, key: bytes) -> object:
    """The DUMP of ``key``; for a hash table, whose DUMP lists members in the table's order (which
    a reload changes), its sorted contents instead."""
    if c.object("encoding", key) != b"hashtable":
        return c.dump(key)
    if c.type(key) == b"set":
        return sorted(c.smembers(key))
    return sorted(c.hgetall(key).items())


def expiry(c: redis.Redis, key: bytes) -> int | None:
    """The absolute expiry time of ``key`` in unix ms (None: none)."""
    ttl = c.pttl(key)
    return None if ttl < 0 else int(time.time() * 1000) + ttl


def same(expected: Snapshot, got: Snapshot) -> None:
    assert got.keys() == expected.keys()
    for key, (kind, data, expires) in expected.items():
        assert got[key][:2] == (kind, data), key
        if expires is None:
            assert got[key][2] is None, key
        else:
            assert abs(got[key][2] - expires) < TTL_TOLERANCE_MS, key


def take(server: RedisServer, path: Path, client=None, **options) -> LogicalFacts:
    """Snapshot DATABASES of ``server`` into ``path`` through clients of ``client`` (a function of
    the database; default: the server's own, with its password)."""
    with open(path, "wb") as out:
        return logical_snapshot(client or server.client, DATABASES, out, **options)


def check_rdb(path: Path, facts: LogicalFacts) -> None:
    """redis-check-rdb passes the file and rdb.RdbCheck accepts its version and CRC64."""
    done = subprocess.run(["redis-check-rdb", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "RDB looks OK" in done.stdout, done.stdout + done.stderr
    check = RdbCheck("test")
    data = path.read_bytes()
    for start in range(0, len(data), CHUNK_SIZE):
        check.feed(data[start : start + CHUNK_SIZE])
    info = check.finish()
    assert info.crc64_checked and info.rdb_version == facts.rdb_version and info.size == facts.size


def test_every_type_loads_into_a_new_server_equal(tmp_path: Path, binary: str):
    with start_redis(tmp_path / "source", password=PASSWORD, binary=binary) as source:
        fill(source)
        rdb = tmp_path / "backup" / "dump.rdb"
        rdb.parent.mkdir()
        facts = take(source, rdb)
        expected = {db: snapshot(source, db) for db in DATABASES}
        with source.client() as c:
            modern = version_of(c) >= (7, 0)
            dump_rdb_version = int.from_bytes(c.dump("int")[-10:-8], "little")
            functions = c.execute_command("FUNCTION", "LIST") if modern else None

    check_rdb(rdb, facts)
    assert facts.rdb_version == dump_rdb_version
    assert facts.keys == {str(db): len(expected[db]) for db in DATABASES}
    assert facts.expires == {str(db): 2 for db in DATABASES}
    assert (facts.vanished, facts.duplicates, facts.functions) == (0, 0, modern)
    assert facts.started <= facts.finished and facts.seconds < 60
    with start_redis(tmp_path / "restored", rdb_file=rdb, binary=binary) as restored:
        for db in DATABASES:
            same(expected[db], snapshot(restored, db))
        assert snapshot(restored, 1) == {}
        if modern:
            with restored.client() as c:
                assert c.execute_command("FUNCTION", "LIST") == functions
                assert c.fcall("vq_one", 0) == 1


def test_expiry_times_are_the_servers_own(tmp_path: Path):
    with start_redis(tmp_path / "source") as source, source.client(3) as c:
        if version_of(c) < (7, 0):
            pytest.skip("PEXPIRETIME is Redis 7's")
        c.set("a", 1, pxat=4_102_444_800_123)  # 2100-01-01, to the millisecond
        facts = take(source, tmp_path / "dump.rdb")
    assert facts.expires == {"3": 1}
    with (
        start_redis(tmp_path / "restored", rdb_file=tmp_path / "dump.rdb") as restored,
        restored.client(3) as c,
    ):
        assert c.execute_command("PEXPIRETIME", "a") == 4_102_444_800_123


def refusing_sync(tmp_path: Path, binary: str) -> RedisServer:
    """A server with SYNC and PSYNC renamed away (in a config file), as managed services have it."""
    config = tmp_path / "managed.conf"
    config.write_text('rename-command SYNC ""\nrename-command PSYNC ""\n')
    return start_redis(tmp_path / "source", password=PASSWORD, binary=binary, args=["--include", str(config)])


def test_a_server_without_sync_is_snapshot(tmp_path: Path, binary: str):
    """dump_redis as the backup calls it: REDIS_BACKUP_METHOD=sync says what to do; auto (the
    default) falls back to the logical snapshot, and the manifest's facts say so."""
    with refusing_sync(tmp_path, binary) as source:
        fill(source)
        settings = redis_settings(source.port, PASSWORD)
        with pytest.raises(ReplicationRefused, match=r"(?i)unknown command.*REDIS_BACKUP_METHOD"):
            dump_redis(settings.model_copy(update={"redis_backup_method": "sync"}), _Sink())
        with open(tmp_path / "dump.rdb", "wb") as out:
            facts = dump_redis(settings, out)
        expected = {db: snapshot(source, db) for db in DATABASES}
    assert facts.method == "dump" and facts.snapshot_seconds is not None and facts.crc64_checked
    assert {db: n for db, n in facts.keys.items() if n} == {str(db): len(expected[db]) for db in DATABASES}
    done = subprocess.run(["redis-check-rdb", str(tmp_path / "dump.rdb")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    with start_redis(tmp_path / "restored", rdb_file=tmp_path / "dump.rdb", binary=binary) as restored:
        for db in DATABASES:
            same(expected[db], snapshot(restored, db))


def test_the_sync_path_says_so_in_its_facts(tmp_path: Path):
    with start_redis(tmp_path / "source", password=PASSWORD) as source:
        fill(source)
        facts = dump_redis(redis_settings(source.port, PASSWORD), _Sink())
        forced = dump_redis(
            redis_settings(source.port, PASSWORD).model_copy(update={"redis_backup_method": "dump"}), _Sink()
        )
    assert (facts.method, facts.snapshot_seconds) == ("sync", None)
    assert forced.method == "dump" and forced.keys == {k: v for k, v in forced.keys.items()}


def test_an_acl_user_without_replication_is_enough(tmp_path: Path, binary: str):
    with start_redis(tmp_path / "source", password=PASSWORD, binary=binary) as source:
        fill(source)
        with source.client() as c:
            rules = ["on", ">pw", "~*", "&*", "+@all", "-sync", "-psync", "-replconf"]
            c.execute_command("ACL", "SETUSER", "backup", *rules)

        def as_backup(db: int) -> redis.Redis:
            return redis.Redis(source.host, source.port, db=db, username="backup", password="pw")

        with as_backup(0) as c, pytest.raises(redis.exceptions.NoPermissionError):
            c.execute_command("SYNC")
        facts = take(source, tmp_path / "dump.rdb", client=as_backup)
        expected = {db: snapshot(source, db) for db in DATABASES}
    check_rdb(tmp_path / "dump.rdb", facts)
    with start_redis(tmp_path / "restored", rdb_file=tmp_path / "dump.rdb", binary=binary) as restored:
        for db in DATABASES:
            same(expected[db], snapshot(restored, db))


def test_a_user_without_function_dump_gets_the_keys(tmp_path: Path):
    with start_redis(tmp_path / "source", password=PASSWORD) as source:
        fill(source)
        with source.client() as c:
            c.execute_command("ACL", "SETUSER", "backup", "on", ">pw", "~*", "+@all", "-function")
        facts = take(
            source,
            tmp_path / "dump.rdb",
            client=lambda db: redis.Redis(source.host, source.port, db=db, username="backup", password="pw"),
        )
        expected = {str(db): len(snapshot(source, db)) for db in DATABASES}
    check_rdb(tmp_path / "dump.rdb", facts)
    assert not facts.functions and facts.keys == expected


def test_a_user_without_dump_is_told_what_to_allow(tmp_path: Path, binary: str):
    with start_redis(tmp_path / "source", password=PASSWORD, binary=binary) as source:
        fill(source)
        with source.client() as c:
            c.execute_command("ACL", "SETUSER", "default", "-dump")
        with pytest.raises(PermanentError, match="denies this user a command of the snapshot") as caught:
            take(source, tmp_path / "dump.rdb")
    assert PASSWORD not in str(caught.value)


def test_keys_deleted_meanwhile_are_skipped_and_counted(tmp_path: Path):
    count = 60_000
    with start_redis(tmp_path / "source") as source:
        with source.client(0) as c:
            for start in range(0, count, 10_000):
                c.mset({f"k{i}": i for i in range(start, start + 10_000)})
        stop = threading.Event()

        def delete() -> None:  # most keys, so that the server shrinks its table meanwhile
            with source.client(0) as c:
                for start in range(0, count - 2000, 500):
                    c.delete(*[f"k{i}" for i in range(start, start + 500)])
                    if stop.is_set():
                        return

        deleter = threading.Thread(target=delete)
        with open(tmp_path / "dump.rdb", "wb") as out:
            deleter.start()
            try:
                facts = logical_snapshot(source.client, [0], out, batch_size=100)
            finally:
                stop.set()
                deleter.join()
    written = facts.keys.get("0", 0)
    assert written + facts.vanished <= count and written >= 2000
    check_rdb(tmp_path / "dump.rdb", facts)
    with (
        start_redis(tmp_path / "restored", rdb_file=tmp_path / "dump.rdb") as restored,
        restored.client() as c,
    ):
        assert c.dbsize() == written  # loaded: no key twice, which would stop redis-server


def test_a_key_scan_returns_twice_is_written_once():
    facts = LogicalFacts("7.0.0", 0, 0)
    seen: set[int] = set()
    keys = redis_pipeline.Keys
    first = redis_logical._fresh(keys([b"a", b"b"], [b"$1", b"$1"], b"$1\r\na\r\n$1\r\nb\r\n"), seen, facts)
    again = redis_logical._fresh(keys([b"b", b"c", b"c"], [b"$1"] * 3, b"raw"), seen, facts)
    assert first.names == [b"a", b"b"] and first.raw is not None
    assert again == ([b"c"], [b"$1"], None) and facts.duplicates == 2


def test_memory_does_not_grow_with_the_values(tmp_path: Path):
    """200k keys of 512 random bytes (100 MiB of values): traced memory stays far below, and grows
    from 20k keys to 200k only by the 64-bit digest per key that guards against SCAN's duplicates."""
    with start_redis(tmp_path / "source") as source:
        peaks = []
        for keys in (20_000, 200_000):
            with source.client() as c:
                for start in range(c.dbsize(), keys, 5000):
                    c.mset({f"key:{i}": os.urandom(512) for i in range(start, start + 5000)})
            sink = _Sink()
            tracemalloc.start()
            try:
                facts = logical_snapshot(source.client, [0], sink)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
            assert facts.keys == {"0": keys} and sink.size > keys * 512
            assert sink.largest <= CHUNK_SIZE + 1000 * 600, "writes of a chunk and at most a batch more"
    assert peaks[1] < 40 << 20, f"peak {peaks[1] >> 20} MiB for 100 MiB of values"
    assert peaks[1] - peaks[0] < 180_000 * 120, f"grew by {(peaks[1] - peaks[0]) // 180_000} B a key"


def test_values_too_large_to_hold_are_streamed(tmp_path: Path, binary: str):
    """Values longer than HUGE go from the socket to the RDB in chunks: traced memory stays far
    below the largest value."""
    with start_redis(tmp_path / "source", password=PASSWORD, binary=binary) as source:
        with source.client(3) as c:
            c.set("small-before", "a")
            c.set("huge", os.urandom(redis_pipeline.HUGE * 3), ex=3600)
            c.hset("huge-hash", mapping={f"f{i}": os.urandom(1000) for i in range(12_000)})  # 12 MB
            c.set("small-after", "b")
        tracemalloc.start()
        try:
            facts = take(source, tmp_path / "dump.rdb")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        expected = snapshot(source, 3)
    assert peak < redis_pipeline.HUGE, f"peak {peak >> 20} MiB"
    assert facts.keys == {"3": 4} and facts.expires == {"3": 1}
    check_rdb(tmp_path / "dump.rdb", facts)
    with start_redis(tmp_path / "restored", rdb_file=tmp_path / "dump.rdb", binary=binary) as restored:
        same(expected, snapshot(restored, 3))


def test_nothing_listening_is_transient_and_quick():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(TransientError, match=f"127.0.0.1:{port}"):
        logical_snapshot(lambda db: redis.Redis("127.0.0.1", port, db=db, retry=NO_RETRY), [0], _Sink())
    assert time.monotonic() - started < 1


def test_server_killed_mid_snapshot_is_transient(tmp_path: Path):
    with start_redis(tmp_path / "source", args=["--enable-debug-command", "yes"]) as source:
        with source.client() as c:
            c.execute_command("DEBUG", "POPULATE", 300_000, "key", 100)
        sink = _Sink(on_first_write=source.kill)
        with pytest.raises(TransientError, match=f"127.0.0.1:{source.port}"):
            logical_snapshot(source.client, [0], sink)


class _Sink:
    """A Writer that counts bytes and the largest write, optionally calling ``on_first_write``."""

    def __init__(self, on_first_write=None):
        self.size = self.largest = 0
        self._on_first_write = on_first_write

    def write(self, data: bytes) -> None:
        if self._on_first_write is not None:
            self._on_first_write()
            self._on_first_write = None
        self.size += len(data)
        self.largest = max(self.largest, len(data))


def test_auto_falls_back_only_when_replication_is_refused(tmp_path: Path):
    """A wrong password or a user without INFO is the same error under auto: never a snapshot."""
    with start_redis(tmp_path / "source", password=PASSWORD) as source:
        with source.client() as c:
            c.execute_command("ACL", "SETUSER", "blind", "on", ">pw", "~*", "+@all", "-info")
        sink = _Sink()
        with pytest.raises(PermanentError, match="REDIS_PASSWORD"):
            dump_redis(redis_settings(source.port, "not-the-password"), sink)
        blind = redis_settings(source.port, "pw").model_copy(update={"redis_username": "blind"})
        with pytest.raises(PermanentError, match=r"(?i)noperm"):
            dump_redis(blind, sink)
    assert sink.size == 0
