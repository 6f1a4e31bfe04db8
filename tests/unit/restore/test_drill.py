"""The restore drill without servers: its scratch names (never the live database or Redis), the
databases of earlier drills it may drop, its alert (once per run, to BACKUP_ALERT_EMAIL, naming the
backup and what failed), and a drill that cannot run reporting why instead of raising."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.unit.verify.test_verify import BACKUP_ID, BROKER, make_backup, write_manifest
from vq_tasks.catalog.acceptance import Acceptance, manifest_digest
from vq_tasks.catalog.listing import load_manifest
from vq_tasks.cli.drill import print_drill_report
from vq_tasks.cli.main import main
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import Anomaly, acceptance_name
from vq_tasks.monitoring.alerts import AlertEvent, compose, recipients
from vq_tasks.restore.drill import (
    DrillReport,
    alert_event,
    anomaly_verdict,
    run_drill,
    scratch_database_name,
    scratch_settings,
)
from vq_tasks.restore.integrity import IntegrityCheck, IntegrityReport
from vq_tasks.restore.postgres_swap import left_over
from vq_tasks.settings import load_settings

AT = datetime(2024, 2, 1, 4, 0, 7, tzinfo=UTC)


def settings(**values):
    return load_settings(**BROKER, **values)


def failed_report(failures: dict[str, str], run_id: str = "task-1") -> DrillReport:
    check = IntegrityCheck(check="database rows", expected="tables: 4", actual="tables: 3", ok=False)
    return DrillReport(
        run_id=run_id,
        requested="latest",
        backup_id=BACKUP_ID,
        started_at=AT,
        scratch_database="virtualqueue_drill_20240201040007",
        integrity=IntegrityReport(checks=[check]),
        failures=failures,
        cleanup=[],
        warnings=[],
        duration_seconds=3.5,
    )


def test_the_scratch_database_is_named_after_the_live_one_and_fits_postgres_names():
    assert scratch_database_name("virtualqueue", "20240201040007") == "virtualqueue_drill_20240201040007"
    long = "é" * 40  # 80 bytes
    name = scratch_database_name(long, "20240201040007")
    assert len(name.encode()) <= 63 and name.endswith("_drill_20240201040007") and name.startswith("é")


def test_only_scratch_databases_of_this_database_count_as_stale():
    names = [
        "virtualqueue",
        "virtualqueue_drill_20240101040000",
        "virtualqueue_drill_2024010104000",  # a digit short
        "virtualqueue_drill_20240101040000x",
        "virtualqueueXdrill_20240101040000",  # "_" is no wildcard here
        "virtualqueue_before_20240101040000",
        "other_drill_20240101040000",
        "virtualqueue_2_drill_20240101040000",
    ]
    assert left_over(names, "virtualqueue", "drill") == ["virtualqueue_drill_20240101040000"]
    assert left_over(["a.b_drill_20240101040000", "aXb_drill_20240101040000"], "a.b", "drill") == [
        "a.b_drill_20240101040000"
    ]


def test_the_scratch_redis_is_never_the_live_one():
    live = settings(redis_host="localhost", redis_port=6379, redis_password="live-pw")
    with pytest.raises(PermanentError, match="would be the live one"):
        scratch_settings(live, 6379, "scratch-pw")
    scratch = scratch_settings(live, 40001, "scratch-pw")
    assert (scratch.redis_host, scratch.redis_port) == ("127.0.0.1", 40001)
    assert scratch.redis_password.get_secret_value() == "scratch-pw"
    assert (live.redis_port, live.redis_password.get_secret_value()) == (6379, "live-pw")
    remote = settings(redis_host="redis.internal", redis_port=6379)
    assert scratch_settings(remote, 6379, "pw").redis_port == 6379  # another host: not the live Redis


def test_a_failed_drill_alerts_the_failure_address_naming_the_backup_and_what_failed():
    report = failed_report({"verify": "backup x failed verification", "database rows": "tables: 3"})
    event = alert_event(report)
    configured = settings(backup_alert_email="oncall@example.com, ops@example.com", notification_email="x@y")
    assert recipients(configured, event) == ["oncall@example.com", "ops@example.com"]
    off = settings(backup_alert_email="oncall@example.com", backup_alert_on_failure=False)
    assert recipients(off, event) == []
    mail = compose(configured, event, "opened", ["oncall@example.com"])
    assert mail["Subject"] == f"[VQ Backup] RESTORE DRILL FAILED: {BACKUP_ID} (database rows, verify)"
    body = mail.get_content()
    assert f"The restore drill of backup {BACKUP_ID} failed" in body
    assert "scratch copies: removed" in body
    assert "Failed: verify\nError: backup x failed verification" in body
    assert "drill run: task-1" in body and "scratch database: virtualqueue_drill_20240201040007" in body
    leftover = alert_event(failed_report({"cleanup": "could not be dropped"}))
    assert (
        "some could not be removed: see cleanup"
        in compose(configured, leftover, "opened", ["a@b"]).get_content()
    )


def test_drill_runs_with_the_same_failure_are_one_incident_and_a_pass_ends_it():
    first = alert_event(failed_report({"verify": "x"}, run_id="task-1"))
    again = AlertEvent.model_validate(first.model_dump(mode="json"))  # as it crosses the broker
    other_run = alert_event(failed_report({"verify": "x"}, run_id="task-2"))
    other_failure = alert_event(failed_report({"database rows": "x"}, run_id="task-3"))
    assert first.fingerprint() == again.fingerprint() == other_run.fingerprint() != ""
    assert other_failure.fingerprint() != first.fingerprint()
    passed = alert_event(failed_report({}, run_id="task-4"))
    assert not passed.problem and passed.fingerprint() == ""


def test_a_drill_that_cannot_take_the_lock_reports_it_and_changes_nothing(tmp_path):
    backup = make_backup(tmp_path)  # Celery's Redis (BROKER) does not answer
    said: list[str] = []
    report = run_drill(backup.settings, backup.storage, "latest", run_id="r1", say=said.append, now=AT)
    assert not report.ok and report.backup_id == BACKUP_ID and report.requested == "latest"
    assert list(report.failures) == ["lock"] and "did not answer" in report.failures["lock"]
    assert report.scratch_database == f"{backup.settings.db_name}_drill_20240201040007"
    assert report.cleanup == [] and report.integrity.checks == []
    assert report.warnings and "could not be recorded" in report.warnings[0]
    assert any(line.startswith("FAILED lock:") for line in said)
    assert not [p for p in backup.settings.backup_staging_dir.iterdir() if p.name.startswith(".drill-")]


def test_a_drill_without_a_complete_backup_fails_in_the_cli_with_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BACKUP_STORAGE_PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("BACKUP_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("CELERY_BROKER_URL", BROKER["celery_broker_url"])
    monkeypatch.delenv("BACKUP_ALERT_EMAIL", raising=False)
    assert main(["drill"]) == 1
    out, err = capsys.readouterr()
    assert "FAILED backup: no complete backup in" in err and "Traceback" not in err
    assert "restore drill FAILED" in out and "no alert sent" in out
    assert main(["drill", "../x"]) == 1
    assert "not a backup id" in capsys.readouterr().err


def test_the_report_carries_the_backups_anomaly_verdict_beside_the_checks(tmp_path, capsys):
    """Suspicious, accepted or good: the verdict is reported, and decides nothing of the drill."""
    backup = make_backup(tmp_path)
    good = backup.manifest
    assert anomaly_verdict(backup.storage, backup.settings, good) == "not compared (no good backup before it)"
    drop = Anomaly(kind="total_rows", subject="all tables", before=200_000, after=3, text="rows: 200,000 → 3")
    window = ["virtualqueue_backup_20240114_020000"]
    flagged = good.model_copy(update={"anomalies": [drop], "compared_with": window})
    write_manifest(backup.storage, flagged)
    stored = load_manifest(backup.storage, BACKUP_ID)
    assert anomaly_verdict(backup.storage, backup.settings, stored) == "SUSPICIOUS: rows: 200,000 → 3"
    record = Acceptance(
        backup_id=BACKUP_ID, accepted_at=AT, by="cli:ops", reason="planned",
        manifest_sha256=manifest_digest(stored),
    )  # fmt: skip
    with backup.storage.open_write(acceptance_name(BACKUP_ID)) as out:
        out.write(record.model_dump_json().encode())
    verdict = anomaly_verdict(backup.storage, backup.settings, stored)
    assert verdict == "accepted as intended: rows: 200,000 → 3"

    passed = failed_report({}).model_copy(update={"anomaly_verdict": "SUSPICIOUS: rows: 200,000 → 3"})
    passed.integrity.checks[0].ok = True
    assert passed.ok  # a suspicious backup that restores is a drill that passes
    print_drill_report(passed)
    out = capsys.readouterr().out
    table, rest = out.split("\nanomalies: SUSPICIOUS: rows: 200,000 → 3\n")
    assert "database rows" in table and "restore drill OK" in rest
    assert DrillReport.model_validate_json(passed.model_dump_json()).anomaly_verdict == passed.anomaly_verdict
    print_drill_report(failed_report({"lock": "refused"}))  # never read: no line
    assert "anomalies:" not in capsys.readouterr().out
