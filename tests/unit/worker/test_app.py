"""What the Celery app promises about dead workers, per broker (docs/RELIABILITY.md): the Redis
broker's visibility timeout and sweep follow BACKUP_WORKER_LOST_AFTER, RabbitMQ's heartbeat and
queue consumer timeout too, a lost connection cancels nothing, and RabbitMQ's consumer timeout
is a lost connection, not the end of the worker."""

from __future__ import annotations

import amqp
import kombu
import pytest

from vq_tasks.settings import load_settings
from vq_tasks.worker import broker
from vq_tasks.worker.app import CONSUMER_TIMEOUT_ARGUMENT, create_app
from vq_tasks.worker.liveness import held_delivery_tags


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(("BACKUP_", "CELERY_", "REDIS_")):
            monkeypatch.delenv(name)


def app_with(monkeypatch, **env: str):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return create_app(load_settings())


def test_the_redis_broker_hands_out_again_what_was_not_renewed_for_lost_after(monkeypatch):
    app = app_with(monkeypatch, CELERY_BROKER_URL="redis://127.0.0.1:6390/0")
    options = app.conf.broker_transport_options
    assert options == {
        "visibility_timeout": 60,
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": 60,
    }
    assert app.conf.worker_cancel_long_running_tasks_on_connection_loss is False
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert all(not q.queue_arguments for q in app.conf.task_queues)
    quick = app_with(monkeypatch, BACKUP_WORKER_LOST_AFTER="12").conf.broker_transport_options
    assert quick["visibility_timeout"] == 12 and quick["unacked_restore_interval"] == 2


def test_rabbitmq_queues_carry_a_fixed_consumer_timeout_beyond_the_task_time_limit(monkeypatch):
    app = app_with(
        monkeypatch,
        CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//",
        CELERY_RESULT_BACKEND="redis://127.0.0.1:6390/0",
        BACKUP_TASK_TIME_LIMIT="7200",
    )
    fixed = {CONSUMER_TIMEOUT_ARGUMENT: 48 * 3600 * 1000}  # never another value: RabbitMQ would refuse it
    assert {q.name: q.queue_arguments for q in app.conf.task_queues} == {
        name: fixed for name in ("vq.backup", "vq.dump", "vq.maintenance")
    }
    assert app.conf.broker_heartbeat == 15  # two missed: a silent host is dropped after 30 s


@pytest.mark.parametrize("url", ["amqp://h//", "pyamqp://h//", "amqps://h//"])
def test_rabbitmqs_consumer_timeout_is_a_lost_connection_and_nothing_else_is(url, monkeypatch):
    broker.register()
    transport = kombu.Connection(url).transport
    assert isinstance(transport, broker.AMQPTransport | broker.AMQPSTransport)
    assert transport.Connection is broker.AMQPConnection
    assert issubclass(broker.ConsumerTimedOut, transport.connection_errors)
    assert broker.is_redis("rediss://h:6380/0") and not broker.is_redis(url)

    def closed_by(text: str):
        def drain(self, timeout=None):
            raise amqp.exceptions.PreconditionFailed(text)

        monkeypatch.setattr(amqp.Connection, "drain_events", drain)
        connection = broker.AMQPConnection.__new__(broker.AMQPConnection)
        return lambda: connection.drain_events(timeout=0)

    timed_out = (
        "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used: 3000 ms."
    )
    with pytest.raises(broker.ConsumerTimedOut, match="timed out"):
        closed_by(timed_out)()
    with pytest.raises(amqp.exceptions.PreconditionFailed, match="inequivalent arg") as other:
        closed_by("PRECONDITION_FAILED - inequivalent arg 'x-consumer-timeout' for queue 'vq.dump'")()
    assert not isinstance(other.value, broker.ConsumerTimedOut)


def test_held_delivery_tags_are_read_from_the_requests_a_worker_holds():
    class Message:
        def __init__(self, tag):
            self.delivery_tag = tag

    class Request:
        def __init__(self, tag):
            self.message = Message(tag)

    assert held_delivery_tags([Request("a"), Request("b"), Request("a"), object()]) == {"a", "b"}
