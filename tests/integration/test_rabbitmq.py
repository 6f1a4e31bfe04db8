"""RabbitMQ as Celery's broker (CELERY_BROKER_URL=amqp://..., the result backend a Redis): a whole
backup, a whole worker killed mid-dump, a channel closed by RabbitMQ's consumer_timeout while a
live worker still dumps, and RabbitMQ restarted mid-dump. The shared RabbitMQ is used through a
virtual host of each test's own; the destructive tests start a private node (tests/servers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import BROKER_PASSWORD, fill_database
from tests.integration.test_faults import (
    assert_one_complete_backup,
    launch_worker,
    pg_dumps_waiting,
    start_run,
    table_locked,
    wait_until,
)
from tests.integration.test_faults_backup import pg_dumps_of
from tests.integration.test_faults_workers import (
    assert_taken_over,
    fault_mid_dump,
    kill_whole,
    launcher,
    lost_after_env,
    received,
)
from tests.servers import RabbitMQNode, rabbitmq_available, rabbitmq_vhost

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not rabbitmq_available(), reason="no RabbitMQ on 127.0.0.1:5672 (.ci/run starts one)"),
]


def on_rabbitmq(env: dict[str, str], broker, url: str) -> dict[str, str]:
    """``env`` with RabbitMQ at ``url`` as the broker and the test's Redis as the result backend."""
    backend = f"redis://:{BROKER_PASSWORD}@127.0.0.1:{broker.port}/0"
    return {**env, "CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": backend}


@pytest.fixture
def env(base_env, smtp) -> dict[str, str]:
    return lost_after_env(base_env, smtp)


@pytest.fixture
def vhost() -> Iterator[str]:
    with rabbitmq_vhost() as url:
        yield url


def test_a_worker_killed_mid_dump_is_redelivered_at_once_and_taken_over_after_its_lease(
    env, broker, vhost, database, layout, workers, smtp, tmp_path
):
    """RabbitMQ hands the dead worker's delivery to the live one as soon as the connection closes;
    the live one, on the same machine, sees that the dead execution's process has ended and takes
    its lease over at once (on another host it waits for the lease: test_hosts.py). One backup,
    one mail."""
    env = on_rabbitmq(env, broker, vhost)
    takeover = fault_mid_dump(env, database, tmp_path, launcher(env, tmp_path, workers), kill_whole)
    wait_until(
        lambda: received(takeover.heir, "dump_database") == 1, "RabbitMQ did not redeliver", timeout=10
    )
    met_the_lease = ("is being worked on by", "has ended; taking it over")  # and took it over
    wait_until(lambda: any(m in takeover.heir.log_text() for m in met_the_lease), takeover.heir.log_text)
    what = "worker killed mid-dump, another alive, same host (backup complete)"
    assert_taken_over(takeover, what, env, layout, smtp[1])


def test_a_delivery_closed_by_consumer_timeout_never_runs_the_step_twice(
    env, broker, database, layout, workers, smtp, tmp_path
):
    """RabbitMQ 3.10 applies only its node-wide consumer_timeout (the x-consumer-timeout queue
    argument the app declares counts from 3.12): here 3 s, checked every second. pg_dump waits
    on a table lock for longer; RabbitMQ closes the channel and hands the delivery out again. The
    second delivery finds the step's lease alive and waits; the first execution goes on (a lost
    channel cancels nothing) and stages the dump; the second returns that part. One pg_dump, one
    backup, one mail."""
    with RabbitMQNode(tmp_path / "rabbitmq", consumer_timeout_ms=3000, channel_tick_interval_ms=1000) as node:
        env = on_rabbitmq(env, broker, node.url)
        fill_database(database, customers=50)
        workers.append(launch_worker(env, tmp_path / "worker-a.log", "a"))
        workers.append(launch_worker(env, tmp_path / "worker-b.log", "b"))
        with table_locked(database):
            run = start_run(env, tmp_path)
            wait_until(lambda: pg_dumps_waiting(database) == 1, "dump_database never ran")
            logs = lambda: "".join(w.log_text() for w in workers)  # noqa: E731
            wait_until(lambda: "is being worked on by" in logs(), "the delivery was never handed out again")
            assert len(pg_dumps_of(database)) == 1
        code, output = run.finish()
        assert code == 0, output + logs()
        assert "Connection to broker lost" in logs() and "PRECONDITION_FAILED" in logs(), logs()
        assert "Unrecoverable error" not in logs()
        assert all(w.process.poll() is None for w in workers)  # the worker reconnected, never exited
        wait_until(lambda: "not dumped again" in logs(), "the second delivery never ended")  # after the first
        assert_one_complete_backup(layout, run.backup_id, smtp[1])


def test_rabbitmq_restarted_mid_dump_cancels_nothing(env, broker, database, layout, workers, smtp, tmp_path):
    """worker_cancel_long_running_tasks_on_connection_loss is False: RabbitMQ restarted while
    pg_dump waits on a lock; the worker reconnects and the dump goes on (one pg_dump); one backup."""
    with RabbitMQNode(tmp_path / "rabbitmq") as node:
        env = on_rabbitmq(env, broker, node.url)
        fill_database(database, customers=50)
        worker = launch_worker(env, tmp_path / "worker.log", "only")
        workers.append(worker)
        with table_locked(database):
            run = start_run(env, tmp_path)
            wait_until(lambda: pg_dumps_waiting(database) == 1, "dump_database never ran")
            dump = pg_dumps_of(database)[0]
            node.restart()
            reconnected = lambda: "Connected to amqp://" in worker.log_text().split("broker lost")[-1]  # noqa: E731
            wait_until(reconnected, "the worker did not reconnect")
            assert dump.is_running() and pg_dumps_of(database) == [dump]
        code, output = run.finish()
        assert code == 0, output + worker.log_text()
        assert "Connection to broker lost" in worker.log_text()
        assert "applies only its server-wide consumer_timeout" in worker.log_text()  # 3.10 here
        assert_one_complete_backup(layout, run.backup_id, smtp[1])
