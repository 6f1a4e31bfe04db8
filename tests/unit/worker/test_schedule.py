"""Beat's schedule: the backup on BACKUP_SCHEDULE and the restore drill on BACKUP_DRILL_SCHEDULE (monthly
by default), both in BACKUP_TIMEZONE; a bad drill schedule stops start-up like a bad backup schedule."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from celery.schedules import crontab

from vq_tasks.settings import ConfigError, load_settings
from vq_tasks.worker.app import create_app
from vq_tasks.worker.schedule import beat_schedule

BROKER = "redis://127.0.0.1:6390/0"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(("BACKUP_", "CELERY_", "REDIS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CELERY_BROKER_URL", BROKER)


def test_the_drill_runs_monthly_by_default_on_the_latest_backup():
    schedule = beat_schedule(load_settings())
    assert set(schedule) == {"vq-backup", "vq-restore-drill", "vq-prune"}
    prune = schedule["vq-prune"]
    assert prune["task"] == "vq_tasks.prune" and prune["kwargs"] == {"origin": "beat"}
    assert prune["schedule"] == crontab(minute="30", hour="*/6")
    drill = schedule["vq-restore-drill"]
    assert drill["task"] == "vq_tasks.restore_drill"
    assert drill["kwargs"] == {"backup_id": "latest", "origin": "beat"}
    assert drill["schedule"] == crontab(minute="0", hour="4", day_of_month="1")
    assert schedule["vq-backup"]["schedule"] == crontab(minute="0", hour="2")


def test_the_drill_follows_its_own_schedule_in_the_backup_time_zone(monkeypatch):
    monkeypatch.setenv("BACKUP_DRILL_SCHEDULE", "30 5 * * 0")
    monkeypatch.setenv("BACKUP_TIMEZONE", "Europe/Paris")
    settings = load_settings()
    drill = beat_schedule(settings)["vq-restore-drill"]["schedule"]
    assert drill == crontab(minute="30", hour="5", day_of_week="0")
    assert beat_schedule(settings)["vq-backup"]["schedule"] == crontab(minute="0", hour="2")
    app = create_app(settings)
    assert app.conf.timezone == "Europe/Paris"
    assert app.conf.beat_schedule["vq-restore-drill"]["task"] == "vq_tasks.restore_drill"
    paris = ZoneInfo("Europe/Paris")
    drill.app = app
    drill.nowfun = lambda: datetime(2024, 1, 14, 5, 0, tzinfo=paris)  # a Sunday, 05:00 in Paris
    remaining = drill.remaining_estimate(datetime(2024, 1, 7, 5, 30, tzinfo=paris))
    assert remaining.total_seconds() == 30 * 60  # due at 05:30 Paris time, not UTC


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("0 4 1 *", "needs 5 fields"), ("0 25 1 * *", "invalid"), ("monthly", "needs 5 fields")],
)
def test_a_bad_drill_schedule_stops_start_up(monkeypatch, value, fragment):
    monkeypatch.setenv("BACKUP_DRILL_SCHEDULE", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    [problem] = caught.value.problems
    assert problem.startswith("BACKUP_DRILL_SCHEDULE=") and fragment in problem


def test_both_bad_schedules_are_listed_at_once(monkeypatch):
    monkeypatch.setenv("BACKUP_SCHEDULE", "0 2 * *")
    monkeypatch.setenv("BACKUP_DRILL_SCHEDULE", "61 4 1 * *")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert [p.split("=")[0] for p in caught.value.problems] == ["BACKUP_SCHEDULE", "BACKUP_DRILL_SCHEDULE"]


def test_a_task_belongs_to_the_latest_scheduled_minute_before_it_ran():
    from datetime import UTC

    from vq_tasks.worker.schedule import scheduled_slot

    at = datetime(2026, 11, 24, 2, 7, 30, tzinfo=UTC)  # a Tuesday, seven minutes late
    assert scheduled_slot("0 2 * * *", at, "UTC") == datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    assert scheduled_slot("0 2 * * *", at.replace(hour=1), "UTC") == datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
    assert scheduled_slot("0 2 * * 1", at, "UTC") == datetime(2026, 11, 23, 2, 0, tzinfo=UTC)  # Monday
    assert scheduled_slot("0 2 * * *", at, "Europe/Berlin") == datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
    assert scheduled_slot("*/15 * * * *", at, "UTC") == datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    assert scheduled_slot("0 2 29 2 *", at, "UTC") is None  # none within two months


def test_the_slot_search_walks_real_minutes_across_daylight_saving_changes():
    """Berlin leaves summer time at 03:00 CEST on 2026-10-25 (01:00 UTC): 02:30 happens twice. A
    task of the second 02:30 (01:30 UTC) belongs to that one, not the first (00:30 UTC); in spring
    (2026-03-29) 02:30 does not exist, and a task at 03:10 CEST belongs to the day before."""
    from datetime import UTC

    from vq_tasks.worker.schedule import scheduled_slot

    second = datetime(2026, 10, 25, 1, 31, tzinfo=UTC)
    assert scheduled_slot("30 2 * * *", second, "Europe/Berlin") == datetime(2026, 10, 25, 1, 30, tzinfo=UTC)
    first = datetime(2026, 10, 25, 0, 45, tzinfo=UTC)
    assert scheduled_slot("30 2 * * *", first, "Europe/Berlin") == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    spring = datetime(2026, 3, 29, 1, 10, tzinfo=UTC)  # 03:10 CEST, just after the skipped hour
    assert scheduled_slot("30 2 * * *", spring, "Europe/Berlin") == datetime(2026, 3, 28, 1, 30, tzinfo=UTC)
