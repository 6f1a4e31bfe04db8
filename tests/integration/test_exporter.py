"""`vq-backup exporter` after real backups by real workers: its /metrics, scraped over HTTP, carry
the values of the manifests and run records (last success, run outcomes, failures by component and
reason, sizes, storage, prune, drill), every metric a Grafana panel or a Prometheus rule names is
there, a restarted exporter serves the same values, and /healthz turns 503 naming the broker when
the broker stops and naming last_backup when the newest backup is older than allowed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Samples, run_cli, wait_for
from tests.monitoring_refs import referenced_metrics
from tests.servers import redis_server_binary
from vq_tasks.manifest import Manifest, manifest_name, parse_backup_id

pytestmark = pytest.mark.integration


def run_backup(env: dict[str, str]) -> tuple[str, subprocess.CompletedProcess]:
    """Run `vq-backup run --wait`; return the backup id and the outcome."""
    result = run_cli(env, "run", "--wait")
    found = re.search(r"^backup (\S+) started", result.stdout, re.MULTILINE)
    assert found, result.stdout + result.stderr
    return found.group(1), result


def make_history(env: dict[str, str], start_worker) -> tuple[Manifest, str]:
    """A backup that succeeds, a restore drill of it, then one that fails (its database does not
    exist on the second worker); return the first one's manifest and the second one's id."""
    worker = start_worker(env)
    good_id, result = run_backup(env)
    assert result.returncode == 0, result.stdout + result.stderr
    drill = run_cli(env, "drill")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    worker.stop()
    bad = start_worker({**env, "DB_NAME": "vq_no_such_database"}, name="bad")
    bad_id, result = run_backup(env)
    assert result.returncode == 1, result.stdout + result.stderr
    bad.stop()
    storage = Path(env["BACKUP_STORAGE_PATH"])
    return Manifest.model_validate_json((storage / manifest_name(good_id)).read_text()), bad_id


def check_values(values: Samples, manifest: Manifest, bad_id: str, storage: Path) -> None:
    """The metrics say what the manifest, the run records and the folder say."""

    def value(name: str, **labels: str) -> float:
        return values[(name, tuple(sorted(labels.items())))]

    assert value("vq_backup_last_success_timestamp_seconds") == manifest.finished_at.timestamp()
    bad_started = parse_backup_id(bad_id, "virtualqueue_backup").timestamp()
    assert bad_started <= value("vq_backup_last_run_timestamp_seconds") < bad_started + 1
    assert value("vq_backup_last_run_success") == 0
    assert value("vq_backup_run_in_progress") == 0
    assert value("vq_backup_last_duration_seconds") == manifest.duration_seconds
    assert value("vq_backup_last_size_bytes") == sum(f.size for f in manifest.files)
    for component, entry in manifest.components.items():
        assert value("vq_backup_component_size_bytes", component=component) == entry.stored_size > 0
        assert value("vq_backup_component_duration_seconds", component=component) == entry.duration_seconds
    assert value("vq_backup_runs_total", status="succeeded") == 1
    assert value("vq_backup_runs_total", status="failed") == 1
    failures = {labels: v for (name, labels), v in values.items() if name == "vq_backup_failures_total"}
    assert {labels: v for labels, v in failures.items() if v} == {
        (("component", "database"), ("reason", "permanent")): 1
    }
    assert set(failures) == {  # every other one at 0, so that its first failure is an increase
        (("component", component), ("reason", reason))
        for component in ("database", "redis", "config", "logs", "finalize", "start", "unknown")
        for reason in ("permanent", "transient", "unknown")
    }
    kinds = {dict(labels)["kind"]: v for (name, labels), v in values.items() if name == "vq_backup_backups"}
    assert kinds == {"manual": 1, "daily": 0, "weekly": 0, "monthly": 0}
    assert value("vq_backup_incomplete_backups", destination="primary") == 0
    assert value("vq_backup_expired_backups", destination="primary") == 0
    used = sum(path.stat().st_size for path in storage.iterdir())
    assert value("vq_backup_storage_used_bytes", destination="primary") == used
    disk = os.statvfs(storage)
    capacity = disk.f_blocks * disk.f_frsize
    assert value("vq_backup_storage_capacity_bytes", destination="primary") == capacity
    assert 0 < value("vq_backup_storage_free_bytes", destination="primary") <= capacity
    assert value("vq_backup_last_prune_success", destination="primary") == 1
    assert value("vq_backup_last_drill_success") == 1
    assert value("vq_backup_last_drill_duration_seconds") > 0
    checks = {labels: v for (name, labels), v in values.items() if name == "vq_backup_health_check"}
    assert checks == {(("check", c),): 1 for c in ("broker", "storage", "last_backup")}
    assert time.time() - 10 < value("vq_backup_status_timestamp_seconds") <= time.time()


def failing(body: dict) -> list[str]:
    """The checks a /healthz answer names as failing."""
    return [name for name, why in body["checks"].items() if why != "ok"]


def test_exporter_after_real_backups(base_env, layout, broker, start_worker, start_exporter):
    env = {**base_env, "BACKUP_MONITOR_INTERVAL": "1", "REDIS_SERVER_BIN": redis_server_binary()}
    manifest, bad_id = make_history(env, start_worker)
    first = start_exporter(env)
    pruned = ("vq_backup_last_prune_success", (("destination", "primary"),))
    wait_for(lambda: pruned in first.scrape(), "no prune recorded after the successful backup")
    all_ok = dict.fromkeys(["broker", "storage", "last_backup", "exporter"], "ok")
    assert first.health() == (200, {"status": "ok", "checks": all_ok})
    started = time.monotonic()
    values = first.scrape()
    scrape_seconds = time.monotonic() - started
    check_values(values, manifest, bad_id, layout["storage"])
    served = {name for name, _ in values}
    assert referenced_metrics() <= served, (
        f"named by a panel or a rule, not served: {referenced_metrics() - served}"
    )
    assert first.stop() == 0, first.log.read_text()

    second = start_exporter(env)  # a restart: everything comes from storage and Redis again
    moving = {"vq_backup_status_timestamp_seconds", "vq_backup_storage_free_bytes"}
    assert {k: v for k, v in second.scrape().items() if k[0] not in moving} == {
        k: v for k, v in values.items() if k[0] not in moving
    }
    stale = start_exporter({**env, "BACKUP_STALE_AFTER_HOURS": "0.0001"})
    code, body = stale.health()
    assert code == 503 and body["status"] == "unhealthy"
    assert failing(body) == ["last_backup"]
    assert manifest.backup_id in body["checks"]["last_backup"]
    assert "BACKUP_STALE_AFTER_HOURS=0.0001" in body["checks"]["last_backup"]

    broker.stop()
    wait_for(lambda: second.health()[0] == 503, "/healthz stayed 200 with the broker stopped", timeout=15)
    code, body = second.health()
    assert failing(body) == ["broker"]
    assert "does not answer" in body["checks"]["broker"] and "broker-secret-pw" not in json.dumps(body)
    assert second.scrape()[("vq_backup_health_check", (("check", "broker"),))] == 0
    once = run_cli(env, "exporter", "--once")
    assert once.returncode == 1 and "unhealthy: broker: the broker does not answer" in once.stderr
    assert 'vq_backup_storage_used_bytes{destination="primary"}' in once.stdout
    print(f"scrape of /metrics: {scrape_seconds * 1000:.1f} ms")
