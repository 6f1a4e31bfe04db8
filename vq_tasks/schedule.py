"""The schedule beat runs, built from settings: ``vq_tasks.backup`` on BACKUP_SCHEDULE."""

from __future__ import annotations

from typing import Any

from vq_tasks.settings import Settings, crontab_from_expression


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Return Celery's beat_schedule: the backup on BACKUP_SCHEDULE, in BACKUP_TIMEZONE."""
    return {
        "vq-backup": {
            "task": "vq_tasks.backup",
            "schedule": crontab_from_expression(settings.backup_schedule),
            "kwargs": {"origin": "beat"},
        },
    }
