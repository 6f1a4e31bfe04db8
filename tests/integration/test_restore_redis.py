"""restore_redis against real redis-servers: an RDB taken by dump_redis is restored into another
Redis with every key, type, value and TTL of every database, the target's other keys gone; the plan
changes nothing; versions that do not line up, a wrong password, a damaged RDB and a missing
database are refused with nothing written."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
import redis

from tests.integration.conftest import fill_redis, redis_value
from tests.servers import RedisServer, redis_server_binaries, redis_settings, start_redis
from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.restore.redis import plan_redis_restore, redis_key_counts, restore_redis
from vq_tasks.restore.redis_server import FOLDER_PREFIX
from vq_tasks.restore.redis_transaction import Transaction
from vq_tasks.settings import Settings
from vq_tasks.sources.redis import dump_redis

pytestmark = pytest.mark.integration

SOURCE_PASSWORD = "source-Pa$$-word"
TARGET_PASSWORD = "target-Pa$$-w0rd"
DATABASES = range(4)
BINARIES = redis_server_binaries()
REDIS_62 = next((path for version, path in BINARIES.items() if version.startswith("6.2.")), None)
REDIS_70 = next((path for version, path in BINARIES.items() if version.startswith("7.0.")), None)
needs_both = pytest.mark.skipif(not (REDIS_62 and REDIS_70), reason="needs redis-server 6.2 and 7.0")


def fill_source(server: RedisServer) -> None:
    """fill_redis (every type, binary, TTLs, a stream with a group in dbs 0 and 1), and more: a
    pending entry, a hash table, a millisecond TTL, and enough keys for several SCAN batches."""
    fill_redis(server)
    with server.client(0) as client:
        client.xreadgroup("displays", "screen-1", {"events:0": ">"}, count=1)
        client.hset("big-hash", mapping={f"field{i}": i for i in range(600)})
        client.sadd("big-set", *[f"member{i}" for i in range(600)])
        client.set(b"\x00\xfe binary\r\nkey", os.urandom(1000))
        client.set("pexpiring", "soon", px=7_200_000)
        client.mset({f"bulk:{i}": i for i in range(2500)})
    with server.client(1) as client:
        client.set("overlap", "from the backup")


def fill_target(server: RedisServer) -> None:
    """Keys the backup has (other values, types and TTLs), keys it lacks, and a database it lacks."""
    with server.client(0) as client:
        client.set("queue:0:counter", 7)
        client.rpush("open:0", "a list where the backup has a set")
        client.set("session:0", "live", ex=99_999)
        client.set("bulk:5", "live")
        client.set("extra:0", "only in the target")
        client.set(b"extra:\xff", b"\x00", ex=500)
    with server.client(1) as client:
        client.set("overlap", "live", ex=500)
        client.sadd("extra:1", "a", "b")
    with server.client(3) as client:
        client.set("db3:only", "x")
        client.hset("db3:hash", "a", "b")


def take_rdb(source: RedisServer, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        dump_redis(redis_settings(source.port, source.password), out)
    return path


def state(server: RedisServer) -> dict[int, dict[bytes, tuple[bytes, object, bool]]]:
    """Return every key of every database with its TYPE, DUMP (value if not deterministic) and
    whether it expires."""
    found = {}
    for db in DATABASES:
        with server.client(db) as client:
            found[db] = {
                key: (client.type(key), dump(client, key), client.pttl(key) > 0) for key in client.scan_iter()
            }
    return found


def dump(client: redis.Redis, key: bytes) -> object:
    """Return the DUMP of ``key``; for a hash table, whose order a reload changes, its value."""
    if client.object("encoding", key) == b"hashtable":
        return redis_value(client, key)
    return client.dump(key)


def assert_same(source: RedisServer, target: RedisServer, by_dump: bool) -> None:
    """Assert that both hold the same keys in every database, with the same TYPE, DUMP (or value)
    and TTL (within 5 s)."""
    for db in DATABASES:
        with source.client(db) as want, target.client(db) as got:
            keys = set(want.scan_iter(count=1000))
            assert set(got.scan_iter(count=1000)) == keys, f"db {db}"
            for key in keys:
                assert got.type(key) == want.type(key), key
                if by_dump:
                    assert dump(got, key) == dump(want, key), key
                assert redis_value(got, key) == redis_value(want, key), key
                ttl_want, ttl_got = want.pttl(key), got.pttl(key)
                assert (ttl_got == -1) if ttl_want == -1 else abs(ttl_got - ttl_want) < 5000, key


class Pair(NamedTuple):
    """A source Redis, the RDB dump_redis took of it, and the target Redis to restore into."""

    source: RedisServer
    target: RedisServer
    rdb: Path


Fill = Callable[[RedisServer], object]


@pytest.fixture
def redis_pair(tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    """Return a function that starts this test's own source and target redis-servers (both stopped
    after the test): ``binary`` for both unless ``target_binary`` is given, the source with
    ``source_password``, the target with TARGET_PASSWORD and ``target_args``. It fills the source
    with ``source_fill``, takes its RDB into backup/redis.rdb, then fills the target with
    ``target_fill`` (None leaves either empty)."""
    with contextlib.ExitStack() as stack:

        def make(
            binary: str | None = None,
            *,
            target_binary: str | None = None,
            source_password: str | None = None,
            target_args: Sequence[str] = (),
            source_fill: Fill | None = fill_source,
            target_fill: Fill | None = fill_target,
        ) -> Pair:
            source = stack.enter_context(
                start_redis(tmp_path / "source", password=source_password, binary=binary)
            )
            target = stack.enter_context(
                start_redis(
                    tmp_path / "target",
                    password=TARGET_PASSWORD,
                    binary=target_binary or binary,
                    args=target_args,
                )
            )
            if source_fill is not None:
                source_fill(source)
            rdb = take_rdb(source, tmp_path / "backup" / "redis.rdb")
            if target_fill is not None:
                target_fill(target)
            return Pair(source, target, rdb)

        yield make


@pytest.fixture
def filled_pair(redis_pair: Callable[..., Pair]) -> Pair:
    """The usual pair: the default redis-server, a source without a password filled by
    fill_source, its RDB, and a target filled by fill_target."""
    return redis_pair()


@pytest.mark.parametrize("version", sorted(BINARIES), ids=lambda v: f"redis-{v}")
def test_round_trip_restores_every_key_and_removes_the_others(redis_pair, version: str):
    binary = BINARIES[version]
    source, target, rdb = redis_pair(binary, source_password=SOURCE_PASSWORD)
    settings = redis_settings(target.port, TARGET_PASSWORD)
    source_counts = {str(db): n for db in DATABASES if (n := source.client(db).dbsize())}

    before = state(target)
    plan = plan_redis_restore(settings, rdb, server_binary=binary)
    assert state(target) == before, "the plan changed the target"
    assert plan.backup_keys == source_counts
    assert plan.target_keys == {"0": 6, "1": 2, "3": 2}
    assert plan.replaced == {"0": 4, "1": 1, "3": 0}
    assert plan.removed == {"0": 2, "1": 1, "3": 2}
    assert plan.server_version == plan.target_version == version

    seen = []
    result = restore_redis(settings, rdb, server_binary=binary, progress=lambda *a: seen.append(a))
    assert_same(source, target, by_dump=True)
    with source.client(0) as want, target.client(0) as got:
        assert got.xinfo_groups("events:0") == want.xinfo_groups("events:0")
        assert got.xpending("events:0", "displays") == want.xpending("events:0", "displays")
        assert got.xpending("events:0", "displays")["pending"] == 1
        assert got.get(b"bin:\x00\xff") == bytes(range(256))

    assert result.restored == source_counts and result.keys == source_counts
    assert result.expired == {"0": 0, "1": 0}
    assert result.removed == {"0": 2, "1": 1, "3": 2}
    assert result.target == f"Redis 127.0.0.1:{target.port}" and result.rdb_version >= 9
    assert ("queued", "0", source_counts["0"]) in seen and ("removed", "3", 2) in seen
    assert seen[-1][:2] == ("applying", ""), "one transaction applies it all, after everything is queued"


@needs_both
def test_upgrade_from_a_62_backup_into_a_70_target(redis_pair):
    source, target, rdb = redis_pair(REDIS_62, target_binary=REDIS_70, source_password=SOURCE_PASSWORD)
    restore_redis(redis_settings(target.port, TARGET_PASSWORD), rdb, server_binary=REDIS_62)
    assert_same(source, target, by_dump=False)


def test_large_values_are_copied_whole(redis_pair):
    """Payloads of 700 kB (larger than the reader's buffer is not needed: each is assembled whole
    from its chunks), a long list, and small keys beside them."""

    def fill_large(server: RedisServer) -> None:
        with server.client(2) as client:
            client.mset({f"large:{i}": os.urandom(700_000) for i in range(5)})
            client.mset({f"small:{i}": i for i in range(300)})
            client.rpush("large-list", *[os.urandom(1000) for _ in range(3000)])

    source, target, rdb = redis_pair(source_fill=fill_large, target_fill=None)
    result = restore_redis(redis_settings(target.port, TARGET_PASSWORD), rdb, source_binary(source))
    assert_same(source, target, by_dump=True)
    assert result.restored == {"2": 306}


def test_empty_backup_empties_every_database(redis_pair):
    source, target, rdb = redis_pair(source_fill=None)
    result = restore_redis(
        redis_settings(target.port, TARGET_PASSWORD), rdb, server_binary=source_binary(source)
    )
    assert redis_key_counts(redis_settings(target.port, TARGET_PASSWORD)) == {}
    assert result.restored == {} and result.removed == {"0": 6, "1": 2, "3": 2}


def source_binary(server: RedisServer) -> str:
    return server.process.args[0]


def refused(settings: Settings, rdb: Path, binary: str | None, target: RedisServer) -> str:
    """Return the message of the PermanentError that both the plan and the restore raise, having
    checked that neither changed the target."""
    before = state(target)
    with pytest.raises(PermanentError) as planned:
        plan_redis_restore(settings, rdb, server_binary=binary)
    with pytest.raises(PermanentError) as caught:
        restore_redis(settings, rdb, server_binary=binary)
    assert state(target) == before, "a refused restore changed the target"
    assert re.sub(r":\d+", "", str(planned.value)) == re.sub(r":\d+", "", str(caught.value))
    return str(caught.value)


@needs_both
def test_newer_rdb_is_refused_against_an_older_target(redis_pair):
    _, target, rdb = redis_pair(REDIS_70, target_binary=REDIS_62)
    message = refused(redis_settings(target.port, TARGET_PASSWORD), rdb, REDIS_70, target)
    assert f"127.0.0.1:{target.port}" in message
    assert "RDB is version 10" in message and "Redis 6.2.14" in message and "up to 9" in message
    assert "nothing was written" in message


@needs_both
def test_throwaway_newer_than_the_target_is_refused(redis_pair):
    """An RDB 9 loads into 7.0, but 7.0's payloads (RDB 10) would be refused by a 6.2 target."""
    _, target, rdb = redis_pair(REDIS_62)
    message = refused(redis_settings(target.port, TARGET_PASSWORD), rdb, REDIS_70, target)
    assert "payloads of RDB version 10" in message and "REDIS_SERVER_BIN" in message and "6.2.14" in message


@needs_both
def test_payload_check_refuses_a_throwaway_the_table_does_not_know(
    redis_pair, monkeypatch: pytest.MonkeyPatch
):
    """With 7.0 unknown to the table, the payload it makes still shows RDB 10, which 6.2 refuses."""
    monkeypatch.setattr("vq_tasks.restore.redis_server.RDB_VERSIONS", {(5, 0): 9, (6, 0): 9, (6, 2): 9})
    _, target, rdb = redis_pair(REDIS_62)
    message = refused(redis_settings(target.port, TARGET_PASSWORD), rdb, REDIS_70, target)
    assert "payloads of RDB version 10" in message and "nothing was written" in message


@needs_both
def test_throwaway_too_old_for_the_rdb_is_refused(redis_pair):
    _, target, rdb = redis_pair(REDIS_70)
    message = refused(redis_settings(target.port, TARGET_PASSWORD), rdb, REDIS_62, target)
    assert "RDB is version 10" in message and "redis-server 6.2.14" in message and "up to 9" in message


def test_wrong_target_password_is_permanent_and_never_shown(filled_pair: Pair):
    wrong = "wr0ng-Pa$$-word"
    source, target, rdb = filled_pair
    message = refused(redis_settings(target.port, wrong), rdb, source_binary(source), target)
    with pytest.raises(PermanentError) as caught:
        restore_redis(redis_settings(target.port, wrong), rdb, server_binary=source_binary(source))
    assert f"127.0.0.1:{target.port} refused the password (REDIS_PASSWORD)" in message
    logged = "".join(traceback.format_exception(caught.value))
    assert wrong not in logged and TARGET_PASSWORD not in logged


def test_damaged_rdb_is_refused_with_the_servers_reason(filled_pair: Pair):
    source, target, rdb = filled_pair
    data = rdb.read_bytes()
    rdb.write_bytes(data[: len(data) // 2])
    message = refused(redis_settings(target.port, TARGET_PASSWORD), rdb, source_binary(source), target)
    assert "could not load the RDB" in message and "throwaway redis-server" in message, message


def test_database_missing_in_the_target_is_refused(redis_pair):
    def one_key(server: RedisServer) -> None:
        with server.client(0) as client:
            client.set("live", "x")

    source, target, rdb = redis_pair(target_args=["--databases", "1"], target_fill=one_key)
    before = target.client(0).dump("live")
    with pytest.raises(PermanentError, match="refuses database 1") as caught:
        restore_redis(redis_settings(target.port, TARGET_PASSWORD), rdb, server_binary=source_binary(source))
    assert target.client(0).dbsize() == 1 and target.client(0).dump("live") == before
    assert "nothing was written" in str(caught.value)


def test_throwaway_keeps_its_password_out_of_argv_and_leaves_nothing(tmp_path: Path, redis_pair):
    """A wrapper records the throwaway's pid and argv (Redis rewrites its own process title)."""
    record = tmp_path / "argv.txt"
    wrapper = tmp_path / "redis-server"
    seen: dict[str, object] = {}

    def inspect(stage: str, db: str, count: int) -> None:
        if "argv" not in seen:
            pid, *argv = _last_launch(record)
            config = Path(argv[-1])
            seen.update(pid=int(pid), argv=argv, folder=config.parent, config=config.read_text())
            seen.update(mode=stat.S_IMODE(config.stat().st_mode), running=psutil.pid_exists(int(pid)))

    source, target, rdb = redis_pair(target_fill=None)
    wrapper.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "---" "$$" "$@" >> {record}\nexec {source_binary(source)} "$@"\n'
    )
    wrapper.chmod(0o755)
    restore_redis(redis_settings(target.port, TARGET_PASSWORD), rdb, str(wrapper), progress=inspect)
    password = next(line.split()[1] for line in seen["config"].splitlines() if line.startswith("requirepass"))
    assert len(password) >= 32 and seen["mode"] == 0o600 and seen["running"]
    assert len(seen["argv"]) == 1 and password not in seen["argv"][0]
    assert not psutil.pid_exists(seen["pid"]) and not seen["folder"].exists()
    assert rdb.exists(), "the backup's RDB is left in place"


def _last_launch(record: Path) -> list[str]:
    """Return the pid and arguments of the last run the wrapper recorded."""
    return record.read_text().split("---\n")[-1].splitlines()


def test_target_lost_mid_copy_is_transient_and_says_so(redis_pair):
    def kill_target(stage: str, db: str, count: int) -> None:
        if stage == "queued":
            target.kill()

    source, target, rdb = redis_pair(target_fill=None)
    with pytest.raises(TransientError) as caught:
        restore_redis(
            redis_settings(target.port, TARGET_PASSWORD),
            rdb,
            source_binary(source),
            progress=kill_target,
            batch_size=100,
        )
    message = str(caught.value)
    assert f"127.0.0.1:{target.port}" in message and "nothing was written" in message


def test_a_restore_stopped_while_it_queues_leaves_the_target_as_it_was(filled_pair: Pair):
    """The throwaway (the backup's side) is killed when half the keys are queued in the target's
    transaction: the restore fails saying nothing was written, and the target is exactly as it was
    (the server dropped the queue with the connection); a rerun then restores everything."""
    throwaways: list[psutil.Process] = []

    def kill_the_throwaway(stage: str, db: str, count: int) -> None:
        if stage == "queued" and count >= 1000 and not throwaways:
            throwaways.extend(  # redis-server runs in its folder; never another child (an emulator)
                p for p in psutil.Process().children() if FOLDER_PREFIX in p.cwd()
            )
            for process in throwaways:
                process.kill()

    source, target, rdb = filled_pair
    before = state(target)
    settings = redis_settings(target.port, TARGET_PASSWORD)
    with pytest.raises(TransientError, match="nothing was written"):
        restore_redis(settings, rdb, source_binary(source), progress=kill_the_throwaway, batch_size=100)
    assert throwaways, "the throwaway was never killed"
    assert state(target) == before
    assert target.client().info("commandstats").get("cmdstat_restore") is None, "a RESTORE ran"
    restore_redis(settings, rdb, source_binary(source), batch_size=100)
    assert_same(source, target, by_dump=True)


def test_a_target_without_room_for_the_transaction_refuses_it_and_is_as_it_was(redis_pair):
    """maxmemory (noeviction) leaves the target room for its own keys, not for the queued restore
    (about 6 MB of payloads): refused with a clear message, nothing written."""

    def fill_large(server: RedisServer) -> None:
        with server.client(0) as client:
            client.mset({f"large:{i}": os.urandom(100_000) for i in range(60)})

    source, target, rdb = redis_pair(source_fill=fill_large)
    before = state(target)
    with target.client() as client:
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + (2 << 20))
        client.config_set("maxmemory-policy", "noeviction")
    with pytest.raises(PermanentError) as caught:
        restore_redis(redis_settings(target.port, TARGET_PASSWORD), rdb, source_binary(source))
    assert state(target) == before
    message = str(caught.value)
    assert "no room for the restore (maxmemory)" in message and "nothing was written" in message


def test_a_command_failing_inside_exec_is_reported_as_a_partial_restore(tmp_path: Path):
    """Redis rolls nothing back inside EXEC: a payload the target refuses only then (a damaged
    one) fails that command alone, and the message says the target is partly restored."""
    with start_redis(tmp_path / "target", password=TARGET_PASSWORD) as target:
        settings = redis_settings(target.port, TARGET_PASSWORD)
        transaction = Transaction(settings)
        try:
            transaction.use("0")
            transaction.queue("SET", "applied", "yes")
            transaction.queue("RESTORE", "damaged", 0, b"\x00not a payload", "REPLACE")
            with pytest.raises(PermanentError) as caught:
                transaction.execute()
        finally:
            transaction.close()
        assert target.client(0).get("applied") == b"yes" and not target.client(0).exists("damaged")
    message = str(caught.value)
    assert "1 of its 3 commands failed" in message and "partly restored" in message
    assert TARGET_PASSWORD not in message


def test_a_transaction_closed_before_exec_writes_nothing(tmp_path: Path):
    with start_redis(tmp_path / "target") as target:
        transaction = Transaction(redis_settings(target.port), batch=2)
        transaction.use("1")
        for i in range(5):
            transaction.queue("SET", f"k{i}", i)
        assert transaction.queued == 6  # SELECT and five SETs, sent in three batches of two
        transaction.close()
        assert target.client(1).dbsize() == 0


def test_a_key_that_expires_in_the_throwaway_during_the_restore_is_removed_from_the_target(redis_pair):
    """ "short" is copied, then its TTL runs out in the throwaway before the sweep looks: the target
    must not keep it (its UNLINK comes after its RESTORE in the transaction). When the sweep came
    first, the target's live "short" stayed."""
    waited = []

    def wait_for_expiry(stage: str, db: str, count: int) -> None:
        if stage == "queued" and not waited:
            waited.append(True)
            time.sleep(2.5)  # the key's TTL ends meanwhile

    def fill_short(server: RedisServer) -> None:
        server.client(0).set("short", "from the backup", px=2000)
        server.client(0).set("kept", "from the backup")

    def fill_live_short(server: RedisServer) -> None:
        server.client(0).set("short", "live")

    source, target, rdb = redis_pair(source_fill=fill_short, target_fill=fill_live_short)
    result = restore_redis(
        redis_settings(target.port, TARGET_PASSWORD), rdb, source_binary(source), progress=wait_for_expiry
    )
    assert not target.client(0).exists("short") and target.client(0).get("kept") == b"from the backup"
    assert (result.restored, result.removed) == ({"0": 2}, {"0": 1}), result
