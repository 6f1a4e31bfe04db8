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
GENERATION_KEY = "vq:lease-generation:{}"  # counts the takes of a step's lease
WAITER_KEY = "vq:lease-waiter:{}"
GENERATION_TTL = 14 * 86400
POLL_SECONDS = 1.0
RENEWALS_PER_LEASE = 6
# KEYS: lease, generation. ARGV: value, ttl, generation ttl, and the value to replace ("": none).
# Returns the new generation, or 0 when the lease is held (by another value than ARGV[4]).
_TAKE = """
local held = redis.call('get', KEYS[1])
if held and held ~= ARGV[4] then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'ex', tonumber(ARGV[2]))
local generation = redis.call('incr', KEYS[2])
redis.call('expire', KEYS[2], tonumber(ARGV[3]))
return generation
"""
# KEYS: lease, generation. ARGV: token, value, ttl, generation. 1 when the lease is the token's,
# or nobody's and nobody took it since (it is then the token's again); else 0.
_STILL_MINE = """
local held = redis.call('get', KEYS[1])
if held then
  if string.sub(held, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then return 1 end
  return 0
end
if redis.call('get', KEYS[2]) == ARGV[4] then
  redis.call('set', KEYS[1], ARGV[2], 'ex', tonumber(ARGV[3]))
  return 1
end
return 0
"""
# KEYS: waiter. ARGV: token, ttl. 1 while the token is the step's newest waiter (set again if
# the key went), 0 once a newer delivery waits.
_STILL_WAITING = """
local waiter = redis.call('get', KEYS[1])
if waiter and waiter ~= ARGV[1] then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'ex', tonumber(ARGV[2]))
return 1
"""

_FORGET_WAITER = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class LeaseLost(Exception):
    """This execution may not finish its step: another one took the step over (this one was
    silent for longer than its lease), or a newer delivery of the step waits for it instead."""


def process_identity(pid: int | None = None) -> str:
    """Name this process (or ``pid``) across hosts: host name, boot, PID namespace, PID, start time."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}/{_boot_id()}/{_pid_namespace()}/{pid}/{_start_time(pid)}"


def ended_here(identity: str) -> bool:
    """Whether ``identity`` names a process of this host, boot and PID namespace that has ended
    (its PID is gone or now belongs to a process started at another time)."""
    host, boot, namespace, pid, started = ([*identity.split("/"), "", "", "", "", ""])[:5]
    here = (socket.gethostname(), _boot_id(), _pid_namespace())
    if (host, boot, namespace) != here or not pid.isdigit():
        return False
    return _start_time(int(pid)) != started


def _boot_id() -> str:
    """This boot of this machine (two hosts of one name, or one host rebooted, differ)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


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
    """The lease of step ``name`` as one execution holds it: its value (token first) and the
    generation it took (how many takes the step's lease had seen then)."""

    r: redis.Redis
    name: str
    value: str
    ttl: int
    generation: int

    @property
    def token(self) -> str:
        return self.value.split(" ", 1)[0]

    def check(self) -> None:
        """Raise LeaseLost unless this execution still holds the lease: call it before committing.
        A lease gone with nobody taking it since (Celery's Redis restarted without it, this host
        cut off from Redis only) is taken again; one another execution took, even if it has
        finished and given it back, never is."""
        keys = (LEASE_KEY.format(self.name), GENERATION_KEY.format(self.name))
        args = (self.token, self.value, str(self.ttl), str(self.generation))
        if not self.r.eval(_STILL_MINE, 2, *keys, *args):
            holder = cast("str | None", self.r.get(keys[0]))
            by = _identity(holder) if holder else "another execution"
            raise LeaseLost(f"{self.name} was taken over by {by}: this execution commits nothing")

    def holds(self) -> bool:
        """Whether this execution still holds the lease (True when Redis cannot tell)."""
        try:
            self.check()
        except LeaseLost:
            return False
        except redis.RedisError:
            return True
        return True


@contextlib.contextmanager
def leased(r: redis.Redis, name: str, ttl: int, say: Say, sleep: Sleep = time.sleep) -> Iterator[Lease]:
    """Hold the lease ``name`` while the block runs, renewed every ``ttl``/6 seconds and given back
    at the end; first wait, telling ``say`` once, while another live execution holds it. A failure
    of the block after another execution took the step over is that execution's business: it is
    raised as LeaseLost, so that it is not taken for the step's failure."""
    token = uuid.uuid4().hex
    value = f"{token} {process_identity()} {datetime.now(UTC).isoformat(timespec='seconds')}"
    lease = Lease(r, name, value, ttl, _take(r, name, value, ttl, say, sleep))
    key = LEASE_KEY.format(name)
    try:
        r.eval(_FORGET_WAITER, 1, WAITER_KEY.format(name), token)
        with coordination.heartbeat(r, token, ttl, key=key, every=max(1.0, ttl / RENEWALS_PER_LEASE)):
            yield lease
    except LeaseLost:
        raise
    except BaseException as exc:
        if not lease.holds():
            raise LeaseLost(
                f"{name} was taken over; this execution's {type(exc).__name__} is not the step's"
            ) from exc
        raise
    finally:
        with contextlib.suppress(redis.RedisError):
            coordination.release_if_holder(r, key, token)


def _take(r: redis.Redis, name: str, value: str, ttl: int, say: Say, sleep: Sleep) -> int:
    """Take the lease of step ``name`` for ``value`` (its token first), waiting while a live
    holder has it; return the generation taken. Only the newest of the deliveries waiting for a
    step waits on, an older one ends with LeaseLost: a step has one live message, and a newer
    delivery means the older one's message was handed out again."""
    token = value.split(" ", 1)[0]
    keys = (LEASE_KEY.format(name), GENERATION_KEY.format(name))
    waiter = WAITER_KEY.format(name)
    told = False
    while True:
        generation = int(r.eval(_TAKE, 2, *keys, value, str(ttl), str(GENERATION_TTL), ""))
        if generation:
            return generation
        held = cast("str | None", r.get(keys[0]))
        if held is None:
            continue  # expired between the two calls
        if ended_here(_identity(held)):
            generation = int(r.eval(_TAKE, 2, *keys, value, str(ttl), str(GENERATION_TTL), held))
            if generation:
                say(f"{name}: its earlier execution ({_identity(held)}) has ended; taking it over")
                return generation
            continue
        if not told:
            r.set(waiter, token, ex=ttl)
            say(
                f"{name} is being worked on by {_identity(held)}; waiting until it ends, or "
                f"until it has shown no sign of life for {ttl} s"
            )
            told = True
        elif not r.eval(_STILL_WAITING, 1, waiter, token, str(ttl)):
            raise LeaseLost(f"{name}: a newer delivery of this step waits for it now; this one ends")
        sleep(POLL_SECONDS)


def _identity(value: str) -> str:
    """The process identity in a lease's value."""
    parts = value.split(" ")
    return parts[1] if len(parts) > 1 else "an unknown execution"
