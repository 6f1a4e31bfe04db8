"""Prune every destination: the one loop behind the ``vq_tasks.prune`` task and ``vq-backup prune``.

For each configured destination (the primary storage, then the off-site copy) apply the retention
policy (``retention.plan.prune``; the staging area is cleaned with the primary only). The off-site one is
skipped while an off-site copy runs, or when Celery's Redis cannot tell whether one does: a copy's
files have no manifest yet and may be old. A real prune then lists the destination again and
reports as ``expired_left`` the backups it meant to delete whole that are still there; it audits
each backup it touched (one JSON line, operation ``prune``, outcome ``deleted``, with the files
deleted and how long deleting them took) and records its outcome in Celery's Redis
(``coordination.record_prune``). A dry run writes nothing anywhere. Each destination also says
which backups past their retention it keeps, and why (the last good ones while newer ones are
suspicious, ``retention.policy.last_good``).
One destination failing does not spare the other: its error, redacted, goes in its result.
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from typing import Any, BinaryIO

import redis

from vq_tasks import coordination
from vq_tasks.audit import audit
from vq_tasks.errors import redacted_message
from vq_tasks.logs import Say
from vq_tasks.manifest import parse_backup_id
from vq_tasks.retention.plan import Locked, Plan, plan, prune
from vq_tasks.retention.policy import Deletion, Kept
from vq_tasks.settings import Settings
from vq_tasks.storage import ROLES, open_storage
from vq_tasks.storage.base import Storage, StoredObject, Usage
from vq_tasks.streams.stages import Writer

logger = logging.getLogger(__name__)
REDIS_ERRORS = (redis.RedisError, OSError)


@dataclass
class DestinationPrune:
    """What the prune of one destination did (or, in a dry run, would do)."""

    role: str
    description: str
    deletions: list[Deletion] = field(default_factory=list)
    stale_staging: list[str] = field(default_factory=list)
    aborted_uploads: list[str] = field(default_factory=list)
    expired_left: list[str] = field(default_factory=list)
    locked: list[Locked] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None

    @property
    def touched(self) -> list[str]:
        """The ids of the backups with a file deleted (or to delete)."""
        return sorted({d.backup_id for d in self.deletions})

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "description": self.description,
            "deletions": [
                {"backup_id": d.backup_id, "name": d.name, "reason": d.reason} for d in self.deletions
            ],
            "stale_staging": list(self.stale_staging),
            "aborted_uploads": list(self.aborted_uploads),
            "expired_left": list(self.expired_left),
            "not_yet_deletable": [
                {
                    "backup_id": lock.deletion.backup_id,
                    "name": lock.deletion.name,
                    "locked_until": _when(lock.until),
                }
                for lock in self.locked
            ],
            "kept": [{"backup_id": k.backup_id, "reason": k.reason} for k in self.kept],
            "error": self.error,
            "skipped": self.skipped,
        }


@dataclass
class PruneReport:
    dry_run: bool
    destinations: list[DestinationPrune] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No destination failed and none holds a backup past retention after the prune."""
        return not self.failures()

    def failures(self) -> list[str]:
        """Return one line per destination that failed or kept backups past retention."""
        found = []
        for d in self.destinations:
            if d.error:
                found.append(f"{d.role}: {d.error}")
            if d.expired_left:
                found.append(f"{d.role}: still past retention after the prune: {', '.join(d.expired_left)}")
        return found

    def as_dict(self) -> dict[str, Any]:
        """Return the report as JSON-safe data (what the Celery task returns)."""
        return {
            "dry_run": self.dry_run,
            "ok": self.ok,
            "failures": self.failures(),
            "destinations": {d.role: d.as_dict() for d in self.destinations},
        }


@dataclass(frozen=True)
class _Context:
    settings: Settings
    r: redis.Redis
    now: datetime
    dry_run: bool
    origin: str
    task_id: str | None
    say: Say

    def redacted(self, exc: BaseException) -> str:
        return redacted_message(exc, self.settings.secret_values())


def prune_all(
    settings: Settings,
    dry_run: bool = False,
    now: datetime | None = None,
    origin: str = "celery",
    task_id: str | None = None,
    say: Say = print,
) -> PruneReport:
    """Given settings, prune each configured destination at ``now`` (default: now) and return
    what was done, or with ``dry_run`` what would be, and why. ``origin`` and ``task_id`` go in
    the audit lines; ``say`` receives the human-readable lines. Never raise for one destination:
    its error is in the report (``ok`` False)."""
    ctx = _Context(
        settings, coordination.client(settings), now or datetime.now(UTC), dry_run, origin, task_id, say
    )
    report = PruneReport(dry_run)
    for role in ROLES:
        if settings.destination(role) is not None:
            report.destinations.append(_prune_destination(ctx, role))
    return report


def _prune_destination(ctx: _Context, role: str) -> DestinationPrune:
    destination = ctx.settings.destination(role)
    assert destination is not None  # prune() passes only the roles it found configured
    location = destination.location
    outcome = DestinationPrune(role, f"{location.provider}:{location.path}")
    storage = planned = None
    try:
        storage = open_storage(ctx.settings, role)
        outcome.description = storage.describe()
        outcome.skipped = _skip_reason(ctx, role)
        if outcome.skipped is None:
            planned = _prune_storage(ctx, storage, outcome)
    except Exception as exc:  # one destination failing does not spare the other
        outcome.error = ctx.redacted(exc)
    if not ctx.dry_run and outcome.skipped is None:
        if storage is not None:
            _check_left(ctx, storage, outcome, planned)
        _record(ctx, outcome)
    for line in describe(outcome, ctx.dry_run, ctx.settings.backup_name_prefix, ctx.now):
        ctx.say(line)
    return outcome


def _skip_reason(ctx: _Context, role: str) -> str | None:
    """Return why the prune of ``role`` must wait: an off-site copy runs, or nobody can tell."""
    if role != "offsite":
        return None
    try:
        running = coordination.offsite_copies_running(ctx.r)
    except REDIS_ERRORS as exc:
        return f"Celery's Redis cannot tell whether an off-site copy is running ({type(exc).__name__})"
    return "an off-site copy is running" if running else None


def _prune_storage(ctx: _Context, storage: Storage, outcome: DestinationPrune) -> Plan:
    """Prune one storage into ``outcome``, auditing each backup as it goes; return the plan it
    followed (the listing before, with kinds)."""

    timed = _TimedDeletes(storage)

    def deleted(group: list[Deletion]) -> None:
        outcome.deletions.extend(group)
        _audit(ctx, outcome.role, group, time.monotonic() - timed.began[group[0].name])

    result = prune(
        timed,
        ctx.settings,
        ctx.now,
        dry_run=ctx.dry_run,
        clean_staging=outcome.role == "primary",
        failed_runs=lambda ids: _failed_runs(ctx, ids),
        on_deleted=deleted,
    )
    if ctx.dry_run:
        outcome.deletions = list(result.deletions)
    outcome.stale_staging, outcome.aborted_uploads = result.stale_staging, result.aborted_uploads
    outcome.locked, outcome.kept = result.locked, result.kept
    _report_locks_once(ctx, outcome)
    return Plan(result.sets, result.deletions, result.kept, result.suspicious)


def _report_locks_once(ctx: _Context, outcome: DestinationPrune) -> None:
    """Log each file prune may not delete yet once per lock (every prune lists them), never as
    a failure: the store keeps it until the date retention itself promised, or a later one."""
    for lock in outcome.locked:
        name = lock.deletion.name
        left = (lock.until - ctx.now).total_seconds() if lock.until else 0
        try:
            claim = f"prune-locked:{outcome.role}:{name}:{_when(lock.until)}"
            first = coordination.claim_once(ctx.r, claim, ttl=max(86400, int(left) + 86400))
        except REDIS_ERRORS:
            first = True
        (logger.warning if first else logger.debug)(
            "%s: %s is not yet deletable: locked until %s", outcome.description, name, _when(lock.until)
        )


def _when(moment: datetime | None) -> str:
    return "an unknown date" if moment is None else moment.astimezone(UTC).isoformat(timespec="seconds")


def _failed_runs(ctx: _Context, backup_ids: list[str]) -> set[str]:
    try:
        return coordination.failed_runs(ctx.r, backup_ids)
    except REDIS_ERRORS as exc:  # prune still applies the grace; it only cannot shorten it
        logger.warning("no run records (%s): unfinished backups keep their grace", type(exc).__name__)
        return set()


def _check_left(ctx: _Context, storage: Storage, outcome: DestinationPrune, planned: Plan | None) -> None:
    """List ``storage`` again; put in ``outcome`` the complete backups still past retention that
    the prune meant to delete (all of them when the prune failed before it knew)."""
    kinds: Mapping[str, str] | None = None
    suspicious: frozenset[str] = frozenset()
    if planned is not None:
        kinds = {b.backup_id: b.kind for b in planned.sets if b.kind is not None}
        suspicious = planned.suspicious
    try:
        left = plan(storage, ctx.settings, ctx.now, kinds, suspicious=suspicious).expired
    except Exception as exc:
        outcome.error = outcome.error or f"could not list it again after the prune: {ctx.redacted(exc)}"
        return
    meant = set(planned.expired) if planned is not None else set(left)
    waiting = {lock.deletion.backup_id for lock in outcome.locked}  # locked: not a failed prune
    outcome.expired_left = [
        backup_id for backup_id in left if backup_id in meant and backup_id not in waiting
    ]


def _audit(ctx: _Context, role: str, group: list[Deletion], seconds: float) -> None:
    audit(
        ctx.settings,
        "prune",
        "deleted",
        backup_id=group[0].backup_id,
        destination=role,
        files=[d.name for d in group],
        reason="; ".join(dict.fromkeys(d.reason for d in group)),
        origin=ctx.origin,
        task_id=ctx.task_id,
        duration_seconds=round(seconds, 3),
    )


class _TimedDeletes(Storage):
    """A storage that is ``inner`` in everything, and notes when the deletion of each name began
    (``began``, time.monotonic()): a backup's deletion lasts from its first file's to the call of
    ``on_deleted`` that follows its last (a failed attempt included)."""

    def __init__(self, inner: Storage):
        self.inner = inner
        self.began: dict[str, float] = {}

    def delete(self, name: str) -> bool:
        self.began[name] = time.monotonic()
        return self.inner.delete(name)

    def open_write(self, name: str, retain_until: datetime | None = None) -> AbstractContextManager[Writer]:
        return self.inner.open_write(name, retain_until)

    def open_read(self, name: str) -> AbstractContextManager[BinaryIO]:
        return self.inner.open_read(name)

    def stat(self, name: str) -> StoredObject | None:
        return self.inner.stat(name)

    def list(self) -> list[StoredObject]:
        return self.inner.list()

    def describe(self) -> str:
        return self.inner.describe()

    def usage(self) -> Usage:
        return self.inner.usage()

    def abort_stale_uploads(self, started_before: datetime) -> builtins.list[str]:
        return self.inner.abort_stale_uploads(started_before)

    def read_bytes(self, name: str, limit: int = 16 << 20) -> bytes:
        return self.inner.read_bytes(name, limit)


def _record(ctx: _Context, outcome: DestinationPrune) -> None:
    try:
        coordination.record_prune(
            ctx.r,
            outcome.role,
            at=ctx.now.isoformat(timespec="seconds"),
            ok=outcome.error is None and not outcome.expired_left,
            error=outcome.error,
            deleted=len(outcome.touched),
            expired_left=len(outcome.expired_left),
        )
    except REDIS_ERRORS as exc:
        logger.warning("could not record the prune of %s (%s)", outcome.role, type(exc).__name__)


def describe(outcome: DestinationPrune, dry_run: bool, prefix: str, now: datetime) -> list[str]:
    """Given one destination's prune, return the lines an operator reads: each file that goes
    (or would), grouped by backup and reason, with the backup's age; then what else happened."""
    if outcome.skipped:
        return [f"{outcome.description}: skipped, {outcome.skipped}"]
    lines = [f"{outcome.description}:"]
    verb = "would delete" if dry_run else "deleted"
    for (backup_id, reason), group in groupby(outcome.deletions, key=lambda d: (d.backup_id, d.reason)):
        days = (now - parse_backup_id(backup_id, prefix)).total_seconds() / 86400
        lines.append(f"  {verb} {', '.join(d.name for d in group)}: {reason} ({days:.1f} days old)")
    lines += [
        f"  removed the staging folder of {name}: its run did not end" for name in outcome.stale_staging
    ]
    lines += [f"  aborted the unfinished upload of {name}" for name in outcome.aborted_uploads]
    for lock in outcome.locked:
        lines.append(f"  not yet deletable, locked until {_when(lock.until)}: {lock.deletion.name}")
    for keep in outcome.kept:
        days = (now - parse_backup_id(keep.backup_id, prefix)).total_seconds() / 86400
        lines.append(f"  kept {keep.backup_id} ({days:.1f} days old, past its retention): {keep.reason}")
    if outcome.expired_left:
        lines.append(f"  still there, past retention: {', '.join(outcome.expired_left)}")
    if outcome.error:
        lines.append(f"  FAILED: {outcome.error}")
    if not (outcome.deletions or outcome.stale_staging or outcome.aborted_uploads or outcome.error):
        lines.append("  nothing to delete")
    return lines
