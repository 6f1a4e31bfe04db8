"""Real services for the integration tests: a database of our own on the local PostgreSQL, Redis
servers of our own, real Celery worker processes, and a real SMTP server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import psycopg
import pytest

from tests.servers import RedisServer, free_port, start_redis, stop_process

PG_HOST = os.environ.get("VQ_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("VQ_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("VQ_TEST_PG_USER", "postgres")
WORKER_READY_TIMEOUT = 60
BROKER_PASSWORD = "broker-secret-pw"


def pg_connect(dbname: str = "postgres", **kwargs) -> psycopg.Connection:
    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, autocommit=True, **kwargs)


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh, empty database of this test's own, dropped afterwards."""
    name = f"vq_test_{uuid.uuid4().hex[:10]}"
    with pg_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with pg_connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def derived_databases(database) -> Iterator[None]:
    """Drop the databases a restore leaves beside the test's own (``<name>_before_<stamp>``)."""
    yield
    with pg_connect() as conn:
        names = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (f"{database}_",)
        ).fetchall()
        for (name,) in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill_database(name: str, customers: int = 500) -> dict[str, int]:
    """Load the demo's Virtual-Queue-like schema and data (``vq_tasks.cli.demo.SCHEMA``) with
    ``customers`` customers; return rows per table, as pg_dump names them."""
    from vq_tasks.cli.demo import SCHEMA

    with pg_connect(name) as conn:
        conn.execute(SCHEMA.format(n=customers))
    return {
        "public.queues": 3,
        "public.customers": customers,
        "public.tickets": customers,
        "public.events": customers * 3,
    }


def fill_redis(server: RedisServer) -> None:
    """Strings, hashes, lists, sets, sorted sets, streams, binary keys and TTLs in databases 0 and 1."""
    for db in (0, 1):
        r = server.client(db)
        r.set(f"queue:{db}:counter", 42)
        r.set(b"bin:\x00\xff", bytes(range(256)))
        r.hset(f"ticket:{db}:1", mapping={"state": "waiting", "name": "Zoë"})
        r.rpush(f"queue:{db}:waiting", *[f"t{i}" for i in range(100)])
        r.sadd(f"open:{db}", "a", "b", "c")
        r.zadd(f"eta:{db}", {"t1": 1.5, "t2": 2.5})
        r.xadd(f"events:{db}", {"kind": "called", "ticket": "t1"})
        r.set(f"session:{db}", "expiring", ex=3600)
    server.client(0).xgroup_create("events:0", "displays", id="0")


@pytest.fixture
def broker(tmp_path) -> Iterator[RedisServer]:
    """Celery's own Redis (broker and result backend), never the one that is backed up."""
    with start_redis(tmp_path / "broker", password=BROKER_PASSWORD) as server:
        yield server


@pytest.fixture
def source_redis(tmp_path) -> Iterator[RedisServer]:
    """The application's Redis, with a password, filled with every type."""
    with start_redis(tmp_path / "app-redis", password="redis-secret-pw") as server:
        fill_redis(server)
        yield server


@dataclass
class Worker:
    process: subprocess.Popen
    log: Path
    env: dict[str, str] = field(repr=False)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process, timeout=20, group=True)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Workers a test starts itself (tests.integration.test_faults.launch_worker); stopped afterwards."""
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def settings_env(**values: object) -> dict[str, str]:
    """Return environment variables for settings given by field name."""
    env = {}
    for name, value in values.items():
        if isinstance(value, list | tuple):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[name.upper()] = str(value)
    return env


@pytest.fixture
def layout(tmp_path) -> dict[str, Path]:
    """Folders for storage and staging, and config and log files to back up."""
    config = tmp_path / "etc" / "virtualqueue"
    (config / "conf.d").mkdir(parents=True)
    (config / "app.yaml").write_text("queues: 3\nsecret_ref: vault://x\n")
    (config / "conf.d" / "tls.conf").write_text("ciphers HIGH\n")
    (config / "conf.d" / "tls.conf").chmod(0o640)
    (config / "current.yaml").symlink_to("app.yaml")
    logs = tmp_path / "log" / "virtualqueue"
    logs.mkdir(parents=True)
    (logs / "app.log").write_text("started\n" * 1000)
    old = logs / "app.log.10"
    old.write_text("old\n")
    ten_days_ago = time.time() - 10 * 86400
    os.utime(old, (ten_days_ago, ten_days_ago))
    return {"storage": tmp_path / "backups", "staging": tmp_path / "staging", "config": config, "logs": logs}


@pytest.fixture
def base_env(broker, source_redis, database, layout) -> dict[str, str]:
    """Settings of a complete, working backup of this test's database and Redis."""
    return settings_env(
        celery_broker_url=f"redis://:{BROKER_PASSWORD}@127.0.0.1:{broker.port}/0",
        db_host=PG_HOST,
        db_port=PG_PORT,
        db_user=PG_USER,
        db_name=database,
        db_password="db-secret-pw",
        redis_host="127.0.0.1",
        redis_port=source_redis.port,
        redis_password="redis-secret-pw",
        backup_storage_path=layout["storage"],
        backup_staging_dir=layout["staging"],
        backup_config_paths=[layout["config"]],
        backup_log_paths=[layout["logs"]],
        backup_audit_log=layout["storage"].parent / "audit.jsonl",
        backup_retry_backoff=1,
        backup_retry_max=1,
        compression_threads=2,
    )


@pytest.fixture
def start_worker(tmp_path) -> Iterator:
    """Start real `celery worker` processes with the given environment; all stopped afterwards."""
    started: list[Worker] = []

    def start(
        env: dict[str, str], concurrency: int = 2, name: str | None = None, pool: str = "prefork"
    ) -> Worker:
        name = name or f"w{len(started)}"
        log = tmp_path / f"worker-{name}.log"
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "vq_tasks",
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            "--loglevel=INFO",
            f"--hostname={name}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        worker = Worker(process, log, env)
        started.append(worker)
        _wait_for_ready(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def _wait_for_ready(worker: Worker) -> None:
    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    while time.monotonic() < deadline:
        if " ready." in worker.log_text():
            return
        if worker.process.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.process.returncode}:\n{worker.log_text()}")
        time.sleep(0.1)
    raise RuntimeError(f"worker not ready in {WORKER_READY_TIMEOUT} s:\n{worker.log_text()}")


def run_backup(env: dict[str, str]) -> str:
    """Run `vq-backup run --wait` and return the backup's id; a run refused for the second the
    previous backup started in (a backup id is that second) is run again a second later, as its
    message says."""
    made = run_cli(env, "run", "--wait")
    if made.returncode != 0 and "exists already; try again in a second" in made.stderr:
        time.sleep(1.1)
        made = run_cli(env, "run", "--wait")
    assert made.returncode == 0, made.stdout + made.stderr
    return made.stdout.strip().splitlines()[-1]


def run_cli(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `vq-backup ARGS` with the given settings, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "vq_tasks.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Mailbox:
    messages: list[EmailMessage] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"

    def wait_for(self, count: int = 1, timeout: float = 60) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.messages


@pytest.fixture
def smtp() -> Iterator[tuple[int, Mailbox]]:
    """A real SMTP server (aiosmtpd) on a free port; messages land in the mailbox."""
    from aiosmtpd.controller import Controller

    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, mailbox
    finally:
        controller.stop()


def redis_value(client, key: bytes) -> object:
    """Return a key's value in a form that compares equal whatever the server's encoding."""
    kind = client.type(key).decode()
    read = {
        "string": client.get,
        "hash": client.hgetall,
        "list": lambda k: client.lrange(k, 0, -1),
        "set": client.smembers,
        "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
        "stream": lambda k: client.xrange(k),
    }[kind]
    return kind, read(key)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server for the whole session (IAM authentication on)."""
    from tests.emulators import s3_emulator

    with s3_emulator(tmp_path_factory.mktemp("s3")) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def azure(tmp_path_factory):
    """Azurite's blob service for the whole session."""
    from tests.emulators import azure_emulator

    with azure_emulator(tmp_path_factory.mktemp("azure")) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """gcp-storage-emulator for the whole session."""
    from tests.emulators import gcs_emulator

    with gcs_emulator(tmp_path_factory.mktemp("gcs")) as emulator:
        yield emulator


EXPORTER_START_TIMEOUT = 30.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class RunningExporter:
    process: subprocess.Popen
    port: int
    log: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def health(self) -> tuple[int, dict]:
        code, body = self.get("/healthz")
        return code, json.loads(body)

    def scrape(self) -> Samples:
        code, text = self.get("/metrics")
        assert code == 200, text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in _metric_families(text)
            for s in family.samples
        }

    def stop(self) -> int | None:
        stop_process(self.process, timeout=15, group=True)
        return self.process.returncode


@pytest.fixture
def start_exporter(tmp_path) -> Iterator[Callable[[dict[str, str]], RunningExporter]]:
    """Start real `vq-backup exporter` processes on free ports; each returned once it has read the
    state; all stopped afterwards."""
    started: list[RunningExporter] = []

    def start(env: dict[str, str]) -> RunningExporter:
        port = free_port()
        log = tmp_path / f"exporter-{len(started)}.log"
        command = [
            sys.executable,
            "-m",
            "vq_tasks.cli",
            "exporter",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        exporter = RunningExporter(process, port, log)
        started.append(exporter)
        wait_for(lambda: _has_read(exporter), f"exporter did not answer:\n{log.read_text()}")
        return exporter

    yield start
    for exporter in started:
        exporter.stop()


def _has_read(exporter: RunningExporter) -> bool:
    assert exporter.process.poll() is None, exporter.log.read_text()
    try:
        _, body = exporter.health()
    except (urllib.error.URLError, ConnectionError):
        return False
    return "exporter" not in body["checks"] or "no reading" not in body["checks"]["exporter"]


def wait_for(condition: Callable[[], object], message: str, timeout: float = EXPORTER_START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.2)


def _metric_families(text: str):
    from prometheus_client.parser import text_string_to_metric_families

    return text_string_to_metric_families(text)
