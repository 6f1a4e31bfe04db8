"""Worker and beat processes: bad configuration stops them, beat starts backups on schedule,
a worker consumes every queue, and the run lock expires when its holder died."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import redis

from vq_tasks import coordination
from vq_tasks.cli.run import unsubscribe
from vq_tasks.worker.app import QUEUES

pytestmark = pytest.mark.integration


def test_bad_configuration_stops_the_worker_with_every_problem(base_env):
    env = {
        **os.environ,
        **base_env,
        "BACKUP_STORAGE_PROVIDER": "Locall",
        "BACKUP_SCHEDULE": "0 25 * * *",
        "BACKUP_RETENTION_DAYS": "-1",
        "DB_PASSWORD": "pw-never-shown",
        "DB_PASSWORD_FILE": "/nonexistent",
    }
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "vq_tasks", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "4 problem(s)" in result.stderr
    for fragment in ("did you mean 'Local'", "BACKUP_SCHEDULE", "BACKUP_RETENTION_DAYS", "not both"):
        assert fragment in result.stderr
    assert "pw-never-shown" not in result.stdout + result.stderr
    assert "ready" not in result.stdout + result.stderr


def test_worker_consumes_every_routed_queue(base_env, start_worker):
    worker = start_worker(base_env)
    banner = worker.log_text()
    for queue in QUEUES:
        assert f"{queue}" in banner


def test_beat_starts_a_scheduled_backup(base_env, database, layout, start_worker, tmp_path):
    from tests.integration.conftest import fill_database

    fill_database(database, customers=20)
    env = {**base_env, "BACKUP_SCHEDULE": "* * * * *"}
    start_worker(env)
    beat = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "vq_tasks",
            "beat",
            "--loglevel=INFO",
            f"--schedule={tmp_path / 'beat-schedule'}",
        ],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 150
        manifests = []
        while not manifests and time.monotonic() < deadline:
            time.sleep(1)
            manifests = list(layout["storage"].glob("*_manifest.json")) if layout["storage"].exists() else []
        assert manifests, "beat started no backup within 150 s"
    finally:
        beat.terminate()
        beat.wait(20)
    manifest = json.loads(manifests[0].read_text())
    assert manifest["kind"] == "monthly"  # the first scheduled backup of the month


def test_run_lock_expires_when_its_holder_died(broker):
    r = redis.Redis(broker.host, broker.port, password=broker.password, decode_responses=True)
    assert coordination.acquire_lock(r, "b1", "task-1", ttl=1) == ("b1", None)
    held_by, refusal = coordination.acquire_lock(r, "b2", "task-2", ttl=1)
    assert held_by == "b1" and "b1" in refusal
    assert coordination.acquire_lock(r, "b1-again", "task-1", ttl=1) == ("b1", None)  # redelivery
    time.sleep(1.5)  # the holder made no progress: its lock is gone
    assert coordination.acquire_lock(r, "b2", "task-2", ttl=5) == ("b2", None)
    assert not coordination.release_lock(r, "b1")  # never someone else's
    assert coordination.release_lock(r, "b2")


def test_heartbeat_keeps_a_working_run_locked(broker):
    r = redis.Redis(broker.host, broker.port, password=broker.password, decode_responses=True)
    assert coordination.acquire_lock(r, "b3", "task-3", ttl=2) == ("b3", None)
    with coordination.heartbeat(r, "b3", ttl=2):
        time.sleep(3)  # longer than the lock lives without a heartbeat
        assert coordination.acquire_lock(r, "b4", "task-4", ttl=2)[1] is not None
    time.sleep(2.5)
    assert coordination.acquire_lock(r, "b4", "task-4", ttl=2) == ("b4", None)


def test_worker_refuses_pickle(base_env, start_worker, monkeypatch):
    worker = start_worker(base_env)
    for name, value in base_env.items():
        monkeypatch.setenv(name, value)
    from vq_tasks.settings import load_settings
    from vq_tasks.worker.app import create_app

    client = create_app(load_settings())
    client.conf.accept_content = ["json", "pickle"]
    sent = client.send_task("vq_tasks.prune", kwargs={"dry_run": True}, serializer="pickle")
    deadline = time.monotonic() + 20
    while "untrusted content" not in worker.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Refusing to deserialize untrusted content of type pickle" in worker.log_text()
    assert "vq_tasks.prune" not in worker.log_text().split("untrusted content")[-1]
    unsubscribe(sent)
    client.close()


def test_no_backup_starts_while_a_restore_runs(broker, tmp_path):
    from vq_tasks.backup.pipeline import BackupRefused, start_backup
    from vq_tasks.settings import load_settings

    url = f"redis://:{broker.password}@127.0.0.1:{broker.port}/0"
    settings = load_settings(celery_broker_url=url, backup_storage_path=str(tmp_path))
    r = coordination.client(settings)
    assert coordination.acquire_restore_lock(r, "restore-1", "b0", ttl=30) is None
    with pytest.raises(BackupRefused, match="a restore is running"):
        start_backup(settings, "task-9", scheduled=True)
    assert coordination.release_restore_lock(r, "restore-1")
    assert start_backup(settings, "task-9", scheduled=True).kind == "monthly"
