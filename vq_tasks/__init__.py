"""VQ Backup: backups of the Virtual Queue platform with Celery workers.

``celery -A vq_tasks`` finds the app here. It is created on first use, so that importing the
library's plain modules does not read the settings.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in {"app", "celery"}:
        from vq_tasks.worker.app import app

        return app
    raise AttributeError(f"module 'vq_tasks' has no attribute {name!r}")
