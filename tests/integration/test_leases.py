"""Step leases and the renewal of deliveries, against a real Redis and kombu's Redis transport:
how a live execution is told from a dead one (vq_tasks.worker.leases, vq_tasks.worker.liveness).
The whole-worker deaths these serve are in test_faults_workers.py."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import kombu
import pytest
import redis

from vq_tasks.worker import broker as vq_broker
from vq_tasks.worker.leases import LEASE_KEY, LeaseLost, ended_here, leased, process_identity
from vq_tasks.worker.liveness import renew

pytestmark = pytest.mark.integration


@pytest.fixture
def r(broker) -> redis.Redis:
    return redis.Redis(broker.host, broker.port, password=broker.password, decode_responses=True)


def test_a_live_holder_keeps_its_step_however_long_it_works_and_the_next_waits(r):
    said: list[str] = []
    taken = threading.Event()
    with leased(r, "b1:database", ttl=2, say=said.append):

        def second() -> None:
            with leased(r, "b1:database", ttl=2, say=said.append):
                taken.set()

        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(5)  # more than two lease times: the holder's thread renewed it all along
        assert not taken.is_set()
        assert len(said) == 1 and "waiting until it ends" in said[0] and process_identity() in said[0]
    waiter.join(timeout=5)
    assert taken.is_set()  # given back at the end: taken at once
    assert r.get(LEASE_KEY.format("b1:database")) is None


def test_a_silent_holder_elsewhere_is_taken_over_after_the_lease_and_can_commit_nothing(r):
    """A holder on another host (or one cut off from Redis) renews nothing: its lease ends after
    its time to live, the next execution takes it, and the first one's check then fails."""
    key = LEASE_KEY.format("b2:finalize")
    r.set(key, "token-of-a-dead-host other-host/pid:[1]/42/1 2026-01-01T02:00:00+00:00", ex=2)
    began = time.monotonic()
    with leased(r, "b2:finalize", ttl=2, say=lambda _: None) as lease:
        waited = time.monotonic() - began
        lease.check()
    assert 0.5 < waited < 4, waited

    with leased(r, "b3:redis", ttl=2, say=lambda _: None) as lease:
        key = LEASE_KEY.format(lease.name)
        r.set(key, "someone-else other-host/x/1/1 now", ex=60)  # taken over meanwhile
        with pytest.raises(LeaseLost, match="b3:redis was taken over by other-host/x/1/1"):
            lease.check()
    assert r.get(key).startswith("someone-else ")  # never someone else's to give back


def test_the_lease_of_an_ended_process_of_this_host_is_taken_over_at_once(r):
    """A pool process SIGKILLed: its main process requeues the step at once, and the new
    execution need not wait for the dead one's lease to run out."""
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from vq_tasks.worker.leases import process_identity; print(process_identity())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = child.stdout.strip()
    assert ended_here(dead) and not ended_here(process_identity())
    assert not ended_here(dead.replace(dead.split("/")[0], "another-host", 1))
    r.set(LEASE_KEY.format("b4:logs"), f"t-dead {dead} 2026-01-01T02:00:00+00:00", ex=60)
    said: list[str] = []
    began = time.monotonic()
    with leased(r, "b4:logs", ttl=60, say=said.append):
        assert time.monotonic() - began < 2
    assert said == [f"b4:logs: its earlier execution ({dead}) has ended; taking it over"]


def test_renewed_deliveries_are_not_handed_out_again_and_unrenewed_ones_are(broker):
    """kombu's Redis transport hands an unacknowledged delivery out again once its time in
    unacked_index is older than the visibility timeout; renew() keeps a live one's time current."""
    vq_broker.register()
    url = f"redis://:{broker.password}@127.0.0.1:{broker.port}/0"
    options = {"visibility_timeout": 2, "unacked_restore_throttle": 1}
    with kombu.Connection(url, transport_options=options) as producer:
        for n in range(2):
            producer.SimpleQueue("vq.test").put({"n": n})
    with kombu.Connection(url, transport_options=options) as holder:
        inbox = holder.SimpleQueue("vq.test")
        held = [inbox.get(timeout=5) for _ in range(2)]  # delivered, never acknowledged
        channel = inbox.channel
        tags = {m.delivery_tag for m in held}
        assert len(tags) == 2
        kept = {held[0].delivery_tag}
        for _ in range(4):  # 4 s: twice the visibility timeout
            time.sleep(1)
            assert renew(holder, kept) == 1
            channel.qos.restore_visible(num=10, interval=1)
        client = channel.client
        assert set(client.zrange(channel.unacked_index_key, 0, -1)) == {t.encode() for t in kept}
        assert client.llen("vq.test") == 1  # the unrenewed one is back in its queue
        assert renew(holder, tags) == 1  # one handed out again is never marked alive again


def test_only_the_newest_waiting_delivery_waits_on(r):
    """A step handed out again while a copy of it already waits (RabbitMQ's consumer timeout
    closing the channel of the waiting copy too): the older copy's message is gone, so it ends
    with LeaseLost instead of holding a pool slot for nothing; the newest takes the step."""
    outcomes: dict[str, str] = {}

    def wait(name: str) -> None:
        try:
            with leased(r, "b5:database", ttl=2, say=lambda _: None):
                outcomes[name] = "took it"
        except LeaseLost as exc:
            outcomes[name] = str(exc)

    with leased(r, "b5:database", ttl=2, say=lambda _: None):
        older = threading.Thread(target=wait, args=("older",))
        older.start()
        time.sleep(1.5)
        newer = threading.Thread(target=wait, args=("newer",))
        newer.start()
        older.join(timeout=5)
        assert "a newer delivery of this step waits for it now" in outcomes["older"]
        assert "newer" not in outcomes
    newer.join(timeout=5)
    assert outcomes["newer"] == "took it"


def test_a_lease_that_vanished_with_nobody_holding_it_is_taken_again_at_the_check(r):
    """Celery's Redis restarted without its data mid-step: nobody took the step over, so the
    execution may still commit (and holds the lease again)."""
    with leased(r, "b6:config", ttl=30, say=lambda _: None) as lease:
        key = LEASE_KEY.format(lease.name)
        r.delete(key)
        lease.check()
        assert r.get(key) == lease.value


def test_a_lease_taken_and_given_back_by_another_execution_is_never_taken_again_at_the_check(r):
    """A host cut off for longer than the lease: another execution took the step, finished it and
    gave the lease back. The first one, back, finds no lease but must not commit over the work
    of the other."""
    with leased(r, "b7:database", ttl=30, say=lambda _: None) as first:
        r.delete(LEASE_KEY.format(first.name))  # expired while its host was cut off
        with leased(r, "b7:database", ttl=30, say=lambda _: None):
            pass  # the successor, done
        with pytest.raises(LeaseLost, match="b7:database was taken over"):
            first.check()


def test_a_failure_after_the_step_was_taken_over_is_not_the_steps(r):
    """The superseded execution fails (its pg_dump cut off, say): the failure is raised as
    LeaseLost, so that it is never recorded as the step's failure while the successor works."""
    superseded = pytest.raises(LeaseLost, match="this execution's OSError is not the step's")
    with superseded, leased(r, "b8:redis", ttl=30, say=lambda _: None) as lease:
        r.set(LEASE_KEY.format(lease.name), "successor other-host/b/ns/1/1 now", ex=30)
        raise OSError("connection reset")
    with pytest.raises(OSError), leased(r, "b9:redis", ttl=30, say=lambda _: None):
        raise OSError("connection reset")  # while it holds the lease, a failure is the step's own
