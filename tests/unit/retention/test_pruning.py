"""The retention plan of a real Local storage (kinds read from real manifests, or given) and
``prune_all`` on it with Celery's Redis unreachable: what goes and why, what a dry run leaves, the
audit lines of a real prune, and a deletion that fails. Then a simulated year of daily backups,
each kind chosen as the pipeline chooses it, pruned every day: it ends with exactly the backups
that plain date arithmetic expects."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.unit.retention.test_retention import GFS, applied, stored
from vq_tasks.catalog.backup_set import BackupSet
from vq_tasks.manifest import (
    Checksums,
    ComponentEntry,
    FilesFacts,
    Manifest,
    StoredFile,
    kind_for,
    manifest_name,
    new_backup_id,
)
from vq_tasks.retention import plan as retention_plan
from vq_tasks.retention import prune as pruning
from vq_tasks.retention.policy import Policy, decide
from vq_tasks.retention.prune import prune_all
from vq_tasks.settings import Settings, load_settings
from vq_tasks.storage.local import LocalStorage

NOW = datetime(2024, 6, 15, 12, 0, tzinfo=UTC)
PREFIX = "virtualqueue_backup"
UNREACHABLE = "redis://127.0.0.1:1/0"


def plant(
    root: Path, started: datetime, kind: str | None, manifest: bool = True, partial: bool = False
) -> str:
    """Write a backup into a Local storage folder: a bundle and a logs archive, and last its
    manifest (a real Manifest of ``kind`` naming both; ``kind`` None writes an unreadable one).
    Return the backup id."""
    backup_id = new_backup_id(PREFIX, started)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for name in (f"{backup_id}.tar.gz", f"{backup_id}_logs.tar.gz"):
        data = f"{name} planted by the test".encode()
        (root / name).write_bytes(data)
        files.append(StoredFile(name=name, md5=_md5(data), sha256=_sha256(data), size=len(data)))
    if partial:
        (root / f".{backup_id}.tar.gz.partial-0a1b2c").write_bytes(b"half")
    if manifest:
        text = _manifest(backup_id, started, kind, files) if kind else "{not a manifest"
        (root / manifest_name(backup_id)).write_text(text)
    return backup_id


def _manifest(backup_id: str, started: datetime, kind: str, files: list[StoredFile]) -> str:
    content = Checksums(size=1, md5="0" * 32, sha256="0" * 64)
    entry = ComponentEntry(
        member="config.tar.gz", stored_in=files[0].name, content=content, facts=FilesFacts(roots=[], files=[])
    )
    return Manifest(
        backup_id=backup_id,
        kind=kind,
        started_at=started,
        finished_at=started + timedelta(minutes=5),
        duration_seconds=300,
        tool_version="test",
        compression="gzip",
        files=files,
        components={"config": entry},
    ).model_dump_json()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def files_of(backup_id: str, logs: bool = True) -> set[str]:
    found = {f"{backup_id}.tar.gz", manifest_name(backup_id)}
    return found | ({f"{backup_id}_logs.tar.gz"} if logs else set())


@contextlib.contextmanager
def undeletable(path: Path) -> Iterator[None]:
    """Make ``path`` impossible to delete for this process, for real: root ignores a folder's
    mode, so as root the file is made immutable (chattr +i), else its folder read-only."""
    if os.geteuid() != 0:
        path.parent.chmod(0o500)
        try:
            yield
        finally:
            path.parent.chmod(0o700)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a file immutable here (chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture
def store(tmp_path) -> dict[str, str]:
    """A primary storage holding one backup of each fate, by name, plus a file that is not ours."""
    root = tmp_path / "primary"
    ids = {
        "newest": plant(root, NOW - timedelta(days=1), "daily"),
        "daily_old": plant(root, NOW - timedelta(days=40), "daily"),
        "weekly_kept": plant(root, NOW - timedelta(days=60), "weekly"),
        "weekly_old": plant(root, NOW - timedelta(days=100), "weekly"),
        "monthly_kept": plant(root, NOW - timedelta(days=200), "monthly"),
        "monthly_old": plant(root, NOW - timedelta(days=400), "monthly"),
        "manual_old": plant(root, NOW - timedelta(days=31), "manual"),
        "unknown": plant(root, NOW - timedelta(days=210), None),
        "debris": plant(root, NOW - timedelta(days=3), "daily", manifest=False),
        "running": plant(root, NOW - timedelta(hours=2), "daily", manifest=False),
    }
    (root / "notes.txt").write_text("not a backup")
    return ids


def make_settings(tmp_path: Path, **values) -> Settings:
    return load_settings(
        backup_storage_path=str(tmp_path / "primary"),
        backup_staging_dir=tmp_path / "staging",
        backup_audit_log=tmp_path / "audit.jsonl",
        celery_broker_url=UNREACHABLE,
        **values,
    )


def test_the_plan_reads_each_kind_from_its_manifest(tmp_path, store, caplog):
    storage = LocalStorage(tmp_path / "primary")
    with caplog.at_level(logging.WARNING):
        plan = retention_plan.plan(storage, make_settings(tmp_path), NOW)
    kinds = {b.backup_id: b.kind for b in plan.sets}
    assert kinds[store["weekly_old"]] == "weekly" and kinds[store["monthly_kept"]] == "monthly"
    assert kinds[store["unknown"]] is None and kinds[store["debris"]] is None
    assert "not a valid manifest" in caplog.text and "kept as a monthly backup" in caplog.text
    assert plan.expired == [store[k] for k in ("monthly_old", "weekly_old", "daily_old", "manual_old")]
    whole = {d.backup_id: d.reason for d in plan.deletions if d.order == 0}
    assert whole[store["monthly_old"]] == "monthly backup older than BACKUP_MONTHLY_RETENTION_MONTHS=12"
    assert whole[store["weekly_old"]] == "weekly backup older than BACKUP_WEEKLY_RETENTION_WEEKS=12"
    assert whole[store["manual_old"]] == "manual backup older than BACKUP_RETENTION_DAYS=30"
    assert store["debris"] not in plan.expired  # debris is deleted, but it was never a backup


def test_kinds_given_by_the_caller_are_used_instead_of_the_manifests(tmp_path, store):
    storage = LocalStorage(tmp_path / "primary")
    everything_daily = {store[k]: "daily" for k in store if k not in ("debris", "running")}
    plan = retention_plan.plan(storage, make_settings(tmp_path), NOW, kinds=everything_daily)
    assert set(plan.expired) == {store[k] for k in store} - {
        store[k] for k in ("newest", "debris", "running")
    }
    unknown_all = retention_plan.plan(storage, make_settings(tmp_path), NOW, kinds={})
    assert unknown_all.expired == [store["monthly_old"]]  # with no kind known, each is kept as monthly


def test_the_policy_comes_from_the_settings(tmp_path):
    policy = retention_plan.policy(
        make_settings(tmp_path, backup_weekly_retention_weeks=4, backup_monthly_retention_months=6)
    )
    assert (policy.retention_days, policy.logs_retention_days, policy.weekly_weeks) == (30, 7, 4)
    assert policy.monthly_months == 6 and policy.in_progress_grace == timedelta(days=1)


def test_a_dry_run_says_what_would_go_and_why_and_writes_nothing(tmp_path, store):
    before, lines = names(tmp_path / "primary"), []
    report = prune_all(make_settings(tmp_path), dry_run=True, now=NOW, say=lines.append)
    assert names(tmp_path / "primary") == before and not (tmp_path / "audit.jsonl").exists()
    assert report.ok and report.dry_run
    text = "\n".join(lines)
    assert (
        f"would delete {manifest_name(store['daily_old'])}, {store['daily_old']}.tar.gz, "
        f"{store['daily_old']}_logs.tar.gz: daily backup older than BACKUP_RETENTION_DAYS=30 (40.0 days old)"
    ) in text
    assert f"{store['weekly_kept']}_logs.tar.gz: logs older than BACKUP_LOGS_RETENTION_DAYS=7 (60.0" in text
    assert "no manifest: debris of a failed or interrupted run (3.0 days old)" in text
    assert store["running"] not in text and store["newest"] not in text
    assert json.loads(json.dumps(report.as_dict()))["destinations"]["primary"]["deletions"]


def test_a_real_prune_deletes_audits_each_backup_and_then_finds_nothing(tmp_path, store, caplog):
    settings = make_settings(tmp_path)
    with caplog.at_level(logging.WARNING):
        report = prune_all(settings, now=NOW, origin="cli:tester", task_id="t-1", say=lambda line: None)
    assert report.ok and report.destinations[0].expired_left == []
    assert "could not record the prune of primary" in caplog.text  # Celery's Redis is unreachable
    gone = {store[k] for k in ("daily_old", "weekly_old", "monthly_old", "manual_old")}
    logs_only = {store[k] for k in ("weekly_kept", "monthly_kept", "unknown")}
    assert names(tmp_path / "primary") == (
        {"notes.txt"}
        | files_of(store["newest"])
        | {n for k in logs_only for n in files_of(k, logs=False)}
        | {f"{store['running']}.tar.gz", f"{store['running']}_logs.tar.gz"}
    )
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {line["backup_id"] for line in lines} == gone | logs_only | {store["debris"]}
    assert all(
        (line["operation"], line["outcome"], line["destination"], line["origin"], line["task_id"])
        == ("prune", "deleted", "primary", "cli:tester", "t-1")
        for line in lines
    )
    daily = next(line for line in lines if line["backup_id"] == store["daily_old"])
    assert set(daily["files"]) == files_of(store["daily_old"])
    assert daily["reason"] == "daily backup older than BACKUP_RETENTION_DAYS=30"
    again: list[str] = []
    assert prune_all(settings, now=NOW, say=again.append).ok
    assert again == [f"Local:{tmp_path / 'primary'}:", "  nothing to delete"]


def test_each_audit_line_says_how_long_deleting_that_backups_files_took(tmp_path, store, monkeypatch):
    """A clock of its own that only deleting moves, by 1 s a file: each line's duration is the
    time of its own backup's files, not of the prune so far nor of the listing before."""
    clock = [1000.0]
    real_delete = LocalStorage.delete

    def slow_delete(self, name):
        clock[0] += 1
        return real_delete(self, name)

    monkeypatch.setattr(pruning, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(LocalStorage, "delete", slow_delete)
    prune_all(make_settings(tmp_path), now=NOW, say=lambda line: None)
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and clock[0] == 1000 + sum(len(line["files"]) for line in lines)
    for line in lines:
        assert line["duration_seconds"] == len(line["files"]), line
    by_id = {line["backup_id"]: line for line in lines}
    assert by_id[store["daily_old"]]["duration_seconds"] == 3.0  # bundle, logs archive, manifest
    assert by_id[store["weekly_kept"]]["duration_seconds"] == 1.0  # its logs archive only


def test_a_deletion_that_fails_is_reported_and_the_backup_counted_as_left(tmp_path, store):
    manifest = tmp_path / "primary" / manifest_name(store["daily_old"])
    lines: list[str] = []
    with undeletable(manifest):
        report = prune_all(make_settings(tmp_path), now=NOW, say=lines.append)
    primary = report.destinations[0]
    assert not report.ok and primary.error and "primary" in report.failures()[0]
    assert primary.expired_left == [store["daily_old"]]
    assert files_of(store["daily_old"]) <= names(tmp_path / "primary")  # manifest first: all stayed
    assert any(line.startswith("  FAILED: ") for line in lines)
    audited = (tmp_path / "audit.jsonl").read_text() if (tmp_path / "audit.jsonl").exists() else ""
    assert store["daily_old"] not in audited


def test_the_off_site_prune_waits_while_celerys_redis_cannot_tell_whether_a_copy_runs(tmp_path, store):
    old = plant(tmp_path / "offsite", NOW - timedelta(days=90), "daily", manifest=False)  # a copy's?
    settings = make_settings(
        tmp_path, backup_offsite_provider="Local", backup_offsite_path=str(tmp_path / "offsite")
    )
    lines: list[str] = []
    report = prune_all(settings, now=NOW, say=lines.append)
    primary, offsite = report.destinations
    assert primary.deletions and offsite.skipped and "cannot tell" in offsite.skipped
    assert names(tmp_path / "offsite") == {f"{old}.tar.gz", f"{old}_logs.tar.gz"} and report.ok
    assert f"Local:{tmp_path / 'offsite'}: skipped, Celery's Redis cannot tell" in "\n".join(lines)


# --- a simulated year --------------------------------------------------------------------------


def simulate(days: list[date], policy: Policy) -> tuple[list[BackupSet], dict[date, str]]:
    """Back up at 02:00 UTC on each day, the kind chosen as the pipeline does (from the complete
    scheduled backups in storage), and prune at 03:00; return what is stored at the end and the
    kind each backup was given."""
    backups: list[BackupSet] = []
    kinds = {}
    for day in days:
        started = datetime.combine(day, time(2), UTC)
        kinds[day] = kind_for(started, True, [b.started for b in backups if b.kind != "manual"])
        backups.append(stored(started, kinds[day]))
        now = started + timedelta(hours=1)
        backups = applied(backups, decide(backups, now, policy))
    return backups, kinds


def expected(days: list[date], policy: Policy) -> tuple[dict[date, str], set[date], set[date]]:
    """With plain date arithmetic: the kind of each day's backup, the days whose backup is kept
    at the end, and those whose logs archive is kept."""
    kinds, months, weeks = {}, set(), set()
    for day in days:
        month, week = (day.year, day.month), day.isocalendar()[:2]
        kinds[day] = "monthly" if month not in months else "weekly" if week not in weeks else "daily"
        months.add(month)
        weeks.add(week)
    end = days[-1]

    def kept(day: date) -> bool:
        apart, kind = (end - day).days, kinds[day]  # backup at 02:00, prune at 03:00: a day is ≥ 1
        if apart < policy.retention_days or (kind != "daily" and apart < 7 * policy.weekly_weeks):
            return True
        if kind != "monthly":
            return False
        assert day.day <= 28  # no clamping in these scenarios: the month arithmetic below holds
        months_apart = (end.year - day.year) * 12 + end.month - day.month
        return (months_apart, end.day) < (policy.monthly_months, day.day)

    kept_days = {day for day in days if kept(day)}
    return kinds, kept_days, {day for day in days if (end - day).days < policy.logs_retention_days}


def stored_days(backups: list[BackupSet], role: str) -> set[date]:
    return {b.started.date() for b in backups if role in b.roles}


YEAR_2023 = [date(2023, 1, 1) + timedelta(days=n) for n in range(365)]


@pytest.mark.parametrize(
    ("policy", "monthlies", "weeklies"),
    [
        (GFS, 12, 12),
        (Policy(retention_days=7, logs_retention_days=3, weekly_weeks=4, monthly_months=3), 3, 4),
    ],
)
def test_a_simulated_year_of_daily_backups(policy, monthlies, weeklies):
    backups, kinds = simulate(YEAR_2023, policy)
    want_kinds, want_kept, want_logs = expected(YEAR_2023, policy)
    assert kinds == want_kinds
    assert stored_days(backups, "manifest") == stored_days(backups, "bundle") == want_kept
    assert stored_days(backups, "logs") == want_logs
    kept_kinds = [b.kind for b in backups]
    assert kept_kinds.count("monthly") == monthlies
    assert kept_kinds.count("weekly") == weeklies
    assert kept_kinds.count("daily") == policy.retention_days - sum(
        kinds[date(2023, 12, 31) - timedelta(days=n)] != "daily" for n in range(policy.retention_days)
    )


def test_the_default_policy_keeps_the_expected_anchors():
    backups, _ = simulate(YEAR_2023, GFS)
    kept = {b.started.date(): b.kind for b in backups}
    assert [d for d, kind in sorted(kept.items()) if kind == "monthly"] == [
        date(2023, month, 1) for month in range(1, 13)
    ]
    assert min(d for d, kind in kept.items() if kind == "weekly") == date(2023, 10, 9)  # 12 weeks back
    assert min(d for d, kind in kept.items() if kind == "daily") == date(2023, 12, 2)  # 30 days back
    assert len(backups) == 12 + 12 + 26


def test_after_a_missed_week_the_next_scheduled_backup_is_weekly():
    missed = {date(2023, 6, 7) + timedelta(days=n) for n in range(7)}  # Wednesday to Tuesday
    days = [d for d in YEAR_2023 if d not in missed]
    backups, kinds = simulate(days, GFS)
    assert kinds[date(2023, 6, 14)] == "weekly"  # a Wednesday: Monday and Tuesday were missed
    assert kinds[date(2023, 6, 15)] == "daily"
    want_kinds, want_kept, _ = expected(days, GFS)
    assert kinds == want_kinds and stored_days(backups, "manifest") == want_kept
