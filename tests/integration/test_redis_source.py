"""dump_redis against real redis-servers: the RDB it writes loads into a new server with every key
intact, with diskless and disk-based sync, on every redis-server version found on this machine."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

import pytest
import redis

from tests.servers import RedisServer, free_port, redis_server_binaries, redis_settings, start_redis
from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.sources.redis import dump_redis

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-Pa$$-word"
BINARIES = redis_server_binaries()
DATABASES = (0, 3)


@pytest.fixture(params=sorted(BINARIES), ids=lambda version: f"redis-{version}")
def binary(request: pytest.FixtureRequest) -> str:
    return BINARIES[request.param]


def fill(server: RedisServer) -> None:
    """Put every kind of value in databases 0 and 3, small and large encodings, binary and TTLs."""
    for db in DATABASES:
        with server.client(db) as client:
            tag = f"db{db}-"
            client.set("string", tag + "value")
            client.set(b"\x00\xff binary\r\nkey", bytes(range(256)) + tag.encode())
            client.hset("hash", mapping={"a": "1", b"\xfe\x00": b"\x00\xff"})
            client.hset("big-hash", mapping={f"field{i}": f"{tag}{i}" for i in range(600)})
            client.rpush("list", *[f"{tag}{i}" for i in range(1000)])
            client.sadd("set", "a", "b", tag)
            client.sadd("int-set", *range(100))
            client.sadd("big-set", *[f"{tag}member{i}" for i in range(600)])
            client.zadd("zset", {"a": 1, "b": 2.5, tag: -3})
            client.zadd("big-zset", {f"{tag}m{i}": i / 7 for i in range(600)})
            for i in range(5):
                client.xadd("stream", {"n": i, "tag": tag})
            client.xgroup_create("stream", "group", id="0")
            client.xreadgroup("group", "consumer", {"stream": ">"}, count=2)
            client.set("expiring", "soon", ex=3600)
            client.hset("expiring-hash", "a", "b")
            client.pexpire("expiring-hash", 7_200_000)
            client.mset({f"{tag}key:{i}": i for i in range(300 + db)})
    with server.client(0) as client:
        client.set("large", os.urandom(3 << 20))  # incompressible: the RDB spans several chunks


def snapshot(server: RedisServer, db: int) -> dict[bytes, tuple[bytes, object, bool]]:
    """Return every key of database ``db`` with its TYPE, DUMP and whether it expires."""
    with server.client(db) as client:
        return {
            key: (client.type(key), value(client, key), client.pttl(key) > 0)
            for key in client.scan_iter(count=1000)
        }


def value(client: redis.Redis, key: bytes) -> object:
    """Return the DUMP of ``key``; for a hash table, whose DUMP lists fields in the table's order
    (which a reload changes), its sorted contents instead."""
    if client.object("encoding", key) != b"hashtable":
        return client.dump(key)
    if client.type(key) == b"set":
        return sorted(client.smembers(key))
    return sorted(client.hgetall(key).items())


@pytest.mark.parametrize("diskless", ["yes", "no"])
def test_dump_loads_into_a_new_server_with_every_key(tmp_path: Path, binary: str, diskless: str):
    with start_redis(
        tmp_path / "source", password=PASSWORD, binary=binary, args=["--repl-diskless-sync", diskless]
    ) as source:
        fill(source)
        rdb = tmp_path / "backup" / "dump.rdb"
        rdb.parent.mkdir()
        with open(rdb, "wb") as out:
            facts = dump_redis(redis_settings(source.port, PASSWORD), out)
        expected = {db: snapshot(source, db) for db in DATABASES}
        target = "replicas sockets" if diskless == "yes" else "disk"
        assert f"Starting BGSAVE for SYNC with target: {target}" in source.log_text()

    assert facts.redis_version in BINARIES and BINARIES[facts.redis_version] == binary
    assert facts.keys == {str(db): len(expected[db]) for db in DATABASES}
    assert facts.expires == {"0": 2, "3": 2}
    assert facts.crc64_checked
    header = rdb.read_bytes()[:9]
    assert header[:5] == b"REDIS" and facts.rdb_version == int(header[5:]) >= 9

    with start_redis(tmp_path / "restored", rdb_file=rdb, binary=binary) as restored:
        for db in DATABASES:
            assert snapshot(restored, db) == expected[db]


def test_rdbchecksum_off_is_reported_unchecked(tmp_path: Path, binary: str):
    with start_redis(tmp_path, password=PASSWORD, binary=binary, args=["--rdbchecksum", "no"]) as source:
        fill(source)
        sink = _Sink()
        facts = dump_redis(redis_settings(source.port, PASSWORD), sink)
    assert not facts.crc64_checked
    assert sink.size > 3 << 20


def test_wrong_password_is_permanent_and_never_shown(tmp_path: Path, binary: str):
    wrong = "wr0ng-Pa$$-word"
    with (
        start_redis(tmp_path, password=PASSWORD, binary=binary) as source,
        pytest.raises(PermanentError) as caught,
    ):
        started = time.monotonic()
        dump_redis(redis_settings(source.port, wrong), _Sink())
    assert time.monotonic() - started < 1, "no retry loop inside: a wrong password stays wrong"
    message = str(caught.value)
    assert f"127.0.0.1:{source.port} refused the password (REDIS_PASSWORD)" in message
    assert wrong not in message and PASSWORD not in message
    logged = "".join(traceback.format_exception(caught.value))
    assert wrong not in logged and PASSWORD not in logged


def test_missing_password_is_permanent(tmp_path: Path, binary: str):
    with (
        start_redis(tmp_path, password=PASSWORD, binary=binary) as source,
        pytest.raises(PermanentError, match="requires a password: set REDIS_PASSWORD"),
    ):
        dump_redis(redis_settings(source.port), _Sink())


def test_password_for_a_server_without_one_is_permanent(tmp_path: Path, binary: str):
    with (
        start_redis(tmp_path, binary=binary) as source,
        pytest.raises(PermanentError, match="has no password but REDIS_PASSWORD is set") as caught,
    ):
        dump_redis(redis_settings(source.port, PASSWORD), _Sink())
    assert PASSWORD not in str(caught.value)


def test_user_without_sync_permission_is_permanent(tmp_path: Path, binary: str):
    """With REDIS_BACKUP_METHOD=sync; auto takes a logical snapshot instead (test_redis_logical.py)."""
    with start_redis(tmp_path, password=PASSWORD, binary=binary) as source:
        with source.client() as client:
            client.execute_command("ACL", "SETUSER", "default", "-sync", "-psync")
        sink = _Sink()
        settings = redis_settings(source.port, PASSWORD).model_copy(update={"redis_backup_method": "sync"})
        with pytest.raises(PermanentError, match=r"NOPERM.*sync"):
            dump_redis(settings, sink)
        assert sink.size == 0
        assert dump_redis(redis_settings(source.port, PASSWORD), sink).method == "dump"


def test_nothing_listening_is_transient_and_quick():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(TransientError, match=f"127.0.0.1:{port}"):
        dump_redis(redis_settings(port), _Sink())
    assert time.monotonic() - started < 1, "no retry loop inside: the task retries with backoff"


def test_server_killed_mid_transfer_is_transient(tmp_path: Path, binary: str):
    with start_redis(
        tmp_path, password=PASSWORD, binary=binary, args=["--repl-diskless-sync", "no"]
    ) as source:
        with source.client() as client:
            client.set("huge", os.urandom(48 << 20))
        sink = _Sink(on_first_write=source.kill)
        with pytest.raises(TransientError, match=f"127.0.0.1:{source.port}"):
            dump_redis(redis_settings(source.port, PASSWORD), sink)
    assert 0 < sink.size < 48 << 20


class _Sink:
    """A Writer that counts bytes, optionally calling ``on_first_write`` once."""

    def __init__(self, on_first_write=None):
        self.size = 0
        self._on_first_write = on_first_write

    def write(self, data: bytes) -> None:
        if self._on_first_write is not None:
            self._on_first_write()
            self._on_first_write = None
        self.size += len(data)
