"""The schedule beat runs, built from settings: ``vq_tasks.backup`` on BACKUP_SCHEDULE, the restore
drill, ``vq_tasks.restore_drill``, on BACKUP_DRILL_SCHEDULE, and retention, ``vq_tasks.prune``, on
BACKUP_PRUNE_SCHEDULE (besides after each backup, so that retention does not stop when backups
fail: a full disk must still be pruned); all in BACKUP_TIMEZONE (the app's)."""

from __future__ import annotations

from typing import Any

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
