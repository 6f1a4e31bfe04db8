"""Restore an RDB file into the application's Redis, which the worker reaches only over the network.

How: a throwaway ``redis-server`` on the worker loads the RDB (redis_server.py: the server, and the
version checks done before anything is written). Then one transaction (redis_transaction.py) is
queued in the target: for every key of the backup ``RESTORE key ttl payload REPLACE`` (SCAN COUNT
1000, DUMP and PTTL on the throwaway; the remaining TTL, so a key that expired since the backup is
not restored), then for each database UNLINK of the target's keys the throwaway lacks (looked up
after the copy, so a key that expired meanwhile goes too). DUMP/RESTORE carries every type whole,
binary keys and values, and streams with their consumer groups and pending entries. EXEC applies
it all at once.

Why one transaction: the live Redis must end as it was or fully restored, never half. A copy can
fail part way (a lost connection, the target's maxmemory, a killed worker); until EXEC the target
has only queued commands, which it drops with the connection. It never needs FLUSHDB (often
renamed away in production). The cost: the target holds the queued commands (the backup's size and
about 250 bytes a key) until EXEC, and answers no other client while EXEC runs; a TTL counts from
the moment its key was queued, so it ends up to the restore's duration late. Stop the application's
writers while restoring: a key written meanwhile may be kept or removed.

Versions: before queueing, the target is checked to take a payload the throwaway makes; as every
payload carries the same RDB version, a refusal could only come at EXEC otherwise.

Memory: the throwaway holds the whole data set in the worker's memory while it runs; this process
holds one payload being read (twice: hiredis keeps a buffer of its size until the next SCAN), the
transaction's unsent commands (redis_transaction.BATCH_BYTES, 16 MiB, or one larger command) and
one batch of key names.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import redis
from pydantic import BaseModel

from vq_tasks.clients.redis_connect import plain_settings, redis_client
from vq_tasks.clients.redis_replies import Replies
from vq_tasks.clients.redis_wire import Connection, client_error, command, password_of, server_facts
from vq_tasks.errors import BackupError, PermanentError, TransientError, redact
from vq_tasks.restore.redis_server import (
    HOST,
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
from vq_tasks.restore.redis_transaction import Transaction
from vq_tasks.settings import Settings

BATCH_SIZE = 1000
DUMP_AND_PTTL = b"*2\r\n$4\r\nDUMP\r\n$%d\r\n%b\r\n*2\r\n$4\r\nPTTL\r\n$%d\r\n%b\r\n"  # of one key, in RESP
RESTORE = (
    b"*5\r\n$7\r\nRESTORE\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$7\r\nREPLACE\r\n"  # key ttl payload
)
MISSING = (  # of the keys given, those the throwaway lacks: one command for a batch of the sweep
    "local r = {} for _, k in ipairs(KEYS) do"
    " if redis.call('EXISTS', k) == 0 then r[#r + 1] = k end end return r"
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
        self.password = password_of(settings)
        self._clients: dict[tuple[str, str], redis.Redis] = {}
        self._raw: dict[str, tuple[Connection, Replies]] = {}  # per database of the throwaway

    def target(self, db: str) -> redis.Redis:
        if ("target", db) not in self._clients:
            self._clients["target", db] = redis_client(self.settings, int(db))
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

    def dump_connection(self, db: str) -> tuple[Connection, Replies]:
        """Return a connection of our own to database ``db`` of the throwaway (copy_database),
        and its replies from now on, read by hiredis."""
        if db not in self._raw:
            throwaway = self.throwaway
            settings = plain_settings(self.settings, HOST, throwaway.port, throwaway.password)
            connection = Connection(settings, throwaway.where)
            try:
                connection.call("SELECT", db)
            except BaseException:
                connection.close()
                raise
            self._raw[db] = connection, Replies.taking_over(connection)  # closed by close()
        return self._raw[db]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        for connection, _ in self._raw.values():
            connection.close()


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


def copy_database(
    session: _Session, transaction: Transaction, db: str, batch: int, progress: Progress | None
) -> tuple[int, int]:
    """Given a session, a transaction and a database, queue a RESTORE ... REPLACE of every key of
    the throwaway's database, with its remaining TTL; return how many keys were queued and how many
    had expired first. Raise TransientError or PermanentError naming the server.

    How: over a connection of our own, SCAN a batch of keys, send DUMP and PTTL of all of them at
    once, and turn each pair of replies (parsed by hiredis: redis_replies.py) into a RESTORE as it
    arrives: whatever the batch, one payload is read at a time, and the transaction holds what it
    has not sent yet (BATCH_BYTES, or one larger command). Not redis-py's pipeline: its Python work
    per command is the cost, and it needs MEMORY USAGE of every key first to bound a batch's memory."""
    connection, replies = session.dump_connection(db)
    transaction.use(db)
    queued = expired = 0
    cursor = None
    while cursor != 0:
        cursor, keys = _scan(connection, replies, cursor or 0, batch)
        connection.send(b"".join([DUMP_AND_PTTL % (len(key), key, len(key), key) for key in keys]))
        for key, (payload, ttl) in zip(keys, replies.pairs(len(keys)), strict=True):
            if payload is None or ttl in (-2, 0):  # gone, or expiring this very millisecond
                expired += 1
                continue
            ms = b"%d" % (0 if ttl == -1 else ttl)
            transaction.queue_encoded(RESTORE % (len(key), key, len(ms), ms, len(payload), payload))
            queued += 1
        if progress:
            progress("queued", db, queued)
    return queued, expired


def _scan(connection: Connection, replies: Replies, cursor: int, count: int) -> tuple[int, list[bytes]]:
    """SCAN the connection's database from ``cursor``: return the next cursor and the keys."""
    connection.send(command("SCAN", cursor, "COUNT", count))
    match replies.next():
        case [bytes() as following, list() as keys] if following.isdigit():
            return int(following), [key for key in keys if isinstance(key, bytes)]
    raise PermanentError(f"{connection.where} answered SCAN with no cursor: not a Redis server?")


def sweep_database(
    session: _Session,
    db: str,
    in_backup: bool,
    batch: int,
    remove: Callable[[list[bytes]], object] | None,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Given a session and a database of the target, find its keys that the backup's database
    lacks (all if not ``in_backup``) and pass each batch of them to ``remove`` (None: count only);
    return how many keys the backup has and how many it lacks. Raise TransientError or
    PermanentError naming the server."""
    source, target = session.source(db), session.target(db)
    kept = removed = 0
    cursor = None
    while cursor != 0:
        with session.on_target():
            cursor, keys = target.scan(cursor or 0, count=batch)
        missing = cast(list[bytes], keys)  # the target's client does not decode replies
        if in_backup and keys:
            with session.on_source():
                missing = source.eval(MISSING, len(keys), *keys)
        if missing and remove is not None:
            remove(missing)
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
            counts = sweep_database(session, db, db in facts.backup_keys, BATCH_SIZE, None)
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
    says. Raise PermanentError or TransientError naming the server, never with a password; the
    message says whether nothing was written (the target as it was) or what is known."""
    started = time.monotonic()
    with _prepared(settings, rdb_path, server_binary, progress, load_timeout) as (session, facts):
        transaction, restored, expired, removed = _queued(session, facts, batch_size, progress)
        with contextlib.closing(transaction):
            if progress:
                progress("applying", "", transaction.queued)
            transaction.execute()
    return RedisRestoreResult(
        target=session.where,
        rdb_version=facts.rdb_version,
        restored=restored,
        expired=expired,
        removed=removed,
        keys=_counts_after(settings),
        duration_seconds=round(time.monotonic() - started, 3),
    )


def _queued(
    session: _Session, facts: _Prepared, batch_size: int, progress: Progress | None
) -> tuple[Transaction, dict[str, int], dict[str, int], dict[str, int]]:
    """Open a transaction on the target and queue the whole restore in it; return it, and keys
    restored, expired and removed per database. Raise TransientError or PermanentError saying
    that nothing was written (the transaction closed, so the target drops what was queued)."""
    restored, expired, removed = {}, {}, {}
    transaction = None
    try:
        transaction = Transaction(session.settings, batch_size)
        for db in _sorted_dbs(facts.backup_keys):
            restored[db], expired[db] = copy_database(session, transaction, db, batch_size, progress)
        for db in _sorted_dbs(facts.backup_keys, redis_key_counts(session.settings)):
            # after the copy: a key that expired in the throwaway meanwhile goes too (its UNLINK
            # comes after its RESTORE in the transaction)
            transaction.use(db)
            in_backup = db in facts.backup_keys
            removed[db] = sweep_database(session, db, in_backup, batch_size, transaction.unlink, progress)[1]
        transaction.flush()
        return transaction, restored, expired, removed
    except BaseException as exc:
        if transaction is not None:
            transaction.close()
        if isinstance(exc, BackupError):
            raise type(exc)(f"{exc}; {NOTHING_WRITTEN}") from None
        raise


def _counts_after(settings: Settings) -> dict[str, int]:
    """The target's keys per database after EXEC; {} if it cannot say (the restore is done: a
    failed count must not report it failed; the integrity check counts again)."""
    try:
        return redis_key_counts(settings)
    except BackupError:
        return {}


def redis_key_counts(settings: Settings) -> dict[str, int]:
    """Given settings naming the target Redis, return its keys per non-empty database (INFO
    keyspace, keyed by the database number as a string). Raise as server_facts does."""
    return server_facts(settings)[1]
