"""The schedule beat runs, built from settings: ``vq_tasks.backup`` on BACKUP_SCHEDULE, the restore
drill, ``vq_tasks.restore_drill``, on BACKUP_DRILL_SCHEDULE, and retention, ``vq_tasks.prune``, on
BACKUP_PRUNE_SCHEDULE (besides after each backup, so that retention does not stop when backups
fail: a full disk must still be pruned); all in BACKUP_TIMEZONE (the app's)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from vq_tasks.settings import Settings, crontab_from_expression


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Return Celery's beat_schedule: the backup on BACKUP_SCHEDULE, a restore drill of the latest
    complete backup on BACKUP_DRILL_SCHEDULE and a prune on BACKUP_PRUNE_SCHEDULE, in BACKUP_TIMEZONE."""
    return {
        "vq-backup": {
            "task": "vq_tasks.backup",
            "schedule": crontab_from_expression(settings.backup_schedule),
            "kwargs": {"origin": "beat"},
        },
        "vq-restore-drill": {
            "task": "vq_tasks.restore_drill",
            "schedule": crontab_from_expression(settings.backup_drill_schedule),
            "kwargs": {"backup_id": "latest", "origin": "beat"},
        },
        "vq-prune": {
            "task": "vq_tasks.prune",
            "schedule": crontab_from_expression(settings.backup_prune_schedule),
            "kwargs": {"origin": "beat"},
        },
    }


SLOT_SEARCH = timedelta(days=62)


def scheduled_slot(expression: str, now: datetime, timezone: str) -> datetime | None:
    """Return the scheduled time (a minute matched by the cron ``expression`` in ``timezone``, as
    beat matches it: every field must match) that a task started at ``now`` belongs to: the latest
    such minute not after ``now``; None if none in the last two months. Two beats by mistake, or a
    restarted one, send the same slot twice: the backup task claims the slot once. The search walks
    real (UTC) minutes, each read on the local clock: across a DST change, local minutes repeat or
    are skipped, and walking local minutes would skip or invent them."""
    cron = crontab_from_expression(expression)
    zone = ZoneInfo(timezone)
    minute = now.astimezone(UTC).replace(second=0, microsecond=0)
    earliest = minute - SLOT_SEARCH
    while minute >= earliest:
        if _matches(cron, minute.astimezone(zone)):
            return minute
        minute -= timedelta(minutes=1)
    return None


def _matches(cron: Any, at: datetime) -> bool:
    return (
        at.minute in cron.minute
        and at.hour in cron.hour
        and at.day in cron.day_of_month
        and at.month in cron.month_of_year
        and at.isoweekday() % 7 in cron.day_of_week
    )
