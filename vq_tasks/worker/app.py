"""The Celery app: JSON only, late acknowledgement, one queue per kind of work, time limits. A
Redis broker is reached through vq_tasks.worker.broker's transport (kombu's, with a workaround that keeps a
worker running when it loses the broker); RabbitMQ (amqp://) through kombu's. A worker that dies
loses its steps to another one within about BACKUP_WORKER_LOST_AFTER seconds with either broker
(docs/RELIABILITY.md): see vq_tasks.worker.liveness and vq_tasks.worker.leases.

Settings are read when this module is imported; bad configuration stops the process here, with
every problem listed, before any task can run.
"""

from __future__ import annotations

import logging
import sys

from celery import Celery, signals
from kombu import Queue

from vq_tasks.logs import redact_handlers
from vq_tasks.settings import ConfigError, Settings, get_settings
from vq_tasks.worker import authorization, broker, startup
from vq_tasks.worker.liveness import DeliveryRenewer
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
logger = logging.getLogger(__name__)
# RabbitMQ 3.12+ honours a consumer timeout per queue; older servers need the server setting
# (docs/RELIABILITY.md). Either way a delivery closed early finds its step's lease (leases.py).
# A fixed value: a queue declared again with another one is refused by RabbitMQ.
CONSUMER_TIMEOUT_ARGUMENT = "x-consumer-timeout"
CONSUMER_TIMEOUT_MS = 48 * 3600 * 1000


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
    lost_after = settings.backup_worker_lost_after
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
        # Redis broker: a delivery nobody renewed for lost_after seconds is handed out again
        # (liveness.py), swept for every sixth of that
        broker_transport_options={
            "visibility_timeout": lost_after,
            "unacked_restore_interval": max(1, lost_after // 6),
            "unacked_restore_throttle": 1,
            # the sweep's lock: a worker that dies sweeping holds up the others this long
            "unacked_mutex_expire": lost_after,
        },
        # RabbitMQ: a silent connection (a host cut off) is closed, and its deliveries handed
        # out again, after two missed heartbeats: half of lost_after, the leases' own delay
        broker_heartbeat=max(2, lost_after // 4),
        broker_connection_retry_on_startup=True,
        # a broker blip must not cancel a three-hour dump (Celery 6 turns this on by default)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_queues=[Queue(name, queue_arguments=_queue_arguments(settings)) for name in QUEUES],
        task_default_queue="vq.backup",
        task_routes=ROUTES,
        timezone=settings.backup_timezone,
        enable_utc=True,
        beat_schedule=beat_schedule(settings),
    )
    return app


def _queue_arguments(settings: Settings) -> dict[str, int] | None:
    """RabbitMQ's queue arguments: a consumer timeout above the task time limit (3.12+)."""
    if broker.is_redis(settings.celery_broker_url.get_secret_value()):
        return None
    return {CONSUMER_TIMEOUT_ARGUMENT: CONSUMER_TIMEOUT_MS}


def _load() -> Settings:
    try:
        return get_settings()
    except ConfigError as exc:
        print(f"vq-backup: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


settings = _load()
app = create_app(settings)
# every process that loads the app signs the destructive tasks it sends, when it has the key
signals.before_task_publish.connect(authorization.sign_outgoing)
signals.task_postrun.connect(authorization.mark_finished)
# a worker whose destinations cannot lock as BACKUP_IMMUTABILITY promises does not start
signals.worker_init.connect(startup.refuse_without_locks)


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _redact_logs(logger, **_kwargs) -> None:
    redact_handlers(logger, settings.secret_values())


_renewer: DeliveryRenewer | None = None


@signals.worker_ready.connect
def _start_renewing_deliveries(sender=None, **_kwargs) -> None:
    """With the Redis broker, keep this worker's deliveries its own while it lives (liveness.py);
    with RabbitMQ, say what its consumer timeout needs where the queues' own does not count."""
    global _renewer
    if not broker.is_redis(settings.celery_broker_url.get_secret_value()):
        _tell_about_consumer_timeout(sender)
    elif _renewer is None:
        _renewer = DeliveryRenewer(app, every=max(1.0, settings.backup_worker_lost_after / 6))
        _renewer.start()


def _tell_about_consumer_timeout(consumer) -> None:
    """RabbitMQ before 3.12 ignores the queues' x-consumer-timeout: log what to set instead (its
    value cannot be read over AMQP). Nothing is lost when it fires (docs/RELIABILITY.md)."""
    try:
        version = consumer.connection.connection.server_properties.get("version", "")
        major, minor = (int(part) for part in str(version).split(".")[:2])
    except Exception:  # not a RabbitMQ we can tell: nothing to say
        return
    if (major, minor) < (3, 12):
        limit_ms = (settings.backup_task_time_limit + 600) * 1000
        logger.warning(
            "RabbitMQ %s applies only its server-wide consumer_timeout (30 min unless set): a step "
            "longer than it has its delivery closed and handed out again (nothing is lost or done "
            "twice, but the step's slot waits); set consumer_timeout = %d in rabbitmq.conf",
            version,
            limit_ms,
        )


@signals.worker_ready.connect
def _tell_who_may_destroy(**_kwargs) -> None:
    """Say when anyone with broker access can prune or force a restore (authorization.py)."""
    for warning in authorization.startup_warnings(settings):
        logger.warning("%s", warning)


@signals.worker_shutdown.connect
def _stop_renewing_deliveries(**_kwargs) -> None:
    global _renewer
    if _renewer is not None:
        _renewer.stop()
        _renewer = None
