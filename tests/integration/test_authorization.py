"""Authorized destructive tasks through a real worker and a real Celery Redis, with
BACKUP_TASK_PUBLIC_KEYS set on the worker: a prune sent without a key is refused (error, audit
line, alert mail) and deletes nothing; the same sent by `celery call` where BACKUP_TASK_KEY_FILE is
set runs; that signed message, pushed into the queue again as it was, is refused as a replay; a
forced restore without authorization is refused and leaves the live database as it was, while
the prune the worker itself enqueues after a backup is authorized."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.integration.conftest import BROKER_PASSWORD, fill_database, pg_connect, settings_env
from tests.integration.test_restore import call_restore, make_backup, snapshot
from tests.servers import redis_server_binary
from tests.unit.retention.test_pruning import files_of, names, plant
from vq_tasks.cli.run import unsubscribe
from vq_tasks.crypto.signing import public_key_text

pytestmark = pytest.mark.integration
HEADER = "vq_authorization"
REFUSED = "[VQ Backup] DESTRUCTIVE TASK REFUSED (vq_tasks.prune)"


@pytest.fixture
def task_key(tmp_path) -> SimpleNamespace:
    """An operator's task key: the private key file (mode 600) and its public key as listed."""
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "task-key.pem"
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return SimpleNamespace(path=str(path), public=public_key_text(key.public_key()))


@pytest.fixture
def env(broker, smtp, tmp_path) -> dict[str, str]:
    """A Local storage, Celery's Redis, an audit log and alerts to the test's SMTP server."""
    return settings_env(
        celery_broker_url=f"redis://:{BROKER_PASSWORD}@127.0.0.1:{broker.port}/0",
        backup_storage_path=tmp_path / "primary",
        backup_staging_dir=tmp_path / "staging",
        backup_audit_log=tmp_path / "audit.jsonl",
        smtp_host="127.0.0.1",
        smtp_port=smtp[0],
        backup_alert_email="oncall@example.com",
    )


def client_of(env: dict[str, str], monkeypatch) -> Any:
    """A Celery app of this test process, with ``env``'s settings (no BACKUP_TASK_KEY_FILE)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from vq_tasks.settings import get_settings, load_settings
    from vq_tasks.worker.app import create_app

    get_settings.cache_clear()  # the signing handler reads this process's settings
    return create_app(load_settings())


def outcome_of(result: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not result.ready() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert result.ready(), f"no worker ran {result.id}"
    outcome = result.result
    unsubscribe(result)
    return outcome


def audit_lines(path: str) -> list[dict]:
    audit = Path(path)
    return [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []


def refusals(path: str, task_id: str) -> list[dict]:
    return [a for a in audit_lines(path) if a["outcome"] == "refused" and a.get("task_id") == task_id]


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def test_prune_runs_only_when_authorized_and_a_replay_is_refused(
    env, task_key, tmp_path, smtp, broker, start_worker, monkeypatch
):
    storage = tmp_path / "primary"
    now = datetime.now(UTC).replace(microsecond=0)
    expired, kept = plant(storage, now - timedelta(days=45), "daily"), plant(storage, now, "daily")

    # (b) sent where the key is, as an operator would; copied from the queue before a worker runs it
    called = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "vq_tasks", "call", "vq_tasks.prune"],
        env={**os.environ, **env, "BACKUP_TASK_KEY_FILE": task_key.path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 0, called.stdout + called.stderr
    signed_id = called.stdout.strip()
    queue = redis.Redis(broker.host, broker.port, password=broker.password)
    (raw,) = queue.lrange("vq.maintenance", 0, -1)
    signature = json.loads(raw)["headers"][HEADER]["signature"]

    worker = start_worker({**env, "BACKUP_TASK_PUBLIC_KEYS": task_key.public})
    client = client_of(env, monkeypatch)
    ran = outcome_of(client.AsyncResult(signed_id))
    assert isinstance(ran, dict) and ran["ok"], ran
    assert names(storage) == files_of(kept)

    # (a) sent without a key: refused, nothing deleted, audited and alerted
    expired = plant(storage, now - timedelta(days=45), "daily")
    unsigned = client.send_task("vq_tasks.prune")
    refused = outcome_of(unsigned)
    assert isinstance(refused, Exception), refused
    assert "vq_tasks.prune refused: sent without an authorization" in str(refused)
    assert files_of(expired) <= names(storage)
    (line,) = refusals(env["BACKUP_AUDIT_LOG"], unsigned.id)
    assert (line["operation"], line["task"]) == ("prune", "vq_tasks.prune")
    _, mailbox = smtp
    assert [str(m["Subject"]) for m in mailbox.wait_for(1)] == [REFUSED]
    assert f"task id: {unsigned.id}" in mailbox.messages[0].get_content()

    # (c) the signed message of (b), pushed again byte for byte: a replay
    queue.lpush("vq.maintenance", raw)
    wait_for(lambda: refusals(env["BACKUP_AUDIT_LOG"], signed_id), "the replay's refusal")
    assert "was authorized and run before" in refusals(env["BACKUP_AUDIT_LOG"], signed_id)[0]["reason"]
    assert files_of(expired) <= names(storage)
    assert [str(m["Subject"]) for m in mailbox.wait_for(2)] == [
        REFUSED,
        REFUSED.replace("] ", "] CHANGED: ", 1),
    ]
    client.close()
    shown = worker.log_text() + Path(env["BACKUP_AUDIT_LOG"]).read_text()
    shown += "".join(m.get_content() for m in mailbox.messages)
    assert signature not in shown
    assert "BACKUP_TASK_KEY_FILE is not set: the prunes this worker enqueues" in worker.log_text()


def test_a_forced_restore_without_authorization_leaves_the_live_database_as_it_was(
    base_env, task_key, database, derived_databases, source_redis, layout, start_worker, monkeypatch
):
    env = {**base_env, "REDIS_SERVER_BIN": redis_server_binary(), "BACKUP_TASK_PUBLIC_KEYS": task_key.public}
    fill_database(database, customers=20)
    worker = start_worker({**env, "BACKUP_TASK_KEY_FILE": task_key.path})  # it enqueues prune: signed
    backup_id, _ = make_backup(env, layout["storage"])
    with pg_connect(database) as conn:
        conn.execute("INSERT INTO queues (name) VALUES ('added after the backup')")
    before = snapshot(database, source_redis, layout["config"])

    planned = call_restore(env, monkeypatch, backup_id=backup_id)  # a plan changes nothing: no key needed
    assert isinstance(planned, dict) and planned["plan"] is not None, planned
    forced = call_restore(env, monkeypatch, backup_id=backup_id, force=True)
    assert isinstance(forced, Exception), forced
    assert "vq_tasks.restore refused: sent without an authorization" in str(forced)
    assert snapshot(database, source_redis, layout["config"]) == before

    pruned = re.compile(r"Task vq_tasks\.prune\[[0-9a-f-]+\] succeeded in ")
    wait_for(lambda: pruned.search(worker.log_text()), "the prune the worker enqueued after the backup")
    audit = audit_lines(env["BACKUP_AUDIT_LOG"])
    assert [(a["operation"], a["outcome"]) for a in audit if a["outcome"] == "refused"] == [
        ("restore", "refused")
    ]
