"""The Celery app: JSON only, late acknowledgement, one queue per kind of work, time limits. A
Redis broker is reached through vq_tasks.worker.broker's transport (kombu's, with a workaround that keeps a
worker running when it loses the broker).

Settings are read when this module is imported; bad configuration stops the process here, with
every problem listed, before any task can run.
"""

from __future__ import annotations

import sys

from celery import Celery, signals
from kombu import Queue

from vq_tasks.logs import redact_handlers
from vq_tasks.settings import ConfigError, Settings, get_settings
from vq_tasks.worker import broker
from vq_tasks.worker.schedule import beat_schedule

QUEUES = ("vq.backup", "vq.dump", "vq.maintenance")
ROUTES = {
    "vq_tasks.dump_database": {"queue": "vq.dump"},
    "vq_tasks.dump_redis": {"queue": "vq.dump"},
    "vq_tasks.archive_config": {"queue": "vq.dump"},
    "vq_tasks.archive_logs": {"queue": "vq.dump"},
    "vq_tasks.prune": {"queue": "vq.maintenance"},
    "vq_tasks.alert": {"queue": "vq.maintenance"},
    "vq_tasks.copy_offsite": {"queue": "vq.maintenance"},
}
RESULT_TTL = 7 * 86400


def create_app(settings: Settings) -> Celery:
    """Return the Celery app configured from ``settings``."""
    broker.register()
    app = Celery(
        "vq_tasks",
        broker=settings.celery_broker_url.get_secret_value(),
        backend=settings.result_backend_url,
        include=["vq_tasks.worker.tasks"],
    )
    limit = settings.backup_task_time_limit
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        result_extended=True,
        result_expires=RESULT_TTL,
        task_time_limit=limit,
        task_soft_time_limit=limit - 30,
        broker_transport_options={"visibility_timeout": limit + 600},
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="vq.backup",
        task_routes=ROUTES,
        timezone=settings.backup_timezone,
        enable_utc=True,
        beat_schedule=beat_schedule(settings),
    )
    return app


def _load() -> Settings:
    try:
        return get_settings()
    except ConfigError as exc:
        print(f"vq-backup: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


settings = _load()
app = create_app(settings)


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _redact_logs(logger, **_kwargs) -> None:
    redact_handlers(logger, settings.secret_values())
