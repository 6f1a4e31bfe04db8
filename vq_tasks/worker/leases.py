"""Leases on the steps of a run: one live execution of a step at a time, and none after it is done.

A step's message can be handed out again while an earlier execution of it may still run: RabbitMQ
redelivers at once when a worker's connection dies (and when its consumer_timeout closes the
channel of a live worker), the Redis broker once a worker stops renewing its deliveries
(vq_tasks.worker.liveness). The lease tells a dead execution from a live one by a key that the
execution renews every few seconds from a thread of its own and that expires
BACKUP_WORKER_LOST_AFTER seconds after the last renewal, however long the step itself runs (a
pg_dump waiting an hour on a table lock renews it all along). A second execution waits while the
lease lives and takes it over once it has expired, or at once when its holder was a process of
this host that has ended (a pool process killed: seconds, not a minute). Before it commits its
work, an execution checks that the lease is still its own (``Lease.check``): one cut off from
Redis for longer than the lease commits nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import redis

from vq_tasks import coordination
from vq_tasks.logs import Say

Sleep = Callable[[float], None]
LEASE_KEY = "vq:lease:{}"
WAITER_KEY = "vq:lease-waiter:{}"
POLL_SECONDS = 1.0
RENEWALS_PER_LEASE = 6
_REPLACE_IF = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('set', KEYS[1], ARGV[2], 'ex', tonumber(ARGV[3]))
end
return false
"""


class LeaseLost(Exception):
    """Another execution took this step over (this one went silent for longer than its lease)."""


def process_identity(pid: int | None = None) -> str:
    """Name this process (or ``pid``) across hosts: host name, PID namespace, PID, start time."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}/{_pid_namespace()}/{pid}/{_start_time(pid)}"


def ended_here(identity: str) -> bool:
    """Whether ``identity`` names a process of this host and PID namespace that has ended (its PID
    is gone or now belongs to a process started at another time)."""
    host, namespace, pid, started = ([*identity.split("/"), "", "", "", ""])[:4]
    if host != socket.gethostname() or namespace != _pid_namespace() or not pid.isdigit():
        return False
    return _start_time(int(pid)) != started


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").replace("/", "")
    except OSError:
        return "unknown"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), "" if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass(frozen=True)
class Lease:
    r: redis.Redis
    key: str
    value: str
    ttl: int

    @property
    def token(self) -> str:
        return self.value.split(" ", 1)[0]

    def check(self) -> None:
        """Raise LeaseLost unless this execution still holds the lease: call it before committing.
        A lease that nobody holds (Celery's Redis restarted without it) is taken again."""
        value = cast("str | None", self.r.get(self.key))
        if value is None:
            if self.r.set(self.key, self.value, nx=True, ex=self.ttl):
                return
            value = cast("str | None", self.r.get(self.key))
        if value is None or not value.startswith(self.token + " "):
            holder = _identity(value) if value else "another execution"
            raise LeaseLost(f"{_name(self.key)} was taken over by {holder}: this execution commits nothing")


@contextlib.contextmanager
def leased(r: redis.Redis, name: str, ttl: int, say: Say, sleep: Sleep = time.sleep) -> Iterator[Lease]:
    """Hold the lease ``name`` while the block runs, renewed every ``ttl``/6 seconds and given back
    at the end; first wait, telling ``say`` once, while another live execution holds it."""
    token = uuid.uuid4().hex
    key = LEASE_KEY.format(name)
    value = f"{token} {process_identity()} {datetime.now(UTC).isoformat(timespec='seconds')}"
    _take(r, key, value, ttl, say, sleep)
    coordination.release_if_holder(r, WAITER_KEY.format(name), token)
    try:
        with coordination.heartbeat(r, token, ttl, key=key, every=max(1.0, ttl / RENEWALS_PER_LEASE)):
            yield Lease(r, key, value, ttl)
    finally:
        with contextlib.suppress(redis.RedisError):
            coordination.release_if_holder(r, key, token)


def _take(r: redis.Redis, key: str, value: str, ttl: int, say: Say, sleep: Sleep) -> None:
    """Take the lease ``key`` for ``value`` (its token first), waiting while a live holder has it.
    Only the newest of the deliveries waiting for a step waits on: an older one's message was
    handed out again (that is how the newer one came), so it ends with LeaseLost."""
    token = value.split(" ", 1)[0]
    waiter = WAITER_KEY.format(_name(key))
    told = False
    while True:
        if r.set(key, value, nx=True, ex=ttl):
            return
        held = cast("str | None", r.get(key))
        if held is None:
            continue  # expired between SET and GET
        if ended_here(_identity(held)):
            if r.eval(_REPLACE_IF, 1, key, held, value, str(ttl)):
                say(f"{_name(key)}: its earlier execution ({_identity(held)}) has ended; taking it over")
                return
            continue
        if not told:
            r.set(waiter, f"{token} waiting", ex=ttl)
            say(
                f"{_name(key)} is being worked on by {_identity(held)}; waiting until it ends, or "
                f"until it has shown no sign of life for {ttl} s"
            )
            told = True
        elif not coordination.renew_if_holder(r, waiter, token, ttl):
            raise LeaseLost(f"{_name(key)}: a newer delivery of this step waits for it now; this one ends")
        sleep(POLL_SECONDS)


def _identity(value: str) -> str:
    parts = value.split(" ")
    return parts[1] if len(parts) > 1 else "an unknown execution"


def _name(key: str) -> str:
    return key.removeprefix(LEASE_KEY.format(""))
