"""The restore drill against real backups made by a real worker: vq_tasks.restore_drill restores
into a scratch database, a scratch Redis and a scratch folder, checks them and removes them, and
never touches the live database or Redis; a damaged backup fails the drill and emails once, however
often the task is delivered; `vq-backup drill` does the same in its own process, cleans up after a
failed step and refuses to run while a restore holds the lock."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.integration.conftest import fill_database, pg_connect, run_cli
from tests.integration.test_restore import make_backup, redis_contents, row_counts
from tests.servers import RedisServer, redis_server_binary
from vq_tasks.cli.run import unsubscribe

pytestmark = pytest.mark.integration
SECRETS = ("db-secret-pw", "redis-secret-pw", "broker-secret-pw")
TASK_TIMEOUT = 240


@pytest.fixture
def env(base_env) -> dict[str, str]:
    """The backup's settings, and the redis-server the drill starts its scratch Redis with."""
    return {**base_env, "REDIS_SERVER_BIN": redis_server_binary()}


@pytest.fixture
def alerting(env, smtp) -> dict[str, str]:
    port, _ = smtp
    return {
        **env,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "BACKUP_ALERT_EMAIL": "oncall@example.com",
        "BACKUP_ALERT_ON_FAILURE": "true",
    }


def call_drill(env: dict[str, str], monkeypatch, task_id: str | None = None, **kwargs: Any) -> Any:
    """Send vq_tasks.restore_drill to the worker (as ``task_id``: a redelivery when repeated); return
    its result or the exception it failed with."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from vq_tasks.settings import load_settings
    from vq_tasks.worker.app import create_app

    client = create_app(load_settings())
    result = client.send_task("vq_tasks.restore_drill", kwargs=kwargs, task_id=task_id)
    deadline = time.monotonic() + TASK_TIMEOUT
    while not result.ready() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert result.ready(), "no worker ran vq_tasks.restore_drill"
    outcome = result.result
    result.forget()  # the same task id sent again must wait for its own result
    unsubscribe(result)
    client.close()
    return outcome


def drill_databases(database: str) -> list[str]:
    """The scratch databases of drills of ``database`` that exist now."""
    with pg_connect() as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database"
            " WHERE starts_with(datname, %s) AND position('_drill_' IN datname) > 0",
            (database,),
        ).fetchall()
    return [name for (name,) in rows]


def databases_of(database: str) -> list[str]:
    with pg_connect() as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1", (database,)
        ).fetchall()
    return [name for (name,) in rows]


def redis_children(pid: int) -> list[str]:
    """The redis-server processes below ``pid`` (a worker and its pool)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "redis-server" in child.name() or "redis-server" in " ".join(child.cmdline()):
                found.append(f"{child.pid} {' '.join(child.cmdline())}")
        except psutil.NoSuchProcess:
            continue
    return found


def watch(server: RedisServer) -> Callable[[], dict[str, Any]]:
    """Reset the live Redis's statistics; return what reports the connections and commands it has
    had since, other than this watcher's own INFO calls."""
    client = server.client(0)
    client.config_resetstat()

    def seen() -> dict[str, Any]:
        connections = client.info("stats")["total_connections_received"]
        ours = ("cmdstat_info", "cmdstat_config")  # Redis 7 names subcommands: cmdstat_config|resetstat
        commands = [c for c in client.info("commandstats") if not c.startswith(ours)]
        return {"connections": connections, "commands": commands}

    return seen


def live_state(database: str, server: RedisServer) -> tuple:
    return row_counts(database), redis_contents(server), databases_of(database)


def drill_record(broker: RedisServer) -> dict[str, Any]:
    raw = broker.client(0).hgetall("vq:run:drill")
    return {key.decode(): json.loads(value) for key, value in raw.items()}


def scratch_folders(staging: Path) -> list[str]:
    return [p.name for p in staging.iterdir() if p.name.startswith(".drill-")] if staging.exists() else []


def report_row(output: str, check: str) -> str:
    """The row of ``check`` in a printed integrity report."""
    return next(line.rstrip() for line in output.splitlines() if line.startswith(f"{check}  "))


def damage(bundle: Path) -> None:
    with open(bundle, "r+b") as f:
        f.seek(bundle.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))


def test_a_drill_restores_into_scratch_copies_checks_them_and_leaves_nothing(
    env, database, source_redis, layout, broker, start_worker, monkeypatch
):
    fill_database(database, customers=100)
    worker = start_worker(env)
    backup_id, _ = make_backup(env, layout["storage"])
    before = live_state(database, source_redis)
    live_redis = watch(source_redis)

    outcome = call_drill(env, monkeypatch, backup_id="latest")

    assert isinstance(outcome, dict), outcome
    assert outcome["ok"] and outcome["failures"] == {}, outcome
    assert outcome["backup_id"] == backup_id and outcome["requested"] == "latest"
    assert outcome["anomaly_verdict"] == "not compared (no good backup before it)"  # the first backup
    checks = {c["check"]: c for c in outcome["integrity"]["checks"]}
    assert set(checks) == {"database rows", "redis keys", "redis keys vs manifest", "config files"}
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["database rows"]["actual"] == "tables: 4, rows: 503"
    assert checks["redis keys"]["actual"] == "db0=8, db1=8"
    scratch = outcome["scratch_database"]
    assert scratch.startswith(f"{database}_drill_") and len(scratch) == len(database) + 21
    assert f"dropped the scratch database {scratch}" in outcome["cleanup"]
    assert any(line.startswith("stopped the scratch redis-server") for line in outcome["cleanup"])
    assert outcome["scratch_redis"].split(" ")[0] != f"127.0.0.1:{source_redis.port}"

    assert drill_databases(database) == []
    assert redis_children(worker.process.pid) == []
    assert scratch_folders(layout["staging"]) == []
    assert live_redis() == {"connections": 0, "commands": []}  # the drill never reached the live Redis
    assert live_state(database, source_redis) == before
    record = drill_record(broker)
    assert record["last_drill_ok"] is True and record["last_drill_backup_id"] == backup_id
    assert record["last_drill_failures"] == {} and 0 < record["last_drill_seconds"] < TASK_TIMEOUT
    assert record["last_drill_run_id"] == outcome["run_id"] and record["last_drill_ok_at"]
    audit = [json.loads(line) for line in Path(env["BACKUP_AUDIT_LOG"]).read_text().splitlines()]
    drills = [line for line in audit if line["operation"] == "drill"]
    assert drills[0]["outcome"] == "succeeded" and drills[0]["run_id"] == outcome["run_id"]
    assert drills[0]["integrity"]["ok"]

    live_redis = watch(source_redis)  # again: reading the live contents above counted
    printed = run_cli(env, "drill", backup_id)
    assert printed.returncode == 0, printed.stdout + printed.stderr
    for line in ("database rows", "tables: 4, rows: 503", "redis keys", "db0=8, db1=8", "config files"):
        assert line in printed.stdout
    assert "\nanomalies: not compared (no good backup before it)\n" in printed.stdout
    assert f"{backup_id}: restore drill OK" in printed.stdout
    assert "cleanup: dropped the scratch database" in printed.stdout
    last = run_cli(env, "drill", "--last")
    assert last.returncode == 0 and f"of {backup_id}: OK" in last.stdout
    assert drill_databases(database) == [] and scratch_folders(layout["staging"]) == []
    assert live_redis() == {"connections": 0, "commands": []}
    assert live_state(database, source_redis) == before
    everything = json.dumps(outcome) + worker.log_text() + printed.stdout + printed.stderr
    for secret in SECRETS:
        assert secret not in everything


def test_a_damaged_backup_fails_the_drill_and_emails_once_per_incident(
    alerting, database, source_redis, layout, broker, start_worker, smtp, monkeypatch
):
    _, mailbox = smtp
    fill_database(database, customers=50)
    worker = start_worker(alerting)
    backup_id, _ = make_backup(alerting, layout["storage"])
    damage(layout["storage"] / f"{backup_id}.tar.gz")
    before = live_state(database, source_redis)
    live_redis = watch(source_redis)

    task_id = f"drill-{uuid.uuid4()}"
    first = call_drill(alerting, monkeypatch, task_id=task_id, backup_id=backup_id)
    assert isinstance(first, dict) and first["ok"] is False, first
    assert list(first["failures"]) == ["verify"] and "failed verification" in first["failures"]["verify"]
    assert f"{backup_id}.tar.gz sha256" in first["failures"]["verify"]
    second = call_drill(alerting, monkeypatch, task_id=task_id, backup_id=backup_id)  # redelivered
    assert second["ok"] is False and second["run_id"] == first["run_id"] == task_id
    deadline = time.monotonic() + 60
    while worker.log_text().count("nothing new since the last mail about this incident") < 1:
        assert time.monotonic() < deadline, worker.log_text()[-3000:]
        time.sleep(0.2)

    messages = mailbox.wait_for(1)
    assert len(messages) == 1, [m["Subject"] for m in messages]
    mail = messages[0]
    assert mail["To"] == "oncall@example.com"
    assert mail["Subject"] == f"[VQ Backup] RESTORE DRILL FAILED: {backup_id} (verify)"
    body = mail.get_content()
    assert f"restore drill of backup {backup_id} failed" in body
    assert "Failed: verify" in body and "failed verification" in body and task_id in body
    assert "One mail per incident" in body
    record = drill_record(broker)
    assert record["last_drill_ok"] is False and list(record["last_drill_failures"]) == ["verify"]
    assert "last_drill_ok_at" not in record

    printed = run_cli(alerting, "drill", backup_id)
    assert printed.returncode == 1
    assert "FAILED verify: backup" in printed.stderr and "Traceback" not in printed.stderr
    assert "no alert sent: nothing new since the last mail about this incident" in printed.stdout
    assert len(mailbox.wait_for(2, timeout=3)) == 1  # another run with the same failure: the same incident
    assert drill_databases(database) == [] and scratch_folders(layout["staging"]) == []
    assert redis_children(worker.process.pid) == []
    assert live_redis() == {"connections": 0, "commands": []}
    assert live_state(database, source_redis) == before
    for secret in SECRETS:
        assert secret not in body + worker.log_text() + printed.stdout + printed.stderr

    good_id, _ = make_backup(alerting, layout["storage"])
    passed = run_cli(alerting, "drill", good_id)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "resolved mail sent to oncall@example.com" in passed.stdout
    resolved = mailbox.wait_for(2)[1]
    assert resolved["Subject"] == f"[VQ Backup] RESOLVED: the restore drill passes again: {good_id}"


def test_a_failed_step_still_cleans_up_and_a_running_restore_blocks_the_drill(
    env, database, source_redis, layout, broker, start_worker
):
    fill_database(database, customers=30)
    start_worker(env)
    backup_id, _ = make_backup(env, layout["storage"])
    stale = f"{database}_drill_20000101000000"  # left by a drill whose worker died
    with pg_connect() as conn:
        conn.execute(f'CREATE DATABASE "{stale}"')
    before = live_state(database, source_redis)

    broken = run_cli({**env, "REDIS_SERVER_BIN": "/bin/true"}, "drill")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert f"dropped {stale}, left by a drill that did not end" in broken.stdout
    assert "FAILED redis restore: /bin/true is no redis-server (REDIS_SERVER_BIN)" in broken.stderr
    assert report_row(broken.stdout, "database rows").endswith(" OK")
    assert report_row(broken.stdout, "config files").endswith(" OK")
    assert report_row(broken.stdout, "redis restore").endswith(" FAILED")
    assert "cleanup: dropped the scratch database" in broken.stdout
    assert "no alert sent: BACKUP_ALERT_EMAIL is not set" in broken.stdout
    assert drill_databases(database) == [] and scratch_folders(layout["staging"]) == []
    assert live_state(database, source_redis)[:2] == before[:2]  # the stale database is gone

    lock = broker.client(0)
    lock.set(
        "vq:restore:lock", "restore-other virtualqueue_backup_20240101_000000 2024-01-01T00:00:00", ex=60
    )
    busy = run_cli(env, "drill", backup_id)
    assert busy.returncode == 1
    assert "FAILED lock: refusing to restore" in busy.stderr
    assert "a restore of virtualqueue_backup_20240101_000000" in busy.stderr
    assert lock.get("vq:restore:lock").startswith(b"restore-other")  # never someone else's lock
    assert drill_databases(database) == []
    record = drill_record(broker)
    assert record["last_drill_ok"] is False and list(record["last_drill_failures"]) == ["lock"]
