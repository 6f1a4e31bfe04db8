"""`vq-backup prune` as an operator runs it, on two real Local destinations (primary and off-site)
with a real Celery Redis: a dry run that explains and touches nothing, a prune that deletes,
audits (with how long each backup's deletion took) and records, an off-site copy that holds the
off-site prune back, and a destination whose deletion fails while the other is still pruned."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from tests.integration.conftest import BROKER_PASSWORD, run_cli, settings_env
from tests.unit.retention.test_pruning import files_of, names, plant, undeletable
from vq_tasks import coordination
from vq_tasks.manifest import manifest_name

pytestmark = pytest.mark.integration
ROLES = ("primary", "offsite")


@pytest.fixture
def env(broker, tmp_path) -> dict[str, str]:
    return settings_env(
        celery_broker_url=f"redis://:{BROKER_PASSWORD}@127.0.0.1:{broker.port}/0",
        backup_storage_path=tmp_path / "primary",
        backup_offsite_provider="Local",
        backup_offsite_path=tmp_path / "offsite",
        backup_staging_dir=tmp_path / "staging",
        backup_audit_log=tmp_path / "audit.jsonl",
    )


@pytest.fixture
def r(broker) -> redis.Redis:
    """A client of Celery's Redis, as the coordination module talks to it."""
    return redis.Redis(broker.host, broker.port, password=broker.password, decode_responses=True)


@pytest.fixture
def planted(tmp_path, r) -> dict[str, str]:
    """The same backups in both destinations, by fate; the run of ``failed_run`` is recorded as
    failed in Celery's Redis, that of ``running`` is not (it may still be running)."""
    now = datetime.now(UTC).replace(microsecond=0)
    ages = {
        "newest": (timedelta(days=1), "daily"),
        "daily_old": (timedelta(days=45), "daily"),
        "weekly_old": (timedelta(days=90), "weekly"),
        "monthly_kept": (timedelta(days=100), "monthly"),
        "monthly_old": (timedelta(days=380), "monthly"),
        "failed_run": (timedelta(hours=2), None),
        "running": (timedelta(hours=3), None),
    }
    for role in ROLES:
        ids = {
            fate: plant(tmp_path / role, now - age, kind, manifest=kind is not None)
            for fate, (age, kind) in ages.items()
        }
    coordination.record(r, ids["failed_run"], status="failed")
    return ids


def left_after_prune(ids: dict[str, str]) -> set[str]:
    """What a prune leaves of the planted backups."""
    return (
        files_of(ids["newest"])
        | files_of(ids["monthly_kept"], logs=False)
        | {f"{ids['running']}.tar.gz", f"{ids['running']}_logs.tar.gz"}
    )


def audit_lines(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def test_a_dry_run_explains_each_deletion_and_touches_nothing(env, tmp_path, r, planted):
    before = {role: names(tmp_path / role) for role in ROLES}
    dry = run_cli(env, "prune", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    out = dry.stdout
    for role in ROLES:
        assert f"Local:{tmp_path / role}:" in out
        assert names(tmp_path / role) == before[role]
        assert coordination.read_prune(r, role) == {}
    assert out.count("would delete") == 2 * 5, out
    for fate, reason in [
        ("daily_old", "daily backup older than BACKUP_RETENTION_DAYS=30 (45.0 days old)"),
        ("weekly_old", "weekly backup older than BACKUP_WEEKLY_RETENTION_WEEKS=12 (90.0 days old)"),
        ("monthly_old", "monthly backup older than BACKUP_MONTHLY_RETENTION_MONTHS=12 (380.0 days old)"),
        ("failed_run", "no manifest: debris of a run that failed (0.1 days old)"),
    ]:
        assert f"{planted[fate]}_logs.tar.gz: {reason}" in out, out
    assert f"{planted['monthly_kept']}_logs.tar.gz: logs older than BACKUP_LOGS_RETENTION_DAYS=7" in out
    assert planted["running"] not in out and planted["newest"] not in out
    assert not (tmp_path / "audit.jsonl").exists()  # a dry run writes nothing


def test_a_prune_deletes_audits_each_backup_and_records_its_outcome(env, tmp_path, r, planted):
    pruned = run_cli(env, "prune")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    touched = {planted[f] for f in ("daily_old", "weekly_old", "monthly_old", "failed_run", "monthly_kept")}
    lines = audit_lines(tmp_path)
    assert sorted((line["destination"], line["backup_id"]) for line in lines) == sorted(
        (role, backup_id) for role in ROLES for backup_id in touched
    )
    for role in ROLES:
        assert names(tmp_path / role) == left_after_prune(planted)
        record = coordination.read_prune(r, role)
        assert (record["ok"], record["error"], record["deleted"], record["expired_left"]) == (
            True,
            None,
            5,
            0,
        )
        assert datetime.now(UTC) - datetime.fromisoformat(record["at"]) < timedelta(minutes=5)
    weekly = next(line for line in lines if line["backup_id"] == planted["weekly_old"])
    assert weekly["operation"] == "prune" and weekly["outcome"] == "deleted"
    assert weekly["origin"].startswith("cli:") and set(weekly["files"]) == files_of(planted["weekly_old"])
    assert weekly["reason"] == "weekly backup older than BACKUP_WEEKLY_RETENTION_WEEKS=12"
    assert all(0 <= line["duration_seconds"] < 60 for line in lines)  # deleting that backup's files
    again = run_cli(env, "prune")
    assert again.returncode == 0 and again.stdout.count("nothing to delete") == 2, again.stdout


def test_an_off_site_copy_that_runs_holds_the_off_site_prune_back(env, tmp_path, r, planted):
    r.set(coordination.OFFSITE_COPY_KEY.format("copy-task-1"), "copy-task-1", ex=120)
    pruned = run_cli(env, "prune")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert f"Local:{tmp_path / 'offsite'}: skipped, an off-site copy is running" in pruned.stdout
    assert names(tmp_path / "primary") == left_after_prune(planted)
    assert files_of(planted["daily_old"]) <= names(tmp_path / "offsite")
    assert coordination.read_prune(r, "offsite") == {}


def test_a_destination_whose_deletion_fails_does_not_spare_the_other(env, tmp_path, r, planted):
    stuck = tmp_path / "offsite" / manifest_name(planted["daily_old"])
    with undeletable(stuck):
        pruned = run_cli(env, "prune")
    assert pruned.returncode == 1, pruned.stdout + pruned.stderr
    assert "  FAILED: " in pruned.stdout and "vq-backup: prune: offsite: " in pruned.stderr
    assert f"vq-backup: prune: offsite: still past retention after the prune: {planted['daily_old']}" in (
        pruned.stderr
    )
    assert names(tmp_path / "primary") == left_after_prune(planted)
    assert names(tmp_path / "offsite") == left_after_prune(planted) | files_of(planted["daily_old"])
    failed = coordination.read_prune(r, "offsite")
    assert (
        failed["ok"] is False and failed["error"] and failed["expired_left"] == 1 and failed["deleted"] == 4
    )
    assert coordination.read_prune(r, "primary")["ok"] is True
    assert not any(
        line["destination"] == "offsite" and line["backup_id"] == planted["daily_old"]
        for line in audit_lines(tmp_path)
    )
