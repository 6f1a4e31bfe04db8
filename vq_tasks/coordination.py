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
from typing import Any

import redis

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
    """Return this process's client of the coordination Redis (the Celery result backend)."""
    return _client(settings.result_backend_url)


def acquire_lock(r: redis.Redis, backup_id: str, task_id: str, ttl: int) -> tuple[str, str | None]:
    """Take the run lock for a new backup ``backup_id``. Return (id, None) when this task holds
    the lock, with the id of the run it holds it for (a redelivered task gets its first id back),
    or (holder id, description) when another run holds it."""
    value = f"{backup_id} {task_id} {datetime.now(UTC).isoformat(timespec='seconds')}"
    for _ in range(2):  # a lock that expires between SET and GET is taken on the second try
        if r.set(LOCK_KEY, value, nx=True, ex=ttl):
            return backup_id, None
        holder = r.get(LOCK_KEY)
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
    return bool(r.eval(_IF_HOLDER, 1, LOCK_KEY, backup_id, "release"))


def record(r: redis.Redis, backup_id: str, **fields: Any) -> None:
    """Set fields of the run record (values stored as JSON)."""
    key = RUN_KEY.format(backup_id)
    r.hset(key, mapping={name: json.dumps(value) for name, value in fields.items()})
    r.expire(key, RUN_RECORD_TTL)


def read_record(r: redis.Redis, backup_id: str) -> dict[str, Any]:
    """Return the run record of ``backup_id`` (empty if unknown or expired)."""
    return {name: json.loads(value) for name, value in r.hgetall(RUN_KEY.format(backup_id)).items()}


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


def release_claim(r: redis.Redis, name: str) -> None:
    """Give a claim back, when its side effect failed and may be tried again."""
    r.delete(CLAIM_KEY.format(name))


OFFSITE_COPY_KEY = "vq:offsite-copy:{}"


@contextlib.contextmanager
def offsite_copy_running(r: redis.Redis, task_id: str, ttl: int) -> Iterator[None]:
    """Mark an off-site copy as running while the block runs (kept alive by a heartbeat, gone
    ``ttl`` seconds after its worker dies), so that the off-site prune leaves its files alone."""
    key = OFFSITE_COPY_KEY.format(task_id)
    r.set(key, task_id, ex=ttl)
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
    return r.get(key) or backup_id, True


@contextlib.contextmanager
def heartbeat(r: redis.Redis, holder: str, ttl: int, key: str = LOCK_KEY) -> Iterator[None]:
    """Keep the lock ``key`` of ``holder`` alive while the block runs, from a background thread,
    so that a silent step (pg_dump waiting for a table lock, a long fsync) does not lose it.
    A failed refresh is logged, not raised: it must not fail the work it watches."""
    stop = threading.Event()

    def refresh() -> None:
        try:
            r.eval(_IF_HOLDER, 1, key, holder, str(ttl))
        except redis.RedisError as exc:
            logger.warning("could not refresh the lock %s of %s: %s", key, holder, exc)

    def beat() -> None:
        while not stop.wait(max(1.0, ttl / 3)):
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
    _, held_id, since = ([*(r.get(RESTORE_LOCK_KEY) or "").split(" "), "", "", ""])[:3]
    return f"a restore of {held_id or 'a backup'} (started {since or 'just now'})"


def release_restore_lock(r: redis.Redis, holder: str) -> bool:
    """Release the restore lock if ``holder`` holds it (never another restore's)."""
    return bool(r.eval(_IF_HOLDER, 1, RESTORE_LOCK_KEY, holder, "release"))


DRILL_KEY = RUN_KEY.format("drill")  # read_record(r, "drill") reads it too


def record_drill(r: redis.Redis, **fields: Any) -> None:
    """Set fields of the restore drill's record (values stored as JSON). It does not expire: a
    monthly drill's outcome must outlive RUN_RECORD_TTL."""
    r.hset(DRILL_KEY, mapping={name: json.dumps(value) for name, value in fields.items()})


def read_drill(r: redis.Redis) -> dict[str, Any]:
    """Return the restore drill's record: the last drill's outcome (empty if none ran)."""
    return {name: json.loads(value) for name, value in r.hgetall(DRILL_KEY).items()}


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
    return {name: int(value) for name, value in r.hgetall(COUNTERS_KEY).items()}


def record_prune(r: redis.Redis, role: str, **fields: Any) -> None:
    """Set fields of the last prune's record of destination ``role`` (it does not expire)."""
    r.hset(PRUNE_KEY.format(role), mapping={name: json.dumps(value) for name, value in fields.items()})


def read_prune(r: redis.Redis, role: str) -> dict[str, Any]:
    """Return the last prune's record of destination ``role`` (empty if none ran)."""
    return {name: json.loads(value) for name, value in r.hgetall(PRUNE_KEY.format(role)).items()}


INCIDENT_KEY = "vq:incident:{}"
# An incident's record: its fingerprint ("" when healthy), the time of the observation that set
# it, the notice it owes (opened / changed / resolved), whether that was sent, and a lease that
# lets one process at a time send it. Observations older than the record are ignored, so an
# alert retried late cannot reopen what a newer observation resolved.
_INCIDENT_OBSERVE = """
local key, fp, at, now, lease = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local known = redis.call('hget', key, 'fingerprint') or ''
local known_at = tonumber(redis.call('hget', key, 'at') or '-1')
if at < known_at then return false end
if fp ~= known then
  local notice = 'changed'
  if fp == '' then notice = 'resolved' elseif known == '' then notice = 'opened' end
  local owed = '0'
  if notice == 'resolved' and redis.call('hget', key, 'told') ~= '1' then owed = '1' end
  redis.call('hset', key, 'fingerprint', fp, 'at', ARGV[2], 'notice', notice, 'sent', owed,
             'lease', '0', 'told', redis.call('hget', key, 'told') or '0')
else
  redis.call('hset', key, 'at', ARGV[2])
end
if redis.call('hget', key, 'sent') == '0' and tonumber(redis.call('hget', key, 'lease')) < now then
  redis.call('hset', key, 'lease', tostring(now + lease))
  return redis.call('hget', key, 'notice')
end
return false
"""
_INCIDENT_SENT = """
if redis.call('hget', KEYS[1], 'fingerprint') ~= ARGV[1] then return 0 end
if ARGV[2] == 'sent' then
  local told = '1'
  if redis.call('hget', KEYS[1], 'notice') == 'resolved' then told = '0' end
  redis.call('hset', KEYS[1], 'sent', '1', 'lease', '0', 'told', told)
else
  redis.call('hset', KEYS[1], 'lease', '0')
end
return 1
"""


def observe_incident(
    r: redis.Redis, condition: str, fingerprint: str, observed_at: float, lease: float = 300
) -> str | None:
    """Record an observation of ``condition`` (``fingerprint`` "" when healthy) made at
    ``observed_at`` (epoch seconds). Return the notice this caller must send now ("opened",
    "changed" or "resolved"), or None: nothing new, already sent, being sent by another process
    (for ``lease`` seconds), or an observation older than the one recorded. A resolution is owed
    only for an incident whose opening was sent."""
    now = datetime.now(UTC).timestamp()
    key = INCIDENT_KEY.format(condition)
    notice = r.eval(_INCIDENT_OBSERVE, 1, key, fingerprint, repr(observed_at), repr(now), str(lease))
    return notice or None


def incident_sent(r: redis.Redis, condition: str, fingerprint: str, sent: bool = True) -> None:
    """Note that the notice owed for ``fingerprint`` was sent, or (``sent`` false) free its lease
    so that a retry can send it."""
    r.eval(_INCIDENT_SENT, 1, INCIDENT_KEY.format(condition), fingerprint, "sent" if sent else "failed")


def open_incidents(r: redis.Redis) -> dict[str, dict[str, str]]:
    """Return the record of every condition whose incident is open (fingerprint not empty)."""
    found = {}
    for key in r.scan_iter(INCIDENT_KEY.format("*"), count=100):
        record = r.hgetall(key)
        if record.get("fingerprint"):
            found[key.split(":", 2)[2]] = record
    return found
