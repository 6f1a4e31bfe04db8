"""State shared by every worker, kept in Celery's Redis (never the Redis that is backed up):
the run lock, the run record (per-component state and progress), and one-time claims.

The run lock is refreshed by every sign of life of the run (task start, progress), so it can have
a short time to live: a lock left by a dead worker expires BACKUP_LOCK_TTL seconds after the last
progress report, while a long healthy run keeps it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

import redis

if TYPE_CHECKING:
    from vq_tasks.settings import Settings


LOCK_KEY = "vq:backup:lock"
RUN_KEY = "vq:run:{}"
CLAIM_KEY = "vq:claim:{}"
TASK_KEY = "vq:task:{}"
RUN_RECORD_TTL = 14 * 86400
logger = logging.getLogger(__name__)

_IF_HOLDER = """
local value = redis.call('get', KEYS[1])
if value and string.sub(value, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
  if ARGV[2] == 'release' then return redis.call('del', KEYS[1]) end
  return redis.call('expire', KEYS[1], tonumber(ARGV[2]))
end
return 0
"""


@lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=30, health_check_interval=30)


def client(settings: Settings) -> redis.Redis:
    """Return this process's client of the coordination Redis (the Celery result backend). It
    decodes every reply to str, which redis-py's types cannot say: the replies are cast to str."""
    return _client(settings.result_backend_url)


def acquire_lock(r: redis.Redis, backup_id: str, task_id: str, ttl: int) -> tuple[str, str | None]:
    """Take the run lock for a new backup ``backup_id``. Return (id, None) when this task holds
    the lock, with the id of the run it holds it for (a redelivered task gets its first id back),
    or (holder id, description) when another run holds it."""
    value = f"{backup_id} {task_id} {datetime.now(UTC).isoformat(timespec='seconds')}"
    for _ in range(2):  # a lock that expires between SET and GET is taken on the second try
        if r.set(LOCK_KEY, value, nx=True, ex=ttl):
            return backup_id, None
        holder = cast("str | None", r.get(LOCK_KEY))
        if holder is not None:
            break
    else:
        return "", "another backup is taking the lock"
    held_id, held_task, since = ([*holder.split(" "), "", ""])[:3]
    if held_task == task_id:
        return held_id, None
    return (
        held_id,
        f"{held_id} (started {since}; its lock expires {r.ttl(LOCK_KEY)} s after its last progress)",
    )


def release_lock(r: redis.Redis, backup_id: str) -> bool:
    """Release the lock if ``backup_id`` holds it (never someone else's)."""
    return release_if_holder(r, LOCK_KEY, backup_id)


def record(r: redis.Redis, backup_id: str, **fields: Any) -> None:
    """Set fields of the run record (values stored as JSON)."""
    key = RUN_KEY.format(backup_id)
    r.hset(key, mapping={name: json.dumps(value) for name, value in fields.items()})
    r.expire(key, RUN_RECORD_TTL)


def read_record(r: redis.Redis, backup_id: str) -> dict[str, Any]:
    """Return the run record of ``backup_id`` (empty if unknown or expired)."""
    fields = cast(dict[str, str], r.hgetall(RUN_KEY.format(backup_id)))
    return {name: json.loads(value) for name, value in fields.items()}


def failed_runs(r: redis.Redis, backup_ids: list[str]) -> set[str]:
    """Return those of ``backup_ids`` whose run record says the run failed."""
    pipe = r.pipeline(transaction=False)
    for backup_id in backup_ids:
        pipe.hget(RUN_KEY.format(backup_id), "status")
    statuses = pipe.execute()
    return {
        b for b, status in zip(backup_ids, statuses, strict=True) if status and json.loads(status) == "failed"
    }


def claim_once(r: redis.Redis, name: str, ttl: int = 30 * 86400) -> bool:
    """Claim a side effect called ``name``; True only for the first caller (compare-and-set)."""
    return bool(r.set(CLAIM_KEY.format(name), datetime.now(UTC).isoformat(), nx=True, ex=ttl))


def claim_for(r: redis.Redis, name: str, holder: str, ttl: int = 7 * 86400) -> str | None:
    """Claim ``name`` for ``holder`` (a task id). Return None when ``holder`` has it (now or from
    before: a redelivered task), else the holder that took it first."""
    key = CLAIM_KEY.format(name)
    if r.set(key, holder, nx=True, ex=ttl):
        return None
    first = cast("str | None", r.get(key))
    return None if first in (holder, None) else first


def release_claim(r: redis.Redis, name: str) -> None:
    """Give a claim back, when its side effect failed and may be tried again."""
    r.delete(CLAIM_KEY.format(name))


RESULT_KEY = "vq:result:{}"


def record_result(r: redis.Redis, task_id: str, result: dict[str, Any], ttl: int = RUN_RECORD_TTL) -> None:
    """Keep the result of task ``task_id``, which a later delivery of the same task returns."""
    r.set(RESULT_KEY.format(task_id), json.dumps(result), ex=ttl)


def result_of(r: redis.Redis, task_id: str) -> dict[str, Any] | None:
    """Return the result kept for task ``task_id`` (None: it has not finished)."""
    kept = cast("str | None", r.get(RESULT_KEY.format(task_id)))
    return None if kept is None else json.loads(kept)


OFFSITE_COPY_KEY = "vq:offsite-copy:{}"


@contextlib.contextmanager
def offsite_copy_running(r: redis.Redis, task_id: str, ttl: int) -> Iterator[None]:
    """Mark an off-site copy as running while the block runs (kept alive by a heartbeat, gone
    ``ttl`` seconds after its worker dies), so that the off-site prune leaves its files alone."""
    key = OFFSITE_COPY_KEY.format(task_id)
    r.set(key, f"{task_id} copying", ex=ttl)  # the heartbeat renews a value that starts "<holder> "
    try:
        with heartbeat(r, task_id, ttl, key=key):
            yield
    finally:
        r.delete(key)


def offsite_copies_running(r: redis.Redis) -> bool:
    """Return whether an off-site copy is running now."""
    return next(r.scan_iter(OFFSITE_COPY_KEY.format("*"), count=100), None) is not None


def backup_of_task(r: redis.Redis, task_id: str, backup_id: str, ttl: int) -> tuple[str, bool]:
    """Bind a backup task's id to ``backup_id`` once; return the id it is bound to and whether it
    was bound before (a redelivered task gets its first backup id back, however late it comes)."""
    key = TASK_KEY.format(task_id)
    if r.set(key, backup_id, nx=True, ex=ttl):
        return backup_id, False
    return cast("str | None", r.get(key)) or backup_id, True


def renew_if_holder(r: redis.Redis, key: str, holder: str, ttl: int) -> bool:
    """Give the lock ``key`` ``ttl`` more seconds if ``holder`` holds it; return whether it does."""
    return bool(r.eval(_IF_HOLDER, 1, key, holder, str(ttl)))


def release_if_holder(r: redis.Redis, key: str, holder: str) -> bool:
    """Delete the lock ``key`` if ``holder`` holds it (its value starts with "``holder`` ")."""
    return bool(r.eval(_IF_HOLDER, 1, key, holder, "release"))


@contextlib.contextmanager
def heartbeat(
    r: redis.Redis, holder: str, ttl: int, key: str = LOCK_KEY, every: float | None = None
) -> Iterator[None]:
    """Keep the lock ``key`` of ``holder`` alive while the block runs, from a background thread
    (every ``every`` seconds, default a third of ``ttl``), so that a silent step (pg_dump waiting
    for a table lock, a long fsync) does not lose it. A failed refresh is logged, not raised: it
    must not fail the work it watches."""
    stop = threading.Event()

    def refresh() -> None:
        try:
            renew_if_holder(r, key, holder, ttl)
        except redis.RedisError as exc:
            logger.warning("could not refresh the lock %s of %s: %s", key, holder, exc)

    def beat() -> None:
        while not stop.wait(every or max(1.0, ttl / 3)):
            refresh()

    refresh()
    thread = threading.Thread(target=beat, name=f"heartbeat-{holder}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


RESTORE_LOCK_KEY = "vq:restore:lock"


def acquire_restore_lock(r: redis.Redis, holder: str, backup_id: str, ttl: int) -> str | None:
    """Take the restore lock for ``holder`` (a token without spaces, unique per restore). Return
    None when taken, else a description of the restore that holds it."""
    value = f"{holder} {backup_id} {datetime.now(UTC).isoformat(timespec='seconds')}"
    if r.set(RESTORE_LOCK_KEY, value, nx=True, ex=ttl):
        return None
    held = cast("str | None", r.get(RESTORE_LOCK_KEY))
    _, held_id, since = ([*(held or "").split(" "), "", "", ""])[:3]
    return f"a restore of {held_id or 'a backup'} (started {since or 'just now'})"


def release_restore_lock(r: redis.Redis, holder: str) -> bool:
    """Release the restore lock if ``holder`` holds it (never another restore's)."""
    return release_if_holder(r, RESTORE_LOCK_KEY, holder)


DRILL_KEY = RUN_KEY.format("drill")  # read_record(r, "drill") reads it too


def record_drill(r: redis.Redis, **fields: Any) -> None:
    """Set fields of the restore drill's record (values stored as JSON). It does not expire: a
    monthly drill's outcome must outlive RUN_RECORD_TTL."""
    r.hset(DRILL_KEY, mapping={name: json.dumps(value) for name, value in fields.items()})


def read_drill(r: redis.Redis) -> dict[str, Any]:
    """Return the restore drill's record: the last drill's outcome (empty if none ran)."""
    fields = cast(dict[str, str], r.hgetall(DRILL_KEY))
    return {name: json.loads(value) for name, value in fields.items()}


COUNTERS_KEY = "vq:metrics:counters"
PRUNE_KEY = RUN_KEY.format("prune:{}")  # one record per destination role


def count_once(r: redis.Redis, claim: str, counters: dict[str, int]) -> bool:
    """Add ``counters`` to the lifetime counters (they never expire), once per ``claim``: a
    redelivered task that reaches the same end does not count twice. Return whether it counted."""
    if not claim_once(r, f"counted:{claim}"):
        return False
    pipe = r.pipeline(transaction=False)
    for name, amount in counters.items():
        pipe.hincrby(COUNTERS_KEY, name, amount)
    pipe.execute()
    return True


def read_counters(r: redis.Redis) -> dict[str, int]:
    """Return the lifetime counters: ``runs:<status>`` and ``failures:<component>:<reason>``."""
    counters = cast(dict[str, str], r.hgetall(COUNTERS_KEY))
    return {name: int(value) for name, value in counters.items()}


def record_prune(r: redis.Redis, role: str, **fields: Any) -> None:
    """Set fields of the last prune's record of destination ``role`` (it does not expire)."""
    r.hset(PRUNE_KEY.format(role), mapping={name: json.dumps(value) for name, value in fields.items()})


def read_prune(r: redis.Redis, role: str) -> dict[str, Any]:
    """Return the last prune's record of destination ``role`` (empty if none ran)."""
    fields = cast(dict[str, str], r.hgetall(PRUNE_KEY.format(role)))
    return {name: json.loads(value) for name, value in fields.items()}


INCIDENT_KEY = "vq:incident:{}"
# An incident's record: its fingerprint ("" when healthy), the time of the newest observation, the
# notice the current state owes (opened / changed / resolved), whether it was sent, whether the
# open incident was told to anyone, the observation that set the state (to send it again), and a
# lease (until, holder) that lets one sender at a time send it; times are the Redis server's.
_INCIDENT_OBSERVE = """
local key, fp, at, lease, holder = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local t = redis.call('time')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local r = redis.call('hmget', key, 'fingerprint', 'at', 'sent', 'told', 'lease', 'holder')
local known, known_at, sent, told = r[1] or '', tonumber(r[2] or '-1'), r[3] or '1', r[4] or '0'
local in_flight = sent == '0' and tonumber(r[5] or '0') > now and (r[6] or '') ~= holder
if at < known_at - 0.001 then return 'stale' end
if fp ~= known then
  local notice = 'opened'
  if fp == '' then notice = 'resolved' elseif told == '1' then notice = 'changed' end
  local owed = '0'
  if notice == 'resolved' and told ~= '1' and not in_flight then owed = '1' end
  redis.call('hset', key, 'fingerprint', fp, 'at', ARGV[2], 'notice', notice, 'sent', owed, 'event', ARGV[5])
  if not in_flight then redis.call('hset', key, 'lease', '0', 'holder', '') end
elseif at > known_at then
  redis.call('hset', key, 'at', ARGV[2])
end
local c = redis.call('hmget', key, 'sent', 'lease', 'holder', 'notice')
if c[1] ~= '0' then return 'none' end
if tonumber(c[2] or '0') > now and (c[3] or '') ~= holder then return 'busy' end
redis.call('hset', key, 'lease', tostring(now + lease), 'holder', holder)
return c[4]
"""
# What a sender reports: the notice for ``fp`` went out (or did not). If the state moved on while
# it was being sent, what the new state owes is adjusted to what was told.
_INCIDENT_SENT = """
local key, fp, outcome, holder = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local r = redis.call('hmget', key, 'fingerprint', 'notice', 'holder', 'told')
if (r[3] or '') ~= holder then return 0 end
redis.call('hset', key, 'lease', '0', 'holder', '')
if r[1] == fp then
  if outcome == 'sent' then
    local told = '1'
    if r[2] == 'resolved' then told = '0' end
    redis.call('hset', key, 'sent', '1', 'told', told)
  end
  return 1
end
if outcome == 'sent' then
  if fp == '' then
    redis.call('hset', key, 'told', '0')
    if r[2] == 'changed' then redis.call('hset', key, 'notice', 'opened') end
  else
    redis.call('hset', key, 'told', '1')
    if r[2] == 'opened' then redis.call('hset', key, 'notice', 'changed') end
  end
elseif r[2] == 'resolved' and r[4] ~= '1' then
  redis.call('hset', key, 'sent', '1')
end
return 1
"""


def observe_incident(
    r: redis.Redis, condition: str, fingerprint: str, observed_at: float, holder: str, event: str = "",
    lease: float = 300,
) -> str:  # fmt: skip
    """Record an observation of ``condition`` (``fingerprint`` "" when healthy) made at
    ``observed_at`` (epoch seconds) by ``holder`` (a task id: a redelivered task is the same
    holder), with ``event`` (JSON) to send again later if need be. Return the notice ``holder``
    must send now ("opened", "changed", "resolved"; the lease is then its for ``lease`` seconds),
    "none" (nothing new, or sent already), "busy" (another sender holds the lease: try later) or
    "stale" (older than the observation recorded). A resolution is owed only for an incident
    whose opening was sent."""
    key = INCIDENT_KEY.format(condition)
    args = (fingerprint, repr(observed_at), str(lease), holder, event)
    return r.eval(_INCIDENT_OBSERVE, 1, key, *args)


def incident_sent(r: redis.Redis, condition: str, fingerprint: str, holder: str, sent: bool = True) -> None:
    """Report that ``holder`` sent the notice owed for ``fingerprint`` (or, ``sent`` false, could
    not: it stays owed) and give its lease back."""
    outcome = "sent" if sent else "failed"
    r.eval(_INCIDENT_SENT, 1, INCIDENT_KEY.format(condition), fingerprint, outcome, holder)


def open_incident(r: redis.Redis, condition: str) -> str | None:
    """Return the observation (JSON) of the incident of ``condition`` that is open, or None."""
    fingerprint, event = cast(
        "list[str | None]", r.hmget(INCIDENT_KEY.format(condition), "fingerprint", "event")
    )
    return event if fingerprint else None


def owed_incidents(r: redis.Redis) -> list[tuple[str, float]]:
    """Return (observation JSON, time) of every incident whose notice is owed, not yet sent."""
    owed = []
    for key in r.scan_iter(INCIDENT_KEY.format("*"), count=100):
        sent, event, at = cast("list[str | None]", r.hmget(key, "sent", "event", "at"))
        if sent == "0" and event:
            owed.append((event, float(cast(str, at))))  # _INCIDENT_OBSERVE sets "at" with "event"
    return owed
