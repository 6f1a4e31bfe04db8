"""Faults of the machinery around a backup, against real processes: Celery's Redis (the broker)
restarted in the middle of a run, and beat restarted or run twice by mistake. Also the helpers
that test_faults_backup.py and test_faults_restore.py share.

Each fault is played once per module (a module-scoped scenario with servers of its own: one wait
for a minute boundary serves every beat test) and each outcome is its own test, so that a known
bug (xfail, strict) never hides what works. docs/RELIABILITY.md lists every fault tried.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from tests.integration.conftest import (
    BROKER_PASSWORD,
    PG_HOST,
    PG_PORT,
    PG_USER,
    WORKER_READY_TIMEOUT,
    Mailbox,
    Worker,
    fill_database,
    fill_redis,
    pg_connect,
    settings_env,
)
from tests.servers import RedisServer, free_port, start_redis, stop_process

pytestmark = pytest.mark.integration
MIB = 1 << 20


def wait_until(
    condition: Callable[[], object],
    message: str | Callable[[], str],
    timeout: float = 60,
    every: float = 0.05,
):
    """Return the first true value of ``condition()``; fail with ``message`` (or what it returns)
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{message if isinstance(message, str) else message()} (after {timeout:.0f} s)")
        time.sleep(every)


# ---- servers, folders and workers of a scenario's own -----------------------------------------


@dataclass
class Services:
    """What one backup needs, like the integration fixtures (base_env, database, layout, smtp,
    start_worker) but for a module-scoped scenario."""

    folder: Path
    broker: RedisServer
    source: RedisServer
    database: str
    layout: dict[str, Path]
    mailbox: Mailbox
    env: dict[str, str]
    workers: list[Worker] = field(default_factory=list)

    def start_worker(self, name: str) -> Worker:
        """Start a real worker (see launch_worker); all are stopped when the scenario ends."""
        worker = launch_worker(self.env, self.folder / f"worker-{name}.log", name)
        self.workers.append(worker)
        return worker

    def coordination(self) -> redis.Redis:
        """A client of Celery's Redis, where the run records, locks and task results are."""
        return redis.Redis(
            self.broker.host, self.broker.port, password=BROKER_PASSWORD, decode_responses=True
        )


WORKER_CODE = """
import sys
from vq_tasks.worker.app import app
app.conf.broker_transport_options = {**app.conf.broker_transport_options, **OPTIONS}
app.worker_main(["worker", *sys.argv[1:]])
"""


def launch_worker(
    env: dict[str, str], log: Path, name: str, options: dict[str, object] | None = None
) -> Worker:
    """Start a real prefork worker with 2 pool processes, as `celery -A vq_tasks worker` does, and
    return once it is ready. With ``options``, its broker transport options differ from the app's
    by those (and nothing else does). The caller stops it."""
    if options is None:
        argv = [sys.executable, "-m", "celery", "-A", "vq_tasks", "worker"]
    else:
        argv = [sys.executable, "-c", WORKER_CODE.replace("OPTIONS", repr(options))]
    argv += ["--pool=prefork", "--concurrency=2", "--loglevel=INFO", f"--hostname={name}@%h"]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*argv, "--without-gossip", "--without-mingle"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    worker = Worker(process, log, env)
    try:
        wait_until(
            lambda: " ready." in worker.log_text() or process.poll() is not None,
            lambda: f"worker not ready:\n{worker.log_text()}",
            timeout=WORKER_READY_TIMEOUT,
        )
        assert process.poll() is None, worker.log_text()
    except BaseException:
        worker.stop()
        raise
    return worker


def make_layout(folder: Path) -> dict[str, Path]:
    """Storage and staging folders, and a config file and a log file to back up."""
    config, logs = folder / "etc" / "virtualqueue", folder / "log" / "virtualqueue"
    config.mkdir(parents=True)
    logs.mkdir(parents=True)
    (config / "app.yaml").write_text("queues: 3\n")
    (logs / "app.log").write_text("started\n" * 1000)
    return {"storage": folder / "backups", "staging": folder / "staging", "config": config, "logs": logs}


def mail_env(port: int) -> dict[str, str]:
    """Failure alerts to BACKUP_ALERT_EMAIL, success summaries to NOTIFICATION_EMAIL."""
    return {
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "BACKUP_ALERT_EMAIL": "oncall@example.com",
        "NOTIFICATION_EMAIL": "team@example.com",
    }


@contextlib.contextmanager
def own_services(folder: Path, broker_args: tuple[str, ...] = (), **settings: object) -> Iterator[Services]:
    """Start a broker, a filled application Redis, a database with the demo's schema and an SMTP
    server of this scenario's own; yield them with the settings of a working backup; stop all."""
    from aiosmtpd.controller import Controller

    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(
            start_redis(folder / "broker", password=BROKER_PASSWORD, args=broker_args)
        )
        source = stack.enter_context(start_redis(folder / "app-redis", password="redis-secret-pw"))
        fill_redis(source)
        database = f"vq_test_{uuid.uuid4().hex[:10]}"
        with pg_connect() as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        stack.callback(_drop_database, database)
        fill_database(database, customers=50)
        mailbox, port = Mailbox(), free_port()
        controller = Controller(mailbox, hostname="127.0.0.1", port=port)
        controller.start()
        stack.callback(controller.stop)
        layout = make_layout(folder)
        env = settings_env(
            celery_broker_url=f"redis://:{BROKER_PASSWORD}@127.0.0.1:{broker.port}/0",
            db_host=PG_HOST, db_port=PG_PORT, db_user=PG_USER, db_name=database, db_password="db-secret-pw",
            redis_host="127.0.0.1", redis_port=source.port, redis_password="redis-secret-pw",
            backup_storage_path=layout["storage"], backup_staging_dir=layout["staging"],
            backup_config_paths=[layout["config"]], backup_log_paths=[layout["logs"]],
            backup_audit_log=folder / "audit.jsonl", backup_retry_backoff=1, backup_retry_max=1,
            compression_threads=2, **settings,
        )  # fmt: skip
        services = Services(folder, broker, source, database, layout, mailbox, {**env, **mail_env(port)})
        try:
            yield services
        finally:
            for worker in services.workers:
                worker.stop()


def _drop_database(name: str) -> None:
    with pg_connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def restart_server(server: RedisServer, argv: list[str]) -> None:
    """Start ``server`` (ended) again with ``argv``, the same port, folder and password; return
    once it answers. Its RedisServer stops the new process as it would have the old one."""
    with open(server.log, "ab") as log:
        server.process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def answers() -> bool:
        try:
            return bool(server.client().ping())
        except redis.exceptions.RedisError:
            return False

    wait_until(answers, lambda: f"redis-server on {server.port} did not come back:\n{server.log_text()}", 20)


# ---- a backup run, and what it left ------------------------------------------------------------


@dataclass
class Run:
    """A `vq-backup run [--wait]` going on in the background, as an operator starts it."""

    process: subprocess.Popen
    log: Path
    backup_id: str = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"`vq-backup run` did not end within {timeout:.0f} s:\n{self.output()}")
        return code, self.output()


def start_run(env: dict[str, str], folder: Path, wait: bool = True) -> Run:
    """Start `vq-backup run --wait` (without ``wait``: `vq-backup run`, which ends once the backup
    has started) and return once the backup has its id."""
    log = folder / f"run-{uuid.uuid4().hex[:6]}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "vq_tasks.cli", "run", *(["--wait", "--timeout", "200"] if wait else [])],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    run = Run(process, log)
    found = wait_until(lambda: re.search(r"backup (\S+) started", run.output()) or process.poll() is not None,
                       lambda: f"no backup started:\n{run.output()}")  # fmt: skip
    assert found is not True, run.output()
    run.backup_id = found.group(1)
    return run


def stored(layout: dict[str, Path], hidden: bool = False) -> list[str]:
    """The objects in the Local storage (with ``hidden``: only the partial files of unfinished
    writes, which no listing, restore or verify sees and prune removes after its grace)."""
    folder = layout["storage"]
    names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    return [n for n in names if n.startswith(".") == hidden]


def staging_left(layout: dict[str, Path]) -> list[str]:
    folder = layout["staging"]
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def subjects(mailbox: Mailbox) -> list[str]:
    return [str(m["Subject"]) for m in mailbox.messages]


def manifests(layout: dict[str, Path]) -> list[str]:
    return [n.removesuffix("_manifest.json") for n in stored(layout) if n.endswith("_manifest.json")]


def assert_one_complete_backup(layout: dict[str, Path], backup_id: str, mailbox: Mailbox) -> dict:
    """The run made exactly one backup, complete, its files as the manifest lists them, staging
    cleaned, and said so in one mail (a success summary, no failure alert)."""
    names = stored(layout)
    assert manifests(layout) == [backup_id], names
    manifest = json.loads((layout["storage"] / f"{backup_id}_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert sorted([*(f["name"] for f in manifest["files"]), f"{backup_id}_manifest.json"]) == names
    for entry in manifest["files"]:
        assert (layout["storage"] / entry["name"]).stat().st_size == entry["size"]
    assert staging_left(layout) == []
    wait_until(lambda: mailbox.messages, "no success summary was mailed", timeout=30)
    time.sleep(1)  # a second mail, were one sent, would come now
    assert len(mailbox.messages) == 1 and "FAILED" not in subjects(mailbox)[0], subjects(mailbox)
    return manifest


def assert_clear_failure(layout: dict[str, Path], mailbox: Mailbox, *fragments: str) -> str:
    """The run failed: one alert names the failure, nothing is stored, staging is clean."""
    messages = mailbox.wait_for(1, timeout=60)
    time.sleep(1)  # a second mail, were one sent, would come now
    assert len(messages) == 1 and "FAILED" in subjects(mailbox)[0], subjects(mailbox)
    body = messages[0].get_content()
    for fragment in fragments:
        assert fragment in body, body
    assert stored(layout) == [] and stored(layout, hidden=True) == []
    assert staging_left(layout) == []
    return body


def pg_dumps_waiting(database: str) -> int:
    """How many pg_dump sessions on ``database`` wait for a lock."""
    with pg_connect() as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'pg_dump'"
            " AND wait_event_type = 'Lock'",
            (database,),
        ).fetchone()[0]


@contextlib.contextmanager
def table_locked(database: str) -> Iterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on ``events`` while the block runs: pg_dump, which takes
    ACCESS SHARE locks on every table before it writes a row, waits there, half way."""
    with pg_connect(database) as locker:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            locker.execute("COMMIT")


# ---- the broker restarted mid-run -----------------------------------------------------------------


@dataclass
class BrokerRestart:
    backup_id: str
    worker_exit: int | None  # the first worker's exit code once the run ended (None: it survived)
    worker_log: str
    cli_code: int
    cli_output: str
    unacked: dict[str, str]  # task id -> task name of the messages left unacknowledged in the broker
    layout: dict[str, Path]
    mailbox: Mailbox


def unacknowledged(r: redis.Redis) -> dict[str, str]:
    """The messages kombu holds as delivered but not acknowledged (task id -> task name): what a
    worker's sweep puts back in their queues once the visibility timeout has passed."""
    entries = (json.loads(raw)[0]["headers"] for raw in r.hvals("unacked"))
    return {headers["id"]: headers["task"] for headers in entries}


@pytest.fixture(scope="module")
def broker_restart(tmp_path_factory) -> Iterator[BrokerRestart]:
    """Play it once: `vq-backup run --wait` starts a backup; while dump_database waits on a table
    lock, Celery's Redis is stopped (SIGTERM), stays down 3 s and starts again on the same port
    with its append-only file (compose's broker runs with appendonly yes); then the lock goes. A
    worker that exited is started again, as compose's restart policy (unless-stopped) does."""
    folder = tmp_path_factory.mktemp("broker-restart")
    with own_services(folder, broker_args=("--appendonly", "yes")) as s:
        first = s.start_worker("first")
        with table_locked(s.database):
            run = start_run(s.env, folder)
            wait_until(lambda: pg_dumps_waiting(s.database) == 1, "dump_database never ran")
            argv = s.broker.process.args
            stop_process(s.broker.process)
            time.sleep(3)
            restart_server(s.broker, argv)
        manifest = s.layout["storage"] / f"{run.backup_id}_manifest.json"

        def run_ended() -> bool:
            if first.process.poll() is not None and len(s.workers) == 1:
                s.start_worker("restarted")  # the restart policy
            return manifest.exists() or bool(s.mailbox.messages)

        wait_until(run_ended, "the run neither completed nor failed", timeout=90)
        code, output = run.finish(timeout=60)
        unacked = unacknowledged(s.coordination())
        yield BrokerRestart(
            run.backup_id, first.process.poll(), first.log_text(), code, output, unacked, s.layout, s.mailbox
        )


def test_broker_restarted_mid_run_ends_in_one_complete_backup(broker_restart):
    """Fault: the broker restarted while a dump runs (see the broker_restart fixture). Expected:
    the run ends with exactly one complete backup, staging cleaned, one success mail and no
    failure alert. (The message of the dump that ran across the restart was never acknowledged:
    by design it comes back after the visibility timeout, beyond this test, and finds its run
    over.)"""
    r = broker_restart
    assert_one_complete_backup(r.layout, r.backup_id, r.mailbox)


def test_broker_restarted_mid_run_the_worker_reconnects(broker_restart):
    """Fault: the broker restarted while a dump runs. Expected: the worker process logs the lost
    connection, reconnects and keeps running (no restart policy needed: vq_tasks.worker.broker works
    around kombu 5.7.0, whose Redis transport made it exit), and runs the rest of the backup. The
    dump's message, which it cannot acknowledge on the lost connection, stays unacknowledged in
    the broker: not lost, it comes back after the visibility timeout."""
    r = broker_restart
    assert "Connection to broker lost" in r.worker_log
    assert r.worker_exit is None, r.worker_log[-3000:]
    reconnected = r.worker_log.split("Connection to broker lost", 1)[1].partition("Connected to redis://")[2]
    assert "vq_tasks.finalize_backup[" in reconnected, r.worker_log[-3000:]
    (dump,) = re.findall(r"Task vq_tasks\.dump_database\[([^\]]+)\] received", r.worker_log)
    assert r.unacked.get(dump) == "vq_tasks.dump_database", r.unacked


def test_broker_restarted_mid_run_the_cli_keeps_following(broker_restart):
    """Fault: the broker restarted while `vq-backup run --wait` follows the run. Expected: it waits
    for the broker to come back and exits 0 with the backup id, without a traceback."""
    r = broker_restart
    assert r.cli_code == 0 and "Traceback" not in r.cli_output, r.cli_output
    assert r.cli_output.strip().splitlines()[-1] == r.backup_id


# ---- beat restarted, and two beats by mistake --------------------------------------------------


@dataclass
class Beat:
    name: str
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def sent(self) -> list[str]:
        """The ids of the vq_tasks.backup tasks this beat sent."""
        return re.findall(r"vq_tasks\.backup sent\. id->(\S+)", self.log_text())


def start_beat(s: Services, name: str, schedule: Path) -> Beat:
    """Start a real `celery -A vq_tasks beat` with its own schedule file; return once it ticks."""
    log = s.folder / f"beat-{name}-{len(list(s.folder.glob(f'beat-{name}*')))}.log"
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "vq_tasks",
        "beat",
        "--loglevel=DEBUG",
        f"--schedule={schedule}",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **s.env}, start_new_session=True,
        )  # fmt: skip
    beat = Beat(name, process, log)
    wait_until(lambda: "beat: Ticking" in beat.log_text() or process.poll() is not None, "beat did not start")
    assert process.poll() is None, beat.log_text()
    return beat


@dataclass
class Beats:
    minute: str  # the scheduled time, YYYYMMDD_HHMM (UTC)
    sent: dict[str, list[str]]  # beat -> ids of the backup tasks it sent for that minute
    outcomes: dict[str, str]  # task id -> the backup id it started, or why it did not
    backups: list[str]  # the complete backups of that minute
    late_sent_early: list[str]  # what beat C sent before it was resumed (nothing: it was late)


def task_outcome(r: redis.Redis, task_id: str) -> str:
    """What a vq_tasks.backup task did: the backup id it started, or the error it ended with."""
    meta = json.loads(r.get(f"celery-task-meta-{task_id}") or '{"status": "PENDING", "result": null}')
    result = meta["result"]
    if meta["status"] == "SUCCESS":
        return result["backup_id"]
    return f"{meta['status']}: {result.get('exc_message') if isinstance(result, dict) else result}"


@pytest.fixture(scope="module")
def two_beats(tmp_path_factory) -> Iterator[Beats]:
    """Play it once, across one scheduled minute (BACKUP_SCHEDULE="* * * * *"): beats A and B run
    at the same time, with schedule files of their own (two beats by mistake, on one host or two);
    beat C is a few seconds late (SIGSTOPped before the minute, SIGCONTed once the first backup of
    that minute is complete: a host whose clock is behind, or a paused container); and A is
    SIGKILLed right after it sent the minute's task, then started again on the same schedule file
    (a crash or a redeploy). One worker runs whatever they send."""
    folder = tmp_path_factory.mktemp("beats")
    with own_services(folder, backup_schedule="* * * * *") as s:
        s.start_worker("w")
        if 60 - datetime.now(UTC).second < 12:  # too close to start three beats before it
            time.sleep(62 - datetime.now(UTC).second)
        beats = {name: start_beat(s, name, folder / f"schedule-{name}") for name in "ABC"}
        running = list(beats.values())
        try:
            minute = datetime.now(UTC).replace(second=0, microsecond=0).timestamp() + 60
            time.sleep(max(0.0, minute - 3 - time.time()))
            beats["C"].process.send_signal(signal.SIGSTOP)
            first = wait_until(lambda: beats["A"].sent(), "beat A sent no backup", timeout=30, every=0.02)
            beats["A"].process.kill()
            beats["A"].process.wait()
            running.append(start_beat(s, "A", folder / "schedule-A"))
            wait_until(lambda: manifests(s.layout), "no backup completed", timeout=60)
            sent_while_stopped = beats["C"].sent()
            beats["C"].process.send_signal(signal.SIGCONT)
            wait_until(lambda: beats["C"].sent(), "beat C sent no backup", timeout=30)
            time.sleep(8)  # whatever the late and the restarted beat started, it ends now
            sent = {"A": first, "A restarted": running[-1].sent(), "B": beats["B"].sent()}
            sent["C"] = beats["C"].sent()
        finally:
            for beat in running:
                if beat.process.poll() is None:
                    os.killpg(beat.process.pid, signal.SIGCONT)
                    stop_process(beat.process, group=True)
        r = s.coordination()
        outcomes = {task: task_outcome(r, task) for tasks in sent.values() for task in tasks}
        stamp = datetime.fromtimestamp(minute, UTC).strftime("%Y%m%d_%H%M")
        backups = [b for b in manifests(s.layout) if b.startswith(f"virtualqueue_backup_{stamp}")]
        yield Beats(stamp, sent, outcomes, backups, sent_while_stopped)


def refused(outcome: str) -> bool:
    """Whether a backup task was refused: by the claim of its scheduled time, or the run lock."""
    return outcome.startswith("FAILURE") and ("started already" in outcome or "already running" in outcome)


def test_two_beats_at_the_same_time_start_one_backup(two_beats):
    """Fault: two beats send the scheduled backup at the same moment. Expected: one task starts
    the backup; the other is refused (the scheduled time is claimed once, and the run lock is
    held), so the scheduled minute has one complete backup."""
    b = two_beats
    assert len(b.sent["A"]) == 1 and len(b.sent["B"]) == 1, b.sent
    outcomes = sorted(b.outcomes[t] for t in b.sent["A"] + b.sent["B"])
    assert refused(outcomes[0]) and outcomes[1].startswith("virtualqueue_backup_"), outcomes
    assert b.backups == [outcomes[1]]


def test_a_late_or_restarted_beat_starts_no_second_backup_of_the_same_time(two_beats):
    """Fault: beat C sends the scheduled minute's backup after the first backup of that minute
    completed (the run lock is free again); beat A, SIGKILLed and restarted, sends it again
    (celery beat writes its schedule file every 3 minutes, so a restarted beat does not know it
    sent it). Expected: still exactly one backup of that minute; the late tasks are refused,
    naming the task that has the scheduled time ("is more than one beat running?")."""
    b = two_beats
    assert b.late_sent_early == [], "beat C was stopped too late to be late"
    late = b.sent["C"] + b.sent["A restarted"]
    assert b.sent["C"] and all(refused(b.outcomes[t]) for t in late), (b.sent, b.outcomes)
    assert len(b.backups) == 1, (b.backups, b.sent, b.outcomes)
