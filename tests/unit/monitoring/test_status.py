"""The state snapshot and its metrics without servers: the health rules, which run counts as the
last one, the metrics rendered from a hand-built snapshot (exactly the fixed names, unknowns left
out), and a reading of a real Local storage with Celery's Redis unreachable (manifests read once,
each failing source reported, never raised)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vq_tasks.catalog.acceptance import Acceptance, manifest_digest
from vq_tasks.catalog.listing import load_manifest
from vq_tasks.manifest import (
    Anomaly,
    Checksums,
    ComponentEntry,
    FilesFacts,
    Manifest,
    StoredFile,
    acceptance_name,
    manifest_name,
    new_backup_id,
)
from vq_tasks.monitoring import status as status_module
from vq_tasks.monitoring.exporter import METRIC_NAMES, Exporter, families, render
from vq_tasks.monitoring.status import (
    DestinationStatus,
    RunStatus,
    Status,
    StatusReader,
    latest_runs,
    parse_time,
    run_status,
)
from vq_tasks.settings import load_settings
from vq_tasks.storage.base import StorageError
from vq_tasks.storage.local import LocalStorage

NOW = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)
PREFIX = "virtualqueue_backup"
BROKER_PASSWORD = "broker-pw-in-url"
UNREACHABLE = {"celery_broker_url": f"redis://:{BROKER_PASSWORD}@127.0.0.1:1/0"}


def settings(**values):
    return load_settings(**UNREACHABLE, **values)


def manifest(started: datetime, kind: str = "manual", seconds: float = 90.0) -> Manifest:
    backup_id = new_backup_id(PREFIX, started)
    entry = {
        "member": "x",
        "stored_in": f"{backup_id}.tar.gz",
        "content": Checksums(size=10, md5="0" * 32, sha256="0" * 64),
        "facts": FilesFacts(roots=[], files=[]),
    }
    return Manifest(
        backup_id=backup_id,
        kind=kind,
        started_at=started,
        finished_at=started + timedelta(seconds=seconds),
        duration_seconds=seconds,
        tool_version="1.0",
        compression="gzip",
        files=[
            StoredFile(name=f"{backup_id}.tar.gz", md5="0" * 32, sha256="0" * 64, size=1000),
            StoredFile(name=f"{backup_id}_logs.tar.gz", md5="0" * 32, sha256="0" * 64, size=200),
        ],
        components={
            "database": ComponentEntry(**entry, stored_size=700, duration_seconds=30.5),
            "redis": ComponentEntry(**entry, stored_size=300, duration_seconds=5.0),
            "logs": ComponentEntry(**entry),  # written before stored sizes were recorded
        },
    )


def destination(role: str = "primary", error: str | None = None, **values) -> DestinationStatus:
    fields = {
        "backups": {"daily": 3, "weekly": 1, "monthly": 1, "manual": 0},
        "incomplete": 1,
        "expired": 2,
        "newest_success": NOW - timedelta(hours=1),
        "used_bytes": 5000,
        "free_bytes": 1000,
        "capacity_bytes": 10_000,
        **values,
    }
    return DestinationStatus(role, f"Local:/backups/{role}", error, **fields)


def snapshot(**values) -> Status:
    fields = {
        "taken_at": NOW,
        "destinations": {"primary": destination()},
        "last_manifest": manifest(NOW - timedelta(hours=2)),
        "last_run": RunStatus("b2", "running", NOW - timedelta(minutes=5), {}),
        "last_finished": RunStatus("b1", "failed", NOW - timedelta(hours=1), {"database": "no such db"}),
        "running": True,
        "counters": {"runs:succeeded": 7, "runs:failed": 2, "failures:database:permanent": 2},
        "prunes": {"primary": {"at": (NOW - timedelta(hours=2)).isoformat(), "ok": False, "error": "x"}},
        "drill": {"last_drill_at": NOW.isoformat(), "last_drill_ok": True, "last_drill_seconds": 42.5},
        "broker_error": None,
        "coordination_error": None,
        **values,
    }
    return Status(**fields)


def test_all_well_is_healthy():
    assert snapshot().health(settings()) == {"broker": None, "storage": None, "last_backup": None}


def test_each_problem_names_its_check():
    checks = snapshot(broker_error="Connection refused", coordination_error="Timeout").health(settings())
    assert "the broker does not answer: Connection refused" in checks["broker"]
    assert "run records" in checks["broker"] and "Timeout" in checks["broker"]
    down = destination(error="bucket gone")
    checks = snapshot(destinations={"primary": down}, last_manifest=None).health(settings())
    assert checks["storage"] == "Local:/backups/primary: bucket gone"
    assert checks["last_backup"] == "unknown: the primary storage could not be read"


def test_offsite_is_checked_only_when_configured():
    both = {"primary": destination(), "offsite": destination("offsite", error="refused")}
    checks = snapshot(destinations=both).health(settings())
    assert checks["offsite_storage"] == "Local:/backups/offsite: refused"
    assert checks["storage"] is None


def test_last_backup_missing_or_stale():
    empty = snapshot(last_manifest=None).health(settings())["last_backup"]
    assert empty == "no complete backup in Local:/backups/primary"
    old = manifest(NOW - timedelta(hours=30), seconds=60)
    stale = snapshot(last_manifest=old).health(settings(backup_stale_after_hours=26))["last_backup"]
    assert old.backup_id in stale and "30.0 h ago" in stale and "BACKUP_STALE_AFTER_HOURS=26" in stale
    assert snapshot(last_manifest=old).health(settings(backup_stale_after_hours=31))["last_backup"] is None


def test_latest_runs_prefers_records_and_falls_back_to_the_manifest():
    newest = manifest(NOW - timedelta(hours=3))
    assert latest_runs([], newest) == (RunStatus(newest.backup_id, "succeeded", newest.started_at, {}),) * 2
    running = RunStatus("b3", "running", NOW, {})
    failed = RunStatus("b2", "failed", NOW - timedelta(hours=1), {"redis": "refused"})
    assert latest_runs([failed, running], newest) == (running, failed)
    assert latest_runs([], None) == (None, None)


def test_run_records_are_read_as_written():
    backup_id = new_backup_id(PREFIX, NOW)
    raw = {
        "status": '"failed"',
        "started_at": f'"{(NOW + timedelta(seconds=0.5)).isoformat()}"',
        "failed:database": '"database \\"x\\" does not exist"',
        "reason:database": '"permanent"',
    }
    found = run_status(backup_id, raw, PREFIX)
    assert found == RunStatus(
        backup_id, "failed", NOW + timedelta(seconds=0.5), {"database": 'database "x" does not exist'}
    )
    assert run_status(backup_id, {}, PREFIX) == RunStatus(backup_id, "unknown", NOW, {})
    assert run_status("drill", raw, PREFIX) is None and run_status("prune:primary", raw, PREFIX) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03-10T12:00:00+00:00", NOW),
        ("2024-03-10T12:00:00", NOW),
        (NOW.timestamp(), NOW),
        ("yesterday", None),
        (None, None),
        (True, None),
    ],
)
def test_recorded_times(value, expected):
    assert parse_time(value) == expected


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def exposed_names(text: str) -> set[str]:
    """The names as Prometheus stores them: counters with ``_total``."""
    found = set()
    for family in text_string_to_metric_families(text):
        found.add(family.name + "_total" if family.type == "counter" else family.name)
    return found


def test_the_metrics_of_a_snapshot():
    status = snapshot()
    text = render(status, settings()).decode()
    assert exposed_names(text) == METRIC_NAMES
    values = samples(text)
    assert (
        values[("vq_backup_last_success_timestamp_seconds", ())]
        == status.last_manifest.finished_at.timestamp()
    )
    assert values[("vq_backup_last_run_timestamp_seconds", ())] == (NOW - timedelta(minutes=5)).timestamp()
    assert values[("vq_backup_last_run_success", ())] == 0
    assert values[("vq_backup_run_in_progress", ())] == 1
    assert values[("vq_backup_last_size_bytes", ())] == 1200
    assert values[("vq_backup_last_backup_suspicious", ())] == 0
    assert values[("vq_backup_last_backup_anomalies", ())] == 0
    assert values[("vq_backup_component_size_bytes", (("component", "database"),))] == 700
    assert values[("vq_backup_component_duration_seconds", (("component", "database"),))] == 30.5
    assert ("vq_backup_component_size_bytes", (("component", "logs"),)) not in values
    assert values[("vq_backup_runs_total", (("status", "failed"),))] == 2
    assert values[("vq_backup_failures_total", (("component", "database"), ("reason", "permanent")))] == 2
    assert values[("vq_backup_backups", (("destination", "primary"), ("kind", "daily")))] == 3
    assert values[("vq_backup_expired_backups", (("destination", "primary"),))] == 2
    assert values[("vq_backup_last_prune_success", (("destination", "primary"),))] == 0
    assert values[("vq_backup_storage_free_bytes", (("destination", "primary"),))] == 1000
    assert values[("vq_backup_last_drill_duration_seconds", ())] == 42.5
    assert values[("vq_backup_health_check", (("check", "last_backup"),))] == 1
    assert values[("vq_backup_status_timestamp_seconds", ())] == NOW.timestamp()


DROP = Anomaly(
    kind="total_rows", subject="all tables", before=1_000_000, after=12, text="rows: 1,000,000 → 12"
)


def suspicion(status: Status) -> dict[str, float]:
    values = samples(render(status, settings()).decode())
    names = ("vq_backup_last_backup_suspicious", "vq_backup_last_backup_anomalies")
    return {name: values[(name, ())] for name in names if (name, ()) in values}


def test_a_suspicious_newest_backup_is_1_until_accepted_and_unknown_has_no_sample():
    flagged = manifest(NOW - timedelta(hours=2)).model_copy(update={"anomalies": [DROP, DROP]})
    assert snapshot(last_manifest=flagged).last_suspicious is True
    assert suspicion(snapshot(last_manifest=flagged)) == {
        "vq_backup_last_backup_suspicious": 1,
        "vq_backup_last_backup_anomalies": 2,
    }
    assert suspicion(snapshot(last_manifest=flagged, last_accepted=True)) == {
        "vq_backup_last_backup_suspicious": 0,
        "vq_backup_last_backup_anomalies": 2,
    }
    unknown = snapshot(last_manifest=flagged, last_accepted=None)  # the acceptance could not be read
    assert unknown.last_suspicious is None
    assert suspicion(unknown) == {"vq_backup_last_backup_anomalies": 2}
    assert suspicion(snapshot(last_manifest=None)) == {}


def failure_samples(status: Status) -> dict[tuple[str, str], float]:
    values = samples(render(status, settings()).decode())
    return {
        (dict(labels)["component"], dict(labels)["reason"]): value
        for (name, labels), value in values.items()
        if name == "vq_backup_failures_total"
    }


def test_every_failure_series_is_served_at_zero_before_its_first_failure():
    """Prometheus' increase() sees nothing in a counter series whose first sample is already 1:
    each component and reason must be there at 0 before it ever fails, or the first failure of
    each goes unalerted and the dashboards show 0."""
    components = ("database", "redis", "config", "logs", "finalize", "start", "unknown")
    reasons = ("permanent", "transient", "unknown")
    every = {(component, reason): 0 for component in components for reason in reasons}
    assert failure_samples(snapshot(counters={})) == every
    counted = {"runs:failed": 3, "failures:start:transient": 1, "failures:database:permanent": 2}
    assert failure_samples(snapshot(counters=counted)) == {
        **every,
        ("start", "transient"): 1,
        ("database", "permanent"): 2,
    }
    other = {"failures:offsite:permanent": 4, "failures:redis:timeout": 1, "failures:bad": 9}
    assert failure_samples(snapshot(counters=other)) == {
        **every,
        ("offsite", "permanent"): 4,  # any other recorded combination is kept
        ("redis", "timeout"): 1,
    }
    assert failure_samples(snapshot(counters={}, coordination_error="Timeout")) == {}  # unknown: none


def test_the_served_names_are_the_ones_dashboards_and_rules_are_written_against():
    from tests.monitoring_refs import EXPORTED_METRICS, referenced_metrics

    assert METRIC_NAMES == EXPORTED_METRICS
    assert referenced_metrics() <= METRIC_NAMES


def test_what_is_unknown_has_no_sample():
    status = snapshot(
        destinations={"primary": destination(error="refused")},
        last_manifest=None,
        coordination_error="Connection refused",
        broker_error="Connection refused",
    )
    values = samples(render(status, settings()).decode())
    assert {name for name, _ in values} == {"vq_backup_health_check", "vq_backup_status_timestamp_seconds"}
    checks = {labels[0][1]: value for (_, labels), value in values.items() if labels}
    assert checks == {"broker": 0, "storage": 0, "last_backup": 0}
    cloud = snapshot(destinations={"primary": destination(free_bytes=None, capacity_bytes=None)})
    announced = {family.name for family in families(cloud, settings())}
    assert "vq_backup_storage_free_bytes" in announced  # announced, but without a sample
    text = render(cloud, settings()).decode()
    assert "vq_backup_storage_free_bytes{" not in text and "vq_backup_storage_used_bytes{" in text


def test_health_endpoint_logic_reports_a_stalled_exporter(tmp_path):
    exporter = Exporter(settings(backup_storage_path=str(tmp_path), backup_monitor_interval=10), port=0)
    try:
        ok, checks = exporter.health(NOW)
        assert not ok and "no reading" in checks["exporter"]
        exporter.status = snapshot()
        assert exporter.health(NOW + timedelta(seconds=30)) == (
            True,
            {"broker": "ok", "storage": "ok", "last_backup": "ok", "exporter": "ok"},
        )
        ok, checks = exporter.health(NOW + timedelta(seconds=31))
        assert not ok and checks["exporter"].startswith("exporter stalled: the last reading is 31 s old")
    finally:
        exporter.stop()


def store(root: Path, found: Manifest) -> None:
    """Write a backup's files and manifest as a worker does (sizes as the manifest says)."""
    root.mkdir(exist_ok=True)
    for stored in found.files:
        (root / stored.name).write_bytes(b"x" * stored.size)
    (root / manifest_name(found.backup_id)).write_text(found.model_dump_json())


def test_reading_local_storage_with_redis_down(tmp_path, monkeypatch):
    root = tmp_path / "backups"
    old, new = manifest(NOW - timedelta(days=40)), manifest(NOW - timedelta(hours=3), kind="daily")
    store(root, old)
    store(root, new)
    (root / f"{new_backup_id(PREFIX, NOW - timedelta(minutes=1))}.tar.gz").write_bytes(b"y" * 50)
    (root / "notes.txt").write_bytes(b"z" * 7)
    loads = []
    real_load = status_module.load_manifest
    monkeypatch.setattr(status_module, "load_manifest", lambda s, i: loads.append(i) or real_load(s, i))
    reader = StatusReader(settings(backup_storage_path=str(root), backup_retention_days=30))
    found = reader.read(NOW)
    primary = found.destinations["primary"]
    assert primary.error is None
    assert primary.backups == {"daily": 1, "weekly": 0, "monthly": 0, "manual": 1}
    assert (primary.incomplete, primary.expired) == (1, 1)
    assert primary.used_bytes == sum(p.stat().st_size for p in root.iterdir())
    assert primary.free_bytes is not None and 0 < primary.free_bytes <= primary.capacity_bytes
    assert found.last_manifest == new and primary.newest_success == new.finished_at
    assert found.last_run is None and found.counters == {}  # unknown while Celery's Redis is down
    assert "Connection refused" in found.broker_error and BROKER_PASSWORD not in found.broker_error
    assert found.coordination_error and BROKER_PASSWORD not in found.coordination_error
    assert sorted(loads) == sorted([old.backup_id, new.backup_id])
    reader.read(NOW)
    assert len(loads) == 2  # manifests are read once
    (root / manifest_name(old.backup_id)).unlink()
    assert reader.read(NOW).destinations["primary"].backups["manual"] == 0


def test_the_acceptance_of_a_suspicious_newest_backup_is_read_when_listed(tmp_path):
    root = tmp_path / "backups"
    flagged = manifest(NOW - timedelta(hours=3)).model_copy(update={"anomalies": [DROP]})
    store(root, flagged)
    reader = StatusReader(settings(backup_storage_path=str(root)))
    found = reader.read(NOW)
    assert (found.last_manifest, found.last_accepted, found.last_suspicious) == (flagged, False, True)
    stored = load_manifest(LocalStorage(root), flagged.backup_id)
    record = Acceptance(
        backup_id=flagged.backup_id, accepted_at=NOW, by="cli:ops", reason="planned",
        manifest_sha256=manifest_digest(stored),
    )  # fmt: skip
    (root / acceptance_name(flagged.backup_id)).write_text(record.model_dump_json())
    assert reader.read(NOW).last_suspicious is False
    other = record.model_copy(update={"manifest_sha256": "f" * 64})  # another manifest's
    (root / acceptance_name(flagged.backup_id)).write_text(other.model_dump_json())
    found = reader.read(NOW)
    assert (found.last_accepted, found.last_suspicious) == (False, True)


def test_good_backups_kept_while_newer_ones_are_suspicious_are_not_counted_expired(tmp_path):
    """Retention keeps the last good backups past their age while newer ones are suspicious: the
    exporter must not count them expired (VQBackupExpiredBackupsRemain would fire for nothing)."""
    root = tmp_path / "backups"
    old = manifest(NOW - timedelta(days=40))
    store(root, old)
    store(root, manifest(NOW - timedelta(hours=3)).model_copy(update={"anomalies": [DROP]}))
    reader = StatusReader(settings(backup_storage_path=str(root), backup_retention_days=30))
    assert reader.read(NOW).destinations["primary"].expired == 0
    off = StatusReader(
        settings(backup_storage_path=str(root), backup_retention_days=30, backup_anomaly_keep_good=0)
    )
    assert off.read(NOW).destinations["primary"].expired == 1


def test_a_storage_that_fails_is_reported_redacted(tmp_path, monkeypatch):
    def refuse(settings, role):
        raise StorageError(f"AWS_S3:s3://b: refused with key {BROKER_PASSWORD}", transient=True)

    monkeypatch.setattr(status_module, "open_storage", refuse)
    found = StatusReader(settings(backup_storage_path=str(tmp_path))).read(NOW)
    assert found.destinations["primary"] == status_module.failed_destination(
        "primary", f"Local:{tmp_path}", "AWS_S3:s3://b: refused with key ***"
    )
    checks = found.health(settings())
    assert checks["storage"] == f"Local:{tmp_path}: AWS_S3:s3://b: refused with key ***"
    assert checks["last_backup"].startswith("unknown")


def test_cloud_space_comes_from_the_quota():
    used = 3 << 30
    cloud = SimpleNamespace(disk_space=lambda: None)  # what Storage says of a cloud store
    assert status_module.storage_space(settings(backup_storage_quota_gb=5), "primary", cloud, used) == (
        2 << 30,
        5 << 30,
    )
    assert status_module.storage_space(settings(), "primary", cloud, used) == (None, None)
    offsite = settings(backup_offsite_storage_quota_gb=2)
    assert status_module.storage_space(offsite, "offsite", cloud, used) == (0, 2 << 30)


def test_exporter_in_process_serves_and_calls_back(tmp_path):
    seen: list[Status] = []

    def broken(status: Status) -> None:
        raise RuntimeError("alerting is down")

    config = settings(backup_storage_path=str(tmp_path), backup_monitor_interval=1)
    exporter = Exporter(config, after_refresh=[broken, seen.append], host="127.0.0.1", port=0)
    exporter.start()
    try:
        deadline = time.monotonic() + 10
        while len(seen) < 2:  # a raising callback stops neither the others nor the next reading
            assert time.monotonic() < deadline, "no second reading"
            time.sleep(0.05)
        base = "http://{}:{}".format(*exporter.address)
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as answer:
            assert 'vq_backup_health_check{check="broker"} 0.0' in answer.read().decode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/nothing", timeout=5)
        assert refused.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as unhealthy:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
        assert unhealthy.value.code == 503
        body = json.loads(unhealthy.value.read())
    finally:
        exporter.stop()
    assert body["status"] == "unhealthy"
    assert body["checks"]["storage"] == body["checks"]["exporter"] == "ok"
    assert (
        "Connection refused" in body["checks"]["broker"] and BROKER_PASSWORD not in body["checks"]["broker"]
    )
    assert body["checks"]["last_backup"] == f"no complete backup in Local:{tmp_path}"
