"""Restore an RDB file into the application's Redis, which the worker reaches only over the network.

How: a throwaway ``redis-server`` on the worker loads the RDB (redis_server.py: the server, and the
version checks done before anything is written). Every key of every database is then copied into
the target in pipelined batches: SCAN COUNT 1000, DUMP and PTTL on the throwaway, ``RESTORE key ttl
payload REPLACE`` on the target (the remaining TTL, so a key that expired since the backup is not
restored). DUMP/RESTORE carries every type whole, binary keys and values, and streams with their
consumer groups and pending entries. Last, each database of the target is swept: a key the backup
lacks is unlinked, and a database the backup has no keys in ends up empty.

Why sweep after copying rather than FLUSHDB first: a copy can fail half way (a lost connection, the
target's maxmemory, a killed worker). After FLUSHDB first, the live Redis would hold only part of
the backup, most of the application's keys gone. Copying first leaves every key either at its
backup value or at its live value, nothing lost that the backup would not replace, and a rerun
converges on the backup. The cost: the target needs memory for its extra keys until the sweep,
and the sweep scans the target once. It never needs FLUSHDB (often renamed away in production).
Stop the application's writers while restoring: a key written meanwhile may be kept or removed.

Versions: before the copy, the target is checked to take a payload the throwaway makes; as every
payload carries the same RDB version, a refusal could only come at the first batch anyway.

Memory: the throwaway holds the whole data set in the worker's memory while it runs; this process
holds one pipeline of payloads at a time, at most BATCH_BYTES (as MEMORY USAGE estimates them) or
one larger key.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from pydantic import BaseModel
from redis.backoff import NoBackoff
from redis.retry import Retry

from vq_tasks.errors import BackupError, PermanentError, TransientError, redact
from vq_tasks.restore.redis_server import (
    LOAD_TIMEOUT,
    NOTHING_WRITTEN,
    Progress,
    Throwaway,
    check_versions,
    payload_rdb_version,
    rdb_file_version,
    rdb_version_of,
    server_binary_path,
    server_binary_version,
    too_new_for_target,
)
from vq_tasks.settings import Settings
from vq_tasks.sources.redis import client_error, server_error, server_facts

BATCH_SIZE = 1000
BATCH_BYTES = 64 << 20  # the DUMP payloads that one pipeline holds, unless a single key is larger
PARTIAL = (
    "the restore stopped part way: the target holds some keys of the backup and keeps its others;"
    " run it again once the cause is fixed"
)


class RedisPlan(BaseModel):
    """What restore_redis would do, computed without changing anything."""

    target: str
    target_version: str
    rdb_version: int
    server_binary: str
    server_version: str
    backup_keys: dict[str, int]  # keys per database in the backup
    target_keys: dict[str, int]  # keys per database in the target now
    replaced: dict[str, int]  # keys of the target that the backup has: overwritten
    removed: dict[str, int]  # keys of the target that the backup lacks: deleted


class RedisRestoreResult(BaseModel):
    target: str
    rdb_version: int
    restored: dict[str, int]  # keys restored per database
    expired: dict[str, int]  # keys of the backup whose TTL ran out before they were copied
    removed: dict[str, int]  # keys of the target the backup lacked, per database
    keys: dict[str, int]  # keys per database in the target afterwards
    duration_seconds: float


def target_where(settings: Settings) -> str:
    """Given settings, return how messages name the target: "Redis host:port"."""
    host, port = settings.redis_host, settings.redis_port
    return f"Redis [{host}]:{port}" if ":" in host else f"Redis {host}:{port}"


class _Session:
    """The target and the throwaway, one client per database of each, and their error handling."""

    def __init__(self, settings: Settings, throwaway: Throwaway):
        self.settings = settings
        self.throwaway = throwaway
        self.where = target_where(settings)
        secret = settings.redis_password
        self.password = (secret.get_secret_value() or None) if secret is not None else None
        self._clients: dict[tuple[str, str], redis.Redis] = {}

    def target(self, db: str) -> redis.Redis:
        if ("target", db) not in self._clients:
            s = self.settings
            self._clients["target", db] = redis.Redis(
                s.redis_host,
                s.redis_port,
                db=int(db),
                password=self.password,
                socket_timeout=s.redis_timeout,
                socket_connect_timeout=s.redis_timeout,
                retry=Retry(NoBackoff(), 0),
            )
        return self._clients["target", db]

    def source(self, db: str) -> redis.Redis:
        if ("source", db) not in self._clients:
            self._clients["source", db] = self.throwaway.client(int(db))
        return self._clients["source", db]

    @contextmanager
    def on_target(self) -> Iterator[None]:
        """Turn an error of redis-py talking to the target into TransientError or PermanentError."""
        try:
            yield
        except redis.exceptions.RedisError as exc:
            raise client_error(exc, self.where, self.password) from None

    @contextmanager
    def on_source(self) -> Iterator[None]:
        """Turn an error of redis-py talking to the throwaway into TransientError or PermanentError."""
        try:
            yield
        except redis.exceptions.RedisError as exc:
            text = f"{self.throwaway.where} failed: {redact(str(exc), [self.throwaway.password])}"
            lost = isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)
            raise (TransientError if lost else PermanentError)(text) from None

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


class _Prepared(BaseModel):
    rdb_version: int
    target_version: str
    server_version: str
    backup_keys: dict[str, int]
    target_keys: dict[str, int]


@contextmanager
def _prepared(
    settings: Settings, rdb_path: Path, binary: str | None, progress: Progress | None, load_timeout: float
) -> Iterator[tuple[_Session, _Prepared]]:
    """Given what a restore needs, check every version, start the throwaway with the RDB loaded and
    check that the target takes its databases and payloads; yield both, with the facts found.
    Raise PermanentError or TransientError, having written nothing."""
    rdb_version = rdb_file_version(rdb_path)
    target_version, target_keys, _ = server_facts(settings)
    binary = server_binary_path(binary)
    server_version = server_binary_version(binary)
    check_versions(rdb_version, target_where(settings), target_version, binary, server_version)
    throwaway = Throwaway(binary, rdb_path, settings.redis_timeout, load_timeout)
    session = _Session(settings, throwaway)
    try:
        throwaway.start(progress)
        with session.on_source():
            keyspace = throwaway.client().info("keyspace")
        backup_keys = {
            name[2:]: int(stats["keys"]) for name, stats in keyspace.items() if name.startswith("db")
        }
        facts = _Prepared(
            rdb_version=rdb_version,
            target_version=target_version,
            server_version=server_version,
            backup_keys=backup_keys,
            target_keys=target_keys,
        )
        _check_target_takes(session, facts)
        yield session, facts
    finally:
        session.close()
        throwaway.close()


def _check_target_takes(session: _Session, facts: _Prepared) -> None:
    """Given a session and its facts, return if the target has every database of the backup and
    takes the throwaway's payloads. Raise PermanentError otherwise."""
    for db in facts.backup_keys:
        try:
            session.target(db).ping()
        except redis.exceptions.ResponseError as exc:
            reason = redact(str(exc), [session.password] if session.password else [])
            raise PermanentError(
                f"the target {session.where} refuses database {db}, which the backup has ({reason}):"
                f" raise its 'databases' setting; {NOTHING_WRITTEN}"
            ) from None
        except redis.exceptions.RedisError as exc:
            raise client_error(exc, session.where, session.password) from None
    target_rdb = rdb_version_of(facts.target_version, f"the target {session.where}")
    for db in facts.backup_keys:
        with session.on_source():
            key = session.source(db).randomkey()
            payload = session.source(db).dump(key) if key is not None else None
        if payload is None:
            continue
        if target_rdb is not None and payload_rdb_version(payload) > target_rdb:
            raise too_new_for_target(
                payload_rdb_version(payload),
                session.throwaway.binary,
                facts.server_version,
                session.where,
                facts.target_version,
            )
        return


def copy_database(session: _Session, db: str, batch: int, progress: Progress | None) -> tuple[int, int]:
    """Given a session and a database, copy every key of the throwaway's database into the target's,
    with its remaining TTL, replacing what is there; return how many keys were restored and how
    many had expired first. Raise TransientError or PermanentError naming the server."""
    source = session.source(db)
    restored = expired = 0
    cursor = None
    while cursor != 0:
        with session.on_source():
            cursor, keys = source.scan(cursor or 0, count=batch)
            pipe = source.pipeline(transaction=False)
            for key in keys:
                pipe.memory_usage(key)
            sizes = pipe.execute() if keys else []
        for group in groups_by_size(keys, sizes, BATCH_BYTES):
            done, gone = _copy_keys(session, db, group)
            restored, expired = restored + done, expired + gone
        if progress:
            progress("restored", db, restored)
    return restored, expired


def groups_by_size(keys: list[bytes], sizes: list[int | None], limit: int) -> Iterator[list[bytes]]:
    """Given keys and their sizes (None: gone), yield them in groups whose sizes add up to at most
    ``limit``, but for a single key larger than that: what one pipeline holds in memory."""
    group: list[bytes] = []
    total = 0
    for key, size in zip(keys, sizes, strict=True):
        if group and total + (size or 0) > limit:
            yield group
            group, total = [], 0
        group.append(key)
        total += size or 0
    if group:
        yield group


def _copy_keys(session: _Session, db: str, keys: list[bytes]) -> tuple[int, int]:
    """Given a session, a database and keys, copy them with DUMP, PTTL and RESTORE ... REPLACE;
    return how many were restored and how many had expired. Raise as copy_database does."""
    with session.on_source():
        pipe = session.source(db).pipeline(transaction=False)
        for key in keys:
            pipe.dump(key)
            pipe.pttl(key)
        replies = pipe.execute()
    pipe = session.target(db).pipeline(transaction=False)
    for key, payload, ttl in zip(keys, replies[::2], replies[1::2], strict=True):
        if payload is not None and ttl not in (-2, 0):  # 0: expiring this very millisecond
            pipe.restore(key, 0 if ttl == -1 else ttl, payload, replace=True)
    with session.on_target():
        answers = pipe.execute(raise_on_error=False) if len(pipe) else []
    _raise_first_error(answers, session)
    return len(answers), len(keys) - len(answers)


def _raise_first_error(answers: list[object], session: _Session) -> None:
    """Given the answers to a batch of RESTOREs, return if none is an error; raise the first."""
    for answer in answers:
        if isinstance(answer, Exception):
            text = redact(str(answer), [session.password] if session.password else [])
            if "payload version" in text:
                raise PermanentError(
                    f"the target {session.where} refused a payload of {session.throwaway.where}: {text}"
                    " (set REDIS_SERVER_BIN to a redis-server of the target's version)"
                )
            raise server_error(text, session.where)


def sweep_database(
    session: _Session, db: str, in_backup: bool, batch: int, dry_run: bool, progress: Progress | None = None
) -> tuple[int, int]:
    """Given a session and a database of the target, delete (unless ``dry_run``) its keys that the
    backup's database lacks (all if not ``in_backup``); return how many keys the backup has and how
    many it lacks. Raise TransientError or PermanentError naming the server."""
    source, target = session.source(db), session.target(db)
    kept = removed = 0
    cursor = None
    while cursor != 0:
        with session.on_target():
            cursor, keys = target.scan(cursor or 0, count=batch)
        missing = keys
        if in_backup and keys:
            with session.on_source():
                pipe = source.pipeline(transaction=False)
                for key in keys:
                    pipe.exists(key)
                missing = [key for key, found in zip(keys, pipe.execute(), strict=True) if not found]
        if missing and not dry_run:
            with session.on_target():
                target.unlink(*missing)
        kept, removed = kept + len(keys) - len(missing), removed + len(missing)
        if progress:
            progress("removed", db, removed)
    return kept, removed


def _sorted_dbs(*groups: dict[str, int]) -> list[str]:
    return sorted({db for group in groups for db in group}, key=int)


def plan_redis_restore(settings: Settings, rdb_path: Path, server_binary: str | None = None) -> RedisPlan:
    """Given settings naming the target Redis and an RDB file, return what restore_redis would do:
    keys per database in the backup and in the target, and which of the target's it would replace
    or remove. Change nothing. Raise PermanentError or TransientError as restore_redis does."""
    with _prepared(settings, rdb_path, server_binary, None, LOAD_TIMEOUT) as (session, facts):
        replaced, removed = {}, {}
        for db in _sorted_dbs(facts.target_keys):
            counts = sweep_database(session, db, db in facts.backup_keys, BATCH_SIZE, dry_run=True)
            replaced[db], removed[db] = counts
        return RedisPlan(
            target=session.where,
            target_version=facts.target_version,
            rdb_version=facts.rdb_version,
            server_binary=session.throwaway.binary,
            server_version=facts.server_version,
            backup_keys=facts.backup_keys,
            target_keys=facts.target_keys,
            replaced=replaced,
            removed=removed,
        )


def restore_redis(
    settings: Settings,
    rdb_path: Path,
    server_binary: str | None = None,
    progress: Progress | None = None,
    *,
    batch_size: int = BATCH_SIZE,
    load_timeout: float = LOAD_TIMEOUT,
) -> RedisRestoreResult:
    """Given settings naming the target Redis and an RDB file, make every database of the target
    hold exactly the backup's keys, values and remaining TTLs, and return keys restored, expired
    and removed per database and the target's keys afterwards. ``progress`` is called as Progress
    says. Raise PermanentError or TransientError naming the server, never with a password; before
    the copy starts nothing is written, after, the message says the restore stopped part way."""
    started = time.monotonic()
    restored, expired, removed = {}, {}, {}
    with _prepared(settings, rdb_path, server_binary, progress, load_timeout) as (session, facts):
        try:
            for db in _sorted_dbs(facts.backup_keys):
                restored[db], expired[db] = copy_database(session, db, batch_size, progress)
            for db in _sorted_dbs(facts.backup_keys, redis_key_counts(settings)):
                in_backup = db in facts.backup_keys
                removed[db] = sweep_database(session, db, in_backup, batch_size, False, progress)[1]
        except BackupError as exc:
            raise type(exc)(f"{exc}; {PARTIAL}") from None
    return RedisRestoreResult(
        target=session.where,
        rdb_version=facts.rdb_version,
        restored=restored,
        expired=expired,
        removed=removed,
        keys=redis_key_counts(settings),
        duration_seconds=round(time.monotonic() - started, 3),
    )


def redis_key_counts(settings: Settings) -> dict[str, int]:
    """Given settings naming the target Redis, return its keys per non-empty database (INFO
    keyspace, keyed by the database number as a string). Raise as server_facts does."""
    return server_facts(settings)[1]
