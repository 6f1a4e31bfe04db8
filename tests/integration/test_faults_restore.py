"""A restore interrupted part way, against real processes: `vq-backup restore ID --force --yes`
SIGKILLed while the dump loads into the database, while the keys are copied into the live Redis, and in the
middle of the database swap; then a following restore. The live database and Redis must be as they
were, or fully restored, never half; and a following restore must work.

One backup serves every interruption (a module-scoped scenario with servers of its own: a database
with a 100,000-row table, a Redis with 50,000 keys), so each outcome is its own test and a known
bug (xfail, strict) never hides what works. docs/RELIABILITY.md lists them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.integration.conftest import pg_connect, redis_value, run_cli
from tests.integration.test_faults import Services, own_services, wait_until
from tests.servers import RedisServer, redis_server_binary
from vq_tasks.restore.postgres_parallel import LOAD_APPLICATION_NAME

pytestmark = pytest.mark.integration
KEYS = 50_000
ROWS = 100_000
LOCK_TTL = 5  # BACKUP_LOCK_TTL: how long the restore lock of a killed restore outlives it
FILL_KEYS = "for i = 1, tonumber(ARGV[1]) do redis.call('set', 'k:' .. i, ARGV[2] .. i) end"


def database_state(database: str) -> dict[str, object]:
    """Rows per table and an md5 of every row of every table: equal only if the data is."""
    with pg_connect(database) as conn:
        tables = [t for (t,) in conn.execute("SELECT relname FROM pg_stat_user_tables ORDER BY 1")]
        return {
            t: conn.execute(
                f"SELECT count(*), md5(string_agg(x::text, '|' ORDER BY x::text)) FROM \"{t}\" x"
            ).fetchone()
            for t in tables
        }


def accepts_connections(database: str) -> bool:
    with pg_connect() as conn:
        return conn.execute(
            "SELECT datallowconn FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()[0]


def redis_state(server: RedisServer) -> dict[int, dict[bytes, object]]:
    """Every key of databases 0 and 1 with its value (the bulk strings read in batches)."""
    state: dict[int, dict[bytes, object]] = {}
    for db in (0, 1):
        client = server.client(db)
        keys = sorted(client.scan_iter(count=10_000))
        bulk = [k for k in keys if k.startswith(b"k:")]
        values = {}
        for start in range(0, len(bulk), 20_000):
            chunk = bulk[start : start + 20_000]
            values.update(zip(chunk, client.mget(chunk), strict=True))
        values.update({k: redis_value(client, k) for k in keys if not k.startswith(b"k:")})
        state[db] = values
    return state


def restore_calls(server: RedisServer) -> int:
    """How many RESTORE commands the server has run (a restore's key copy uses RESTORE)."""
    return int(server.client().info("commandstats").get("cmdstat_restore", {}).get("calls", 0))


def queued_in_a_transaction(server: RedisServer) -> int:
    """The most commands a client of the server has queued in an open MULTI (CLIENT LIST multi=)."""
    return max((int(c["multi"]) for c in server.client().client_list()), default=-1)


@dataclass
class Interrupted:
    """One restore SIGKILLed part way, and what it left."""

    code: int | None = None
    output: str = ""
    children: list[psutil.Process] = field(default_factory=list)  # its processes when killed
    database: object = None  # the live database's state after the kill (or why it is unreadable)
    database_accepts: bool | None = None
    redis: dict[int, dict[bytes, object]] = field(default_factory=dict)
    queued_when_killed: int = 0  # commands the restore had queued in its transaction
    restored_when_killed: int = 0  # RESTORE commands the target had run
    lock: tuple[str | None, int] = (None, -2)  # the restore lock just after the kill, and its TTL


def restore_killed_when(
    s: Services, backup_id: str, components: list[str], ready: Callable[[], object], every: float = 0.005
) -> Interrupted:
    """Run `vq-backup restore BACKUP_ID --component ... --force --yes` and SIGKILL that process
    alone (its children are orphaned, as when the OOM killer picks it) once ``ready()``."""
    argv = [sys.executable, "-m", "vq_tasks.cli", "restore", backup_id, "--force", "--yes"]
    argv += [arg for c in components for arg in ("--component", c)]
    log = s.folder / f"restore-{'-'.join(components)}-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **s.env, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(
            lambda: ready() or process.poll() is not None, f"never ready:\n{log.read_text()}", every=every
        )
        children = psutil.Process(process.pid).children(recursive=True)
        process.kill()
    finally:
        if process.poll() is None:
            process.kill()
        code = process.wait()
    r = s.coordination()
    lock = (r.get("vq:restore:lock"), r.ttl("vq:restore:lock"))
    return Interrupted(code=code, output=log.read_text(errors="replace"), children=children, lock=lock)


@dataclass
class RestoreFaults:
    backup_id: str
    database: str
    before: tuple[object, dict]  # the live database and Redis before any restore (changed since the backup)
    backup: tuple[object, dict]  # their state at the backup
    during_load: Interrupted
    during_copy: Interrupted
    at_swap: Interrupted
    following: subprocess.CompletedProcess
    after: tuple[object, dict]
    left_processes: list[str]
    left_folders: list[str]
    left_databases: list[str]


def derived_databases(database: str) -> list[str]:
    with pg_connect() as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1", (f"{database}_",)
        ).fetchall()
    return [name for (name,) in rows]


def dump_loading(database: str) -> bool:
    """Whether the restore's load sessions (or psql's) are loading into a ``<database>_restore_<stamp>``
    database right now."""
    with pg_connect() as conn:
        return bool(
            conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name IN ('psql', %s)"
                " AND starts_with(datname, %s) AND state = 'active'",
                (LOAD_APPLICATION_NAME, f"{database}_restore_"),
            ).fetchone()[0]
        )


@contextlib.contextmanager
def database_locked(database: str) -> Iterator[None]:
    """Hold, in an open transaction of another database, a lock on ``database`` (COMMENT ON DATABASE
    takes one) that makes the swap's RENAME wait inside its transaction; roll back afterwards."""
    with pg_connect() as conn:
        conn.execute("BEGIN")
        conn.execute(f"COMMENT ON DATABASE \"{database}\" IS 'held by the test'")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")


def rename_waiting(database: str, state: str | None = "active") -> bool:
    """Whether a session runs (``state``; None: is in any state) an ALTER DATABASE ... RENAME of
    ``database``: the swap, inside its transaction."""
    with pg_connect() as conn:
        return bool(
            conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE %s"
                " AND (%s::text IS NULL OR state = %s) AND pid <> pg_backend_pid()",
                (f'ALTER DATABASE "{database}" RENAME%', state, state),
            ).fetchone()[0]
        )


def wait_for_the_lock_to_expire(s: Services) -> None:
    wait_until(lambda: not s.coordination().exists("vq:restore:lock"), "the restore lock never expired", 30)


@pytest.fixture(scope="module")
def restore_faults(tmp_path_factory) -> Iterator[RestoreFaults]:
    """Play every interruption once, in turn, on one backup (see the module's docstring)."""
    folder = tmp_path_factory.mktemp("restore-faults")
    extra = {"backup_lock_ttl": LOCK_TTL, "redis_server_bin": redis_server_binary()}
    throwaways_before = set(throwaway_folders())
    with own_services(folder, **extra) as s, _cleanup(s) as left:
        with pg_connect(s.database) as conn:
            conn.execute("CREATE TABLE bulk (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, %s) g", (ROWS,))
        s.source.client().eval(FILL_KEYS, 0, KEYS, "backup-")
        s.start_worker("w")
        made = run_cli(s.env, "run", "--wait")
        assert made.returncode == 0, made.stdout + made.stderr
        backup_id = made.stdout.strip().splitlines()[-1]
        backup = (database_state(s.database), redis_state(s.source))

        with pg_connect(s.database) as conn:  # the live data moves on after the backup
            conn.execute("DELETE FROM events WHERE id % 2 = 0")
            conn.execute("UPDATE bulk SET v = 'changed' WHERE id % 1000 = 0")
        s.source.client().eval(FILL_KEYS, 0, KEYS, "changed-")
        s.source.client().set("extra:0", "not in the backup")
        before = (database_state(s.database), redis_state(s.source))

        during_load = restore_killed_when(s, backup_id, ["database"], lambda: dump_loading(s.database))
        during_load.database = database_state(s.database)
        during_load.database_accepts = accepts_connections(s.database)
        during_load.redis = redis_state(s.source)
        wait_until(lambda: not dump_loading(s.database), "the orphaned load never ended", 60)
        wait_for_the_lock_to_expire(s)

        queued = [-1]  # the last count seen before the kill

        def half_queued() -> bool:
            queued[0] = queued_in_a_transaction(s.source)
            return queued[0] > KEYS // 2

        during_copy = restore_killed_when(s, backup_id, ["redis"], half_queued)
        during_copy.queued_when_killed = queued[0]
        during_copy.restored_when_killed = restore_calls(s.source)
        during_copy.redis = redis_state(s.source)
        during_copy.database = database_state(s.database)
        wait_for_the_lock_to_expire(s)

        with pg_connect(s.database), database_locked(s.database):  # a session to end; a lock to wait on
            at_swap = restore_killed_when(s, backup_id, ["database"], lambda: rename_waiting(s.database))
        wait_until(lambda: not rename_waiting(s.database, state=None), "the orphaned swap never ended", 30)
        at_swap.database_accepts = accepts_connections(s.database)
        try:
            at_swap.database = database_state(s.database)
        except psycopg.OperationalError as exc:
            at_swap.database = str(exc)
        left.extend([*during_load.children, *during_copy.children, *at_swap.children])
        wait_for_the_lock_to_expire(s)

        following = run_cli(s.env, "restore", backup_id, "--force", "--yes", "--component", "database",
                            "--component", "redis")  # fmt: skip
        after = (database_state(s.database), redis_state(s.source))
        time.sleep(1)
        yield RestoreFaults(
            backup_id=backup_id,
            database=s.database,
            before=before,
            backup=backup,
            during_load=during_load,
            during_copy=during_copy,
            at_swap=at_swap,
            following=following,
            after=after,
            left_processes=[f"{p.pid} {p.name()}" for p in left if alive(p)],
            left_folders=sorted(p.name for p in s.layout["staging"].glob(".restore-*"))
            + sorted(set(throwaway_folders()) - throwaways_before),
            left_databases=[d for d in derived_databases(s.database) if "_restore_" in d],
        )


def throwaway_folders() -> list[str]:
    """The folders of throwaway redis-servers in the temp folder (their config holds a password)."""
    return [p.name for p in Path(tempfile.gettempdir()).glob("vq-redis-restore-*")]


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def _cleanup(s: Services) -> Iterator[list[psutil.Process]]:
    """Yield a list for the processes a killed restore orphaned; end them (by pid) and drop the
    databases the restores left beside the test's own, afterwards."""
    orphans: list[psutil.Process] = []
    try:
        yield orphans
    finally:
        for process in orphans:
            with contextlib.suppress(psutil.Error):
                folders = {Path(f.path).parent for f in process.open_files()}
                process.kill()
                for folder in folders:  # a throwaway redis-server's (its config holds a password)
                    if folder.name.startswith("vq-redis-restore-"):
                        shutil.rmtree(folder, ignore_errors=True)
        with pg_connect() as conn:
            for name in derived_databases(s.database):
                conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        with pg_connect() as conn:
            conn.execute(f'ALTER DATABASE "{s.database}" WITH ALLOW_CONNECTIONS true')


def test_killed_while_the_dump_loads_the_live_database_and_redis_are_as_they_were(restore_faults):
    """Fault: the restore is SIGKILLed while it loads the dump. Expected: it loads into a
    new database ``<DB_NAME>_restore_<stamp>``, never the live one: the live database holds exactly
    the rows it had (every table's md5), takes connections, and Redis is untouched."""
    r = restore_faults
    assert r.during_load.code == -signal.SIGKILL, r.during_load.output
    assert "restoring database" in r.during_load.output
    assert r.during_load.database == r.before[0]
    assert r.during_load.database_accepts is True
    assert r.during_load.redis == r.before[1]


def test_a_killed_restore_holds_the_lock_until_it_expires_then_a_restore_works(restore_faults):
    """Fault: a restore was SIGKILLed (three times: during the load, the key copy and the swap).
    Expected: its restore lock stays, refusing other restores ("a restore of ... is running",
    see test_restore.py), until it expires: at most BACKUP_LOCK_TTL after the killed restore's
    last heartbeat. Then a restore of the same backup works: exit 0, integrity OK, the database
    and Redis exactly as at the backup."""
    r = restore_faults
    for killed in (r.during_load, r.during_copy, r.at_swap):
        held, ttl = killed.lock
        assert held and held.startswith("restore-") and r.backup_id in held and 0 < ttl <= LOCK_TTL
    assert r.following.returncode == 0, r.following.stdout + r.following.stderr
    assert "integrity OK" in r.following.stdout
    assert r.after[0] == r.backup[0]
    assert r.after[1] == r.backup[1]


def test_killed_while_keys_are_queued_redis_is_as_it_was(restore_faults):
    """Fault: the restore is SIGKILLed while it queues the key copy in the live Redis (one
    MULTI ... EXEC: UNLINK of the keys the backup lacks, RESTORE ... REPLACE of every key).
    Expected: the live Redis is exactly as it was (the server dropped the queue with the
    connection; not one RESTORE ran), the database is untouched; and the following restore brings
    Redis exactly to the backup (test above)."""
    r = restore_faults
    copy = r.during_copy
    assert copy.code == -signal.SIGKILL, copy.output
    assert copy.queued_when_killed > KEYS // 2 and copy.restored_when_killed == 0
    assert copy.redis == r.before[1]
    assert copy.database == r.before[0]


def test_killed_during_the_swap_the_live_database_is_as_it_was_and_takes_connections(restore_faults):
    """Fault: the restore is SIGKILLed in the swap, inside its one transaction: after it ended the
    live database's sessions, while its RENAME waits for a lock. Expected: the transaction rolls
    back when PostgreSQL finds the client gone; the live database is as it was and takes
    connections."""
    r = restore_faults
    assert r.at_swap.code == -signal.SIGKILL, r.at_swap.output
    assert r.at_swap.database_accepts, r.at_swap.database
    assert r.at_swap.database == r.before[0]


def test_a_killed_restore_leaves_no_process_folder_or_database_behind(restore_faults):
    """Fault: restores SIGKILLed part way, then one that succeeds. Expected: the throwaway
    redis-server dies with the killed restore (Linux's parent-death signal), its load sessions end
    with its connections; the following
    restore removes their work folders (their lock is free) and scratch databases (under the
    restore lock): no process, no copy of the data, no half-loaded database remains."""
    r = restore_faults
    assert (r.left_processes, r.left_folders, r.left_databases) == ([], [], [])
    assert "left by a restore that was killed" in r.following.stdout + r.following.stderr
