"""`vq-backup verify` and the vq_tasks.verify task on a real backup made by a real worker."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.integration.conftest import fill_database, run_cli
from vq_tasks.cli.run import unsubscribe

pytestmark = pytest.mark.integration
SECRETS = ("db-secret-pw", "redis-secret-pw", "broker-secret-pw")


def call_verify(env: dict[str, str], monkeypatch, backup_id: str) -> tuple[Any, str | None]:
    """Send vq_tasks.verify to the worker; return its result (or the exception it failed with)
    and the queue it was delivered on."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from vq_tasks.settings import load_settings
    from vq_tasks.worker.app import create_app

    client = create_app(load_settings())
    result = client.send_task("vq_tasks.verify", kwargs={"backup_id": backup_id})
    deadline = time.monotonic() + 120
    while not result.ready() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert result.ready(), "no worker ran vq_tasks.verify"
    outcome, queue = result.result, result.backend.get_task_meta(result.id).get("queue")
    unsubscribe(result)
    client.close()
    return outcome, queue


def flip_middle_byte(path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))


def test_verify_a_real_backup_then_a_damaged_one(base_env, database, layout, start_worker, monkeypatch):
    fill_database(database, customers=300)
    worker = start_worker(base_env)
    made = run_cli(base_env, "run", "--wait")
    assert made.returncode == 0, made.stdout + made.stderr
    backup_id = made.stdout.strip().splitlines()[-1]

    good = run_cli(base_env, "verify", backup_id)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "MISMATCH" not in good.stdout and f"{backup_id}: all OK" in good.stdout
    for check in ("sha256", "complete", "crc64", "readable", "rows"):
        assert f" {check} " in good.stdout
    latest = json.loads(run_cli(base_env, "verify", "latest", "--json").stdout)
    assert latest["backup_id"] == backup_id and latest["ok"] is True

    report, queue = call_verify(base_env, monkeypatch, "latest")
    assert isinstance(report, dict), report
    assert report["ok"] is True and report["backup_id"] == backup_id
    assert queue == "vq.backup"  # the default queue
    assert {c["component"] for c in report["components"]} == {"database", "redis", "config", "logs"}

    bundle = layout["storage"] / f"{backup_id}.tar.gz"
    flip_middle_byte(bundle)
    bad = run_cli(base_env, "verify", backup_id)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    mismatches = [line for line in bad.stdout.splitlines() if line.rstrip().endswith("MISMATCH")]
    assert any(line.startswith(bundle.name) and " sha256 " in line for line in mismatches), bad.stdout
    assert "checks MISMATCH" in bad.stdout

    report, _ = call_verify(base_env, monkeypatch, backup_id)
    assert report["ok"] is False
    bundle_report = next(f for f in report["files"] if f["name"] == bundle.name)
    assert {c["check"] for c in bundle_report["checks"] if not c["ok"]} >= {"md5", "sha256"}
    assert f"verify: {backup_id}: " in worker.log_text() and "checks MISMATCH" in worker.log_text()

    refused = run_cli(base_env, "verify", "../../etc/passwd")
    assert refused.returncode == 1 and "is not a backup id" in refused.stderr
    assert "Traceback" not in refused.stderr
    failure, _ = call_verify(base_env, monkeypatch, "../etc/passwd")
    assert isinstance(failure, Exception) and "is not a backup id" in str(failure)

    everything = good.stdout + bad.stdout + json.dumps(report) + worker.log_text()
    for secret in SECRETS:
        assert secret not in everything
