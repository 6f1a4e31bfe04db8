"""The schedule beat runs, built from settings: ``vq_tasks.backup`` on BACKUP_SCHEDULE and the restore
drill, ``vq_tasks.restore_drill``, on BACKUP_DRILL_SCHEDULE; both in BACKUP_TIMEZONE (the app's)."""

from __future__ import annotations

from typing import Any

from vq_tasks.settings import Settings, crontab_from_expression


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Return Celery's beat_schedule: the backup on BACKUP_SCHEDULE and a restore drill of the latest
    complete backup on BACKUP_DRILL_SCHEDULE, in BACKUP_TIMEZONE."""
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
    }
