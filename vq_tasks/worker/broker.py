"""Celery's broker transports: for redis:// and rediss:// URLs kombu's Redis transport with one
workaround, for a bug of kombu 5.7.0; for amqp:// and amqps:// (RabbitMQ) kombu's, with RabbitMQ's
consumer timeout taken for the lost connection it amounts to (``AMQPTransport`` below).

The bug: when the connection to the broker is lost, the worker's consumer calls
``Connection.collect()`` and then ``Connection.close()`` (celery/worker/consumer/consumer.py,
``on_connection_error_after_connected``). ``collect()`` closes the default channel, but the Redis
channel's ``close()`` first reads the reply of its pending BRPOP (kombu/transport/redis.py:1894),
which raises ConnectionError on the lost connection, so the channel stays open; ``collect()`` then
sets ``transport.client = None`` (kombu/connection.py:429). ``close()`` closes that channel again,
and this time it goes on to restore its unacknowledged messages (kombu/transport/virtual/base.py:806),
for which ``Channel._connparams()`` reads ``self.connection.client.hostname``
(kombu/transport/redis.py:1957-1959): AttributeError, which is not a connection error, so it
escapes Celery's error handling: "Unrecoverable error", and the worker exits once its running
tasks end. A task acknowledged late on that channel meets the same AttributeError.

The workaround (``Channel`` below): a channel whose connection was closed raises ConnectionError
there instead, which kombu and Celery handle as the lost connection it is. The worker reconnects.
The channel's unacknowledged messages are not lost: kombu keeps each one in Redis (the ``unacked``
hash and ``unacked_index``) from delivery until it is acknowledged; the restore at close and the
late acknowledgement of a message delivered on the lost connection fail (Celery logs "Couldn't
ack"), so the message stays there, and a worker's periodic sweep puts it back in its queue once
the visibility timeout has passed (``restore_visible``), as when a worker is killed.

Remove ``Channel`` and ``Transport`` (and the Redis schemes in ``register()``) once a kombu release
no longer reads ``self.connection.client`` of a closed channel: upgrade kombu and check that
tests/integration/test_faults.py::test_broker_restarted_mid_run_the_worker_reconnects passes.
"""

from __future__ import annotations

import amqp
import redis
from kombu import transport
from kombu.transport import pyamqp
from kombu.transport import redis as kombu_redis

SCHEMES = ("redis", "rediss")
AMQP_SCHEMES = {"amqp": "AMQPTransport", "pyamqp": "AMQPTransport", "amqps": "AMQPSTransport"}


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; once its connection is closed, reaching the broker through it raises
    ConnectionError instead of AttributeError (see the module's docstring)."""

    def _connparams(self, asynchronous: bool = False) -> dict:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError(
                "this channel's broker connection is closed (the connection was lost); its "
                "unacknowledged messages stay in Redis until the visibility timeout brings them back"
            )
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above."""

    Channel = Channel


# RabbitMQ closes the channel of a delivery not acknowledged within its consumer_timeout (30 min by
# default; 3.12+ also per queue, which the app sets) with 406 PRECONDITION_FAILED. Celery takes
# that for an "Unrecoverable error" and the worker exits once its running tasks end: a backup
# step longer than the timeout would stop the worker. Raised as a lost connection instead, the
# worker reconnects and its running steps go on (worker_cancel_long_running_tasks_on_connection_loss
# is off); RabbitMQ hands the closed delivery out again, and the step's lease (leases.py) makes that
# second delivery wait for the first and then do nothing twice. Other PRECONDITION_FAILED errors (a
# queue declared with other arguments) stay what they were: the worker stops, saying why.
CONSUMER_TIMEOUT_TEXT = "delivery acknowledgement on channel"


class ConsumerTimedOut(amqp.exceptions.RecoverableConnectionError):
    """RabbitMQ closed a channel whose delivery outlived its consumer_timeout."""


class AMQPConnection(pyamqp.Connection):
    """kombu's RabbitMQ connection; the consumer timeout's closing of a channel is a lost connection."""

    def drain_events(self, timeout: float | None = None) -> None:
        try:
            super().drain_events(timeout=timeout)
        except amqp.exceptions.PreconditionFailed as exc:
            if CONSUMER_TIMEOUT_TEXT not in str(exc):
                raise
            raise ConsumerTimedOut(str(exc)) from exc


class AMQPTransport(pyamqp.Transport):
    """kombu's RabbitMQ transport with the connection above."""

    Connection = AMQPConnection


class AMQPSTransport(pyamqp.SSLTransport):
    """The same over TLS (amqps://)."""

    Connection = AMQPConnection


def is_redis(url: str) -> bool:
    """Whether the broker URL ``url`` names a Redis (else RabbitMQ, amqp://)."""
    return url.split(":", 1)[0] in SCHEMES


def register() -> None:
    """Make kombu resolve the redis:// and rediss:// schemes of a broker URL to ``Transport``,
    amqp://, pyamqp:// and amqps:// to ``AMQPTransport`` and ``AMQPSTransport``.

    The scheme stays the transport's name, so what Celery logs and Flower reads as the broker URL
    is unchanged, and so is kombu's TLS handling of rediss://. A scheme that kombu resolved
    already is forgotten, so that the next connection resolves it again."""
    aliases = {**dict.fromkeys(SCHEMES, "Transport"), **AMQP_SCHEMES}
    for scheme, name in aliases.items():
        transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:{name}"
        transport._transport_cache.pop(scheme, None)
