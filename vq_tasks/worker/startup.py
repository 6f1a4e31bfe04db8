"""What a worker checks before it takes any task: with BACKUP_IMMUTABILITY on, that every
destination can lock backups as promised (``Storage.lock_problems``). A destination that cannot
stops the worker with the fix: a backup written there would look protected and not be. One that
cannot be reached now is only logged (it may be back before the first backup, which fails then)."""

from __future__ import annotations

import logging

from vq_tasks.errors import BackupError
from vq_tasks.retention.plan import shortest_retention
from vq_tasks.settings import Settings, get_settings
from vq_tasks.storage import ROLES, open_storage

logger = logging.getLogger(__name__)


def lock_problems(settings: Settings) -> list[str]:
    """Return why a configured destination cannot keep BACKUP_IMMUTABILITY's locks (none when
    it is off). Raise BackupError when a destination cannot be asked."""
    if not settings.backup_immutability:
        return []
    found = []
    for role in ROLES:
        if settings.destination(role) is not None:
            found += open_storage(settings, role).lock_problems(shortest_retention(settings))
    return found


def refuse_without_locks(**_kwargs) -> None:
    """Celery's worker_init: stop the worker when a destination cannot lock (see the module)."""
    settings = get_settings()
    try:
        problems = lock_problems(settings)
    except BackupError as exc:
        logger.warning("could not check the destinations' retention locks now: %s", exc)
        return
    for problem in problems:
        logger.critical("BACKUP_IMMUTABILITY: %s", problem)
    if problems:
        raise SystemExit(2)
