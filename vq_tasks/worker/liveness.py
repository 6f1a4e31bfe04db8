"""With the Redis broker, the deliveries a live worker holds stay its own; a dead worker's go to
another worker within about BACKUP_WORKER_LOST_AFTER seconds.

kombu's Redis transport keeps each delivered, unacknowledged message in the broker (the ``unacked``
hash, and ``unacked_index``: delivery tag -> time of delivery) and puts it back in its queue once
that time is older than the visibility timeout (a periodic sweep of every worker). The app sets the
timeout to BACKUP_WORKER_LOST_AFTER; a thread of each worker's main process sets the time of every
delivery the worker holds (running, reserved, or waiting for its countdown) to now, every sixth of
that. So the time says when the worker last showed it was alive, not when the step began: a step
that runs for hours is never handed out twice, and the step of a worker that died (SIGKILL, OOM
kill, a lost host) is handed out again within BACKUP_WORKER_LOST_AFTER plus one sweep. RabbitMQ
needs none of this: it redelivers at once when a worker's connection closes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from celery import Celery
from celery.worker import state
from kombu import Connection

from vq_tasks.worker import broker

logger = logging.getLogger(__name__)


def held_delivery_tags(requests: Iterable[object] | None = None) -> set[str]:
    """The delivery tags of the messages this worker holds: reserved, scheduled or running."""
    if requests is None:
        for _ in range(5):  # the consumer changes these sets meanwhile; try again on a change
            try:
                requests = [*state.reserved_requests, *state.scheduled_requests, *state.active_requests]
                break
            except RuntimeError:
                continue
        else:
            return set()
    tags = set()
    for request in requests:
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag is not None:
            tags.add(str(tag))
    return tags


class DeliveryRenewer:
    """The thread that marks this worker's deliveries alive in the Redis broker (module docstring)."""

    def __init__(self, app: Celery, every: float):
        self.app = app
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vq-delivery-renewer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        connection = None
        while not self._stop.wait(self.every):
            try:
                if connection is None:
                    connection = self.app.connection_for_write()
                renew(connection, held_delivery_tags())
            except Exception as exc:  # the broker may be away: try again next time
                logger.warning("could not mark this worker's deliveries alive in the broker: %s", exc)
                if connection is not None:
                    connection.release()
                connection = None
        if connection is not None:
            connection.release()


def renew(connection: Connection, tags: set[str], now: float | None = None) -> int:
    """Set the delivery time of ``tags`` to ``now`` in the broker's index of unacknowledged
    messages, for those still in it (one handed out again meanwhile stays out). Return how many."""
    if not tags:
        return 0
    channel: broker.Channel = connection.default_channel  # type: ignore[assignment]  # a Redis broker's
    stamp = time.time() if now is None else now
    return int(channel.client.zadd(channel.unacked_index_key, dict.fromkeys(tags, stamp), xx=True, ch=True))
