"""The retention decision, a pure function: stored backups + now + policy -> what to delete, why.

Grandfather-father-son. Every backup has a kind, recorded in its manifest when it was made
(``manifest.kind_for``): the first complete scheduled backup of a month is ``monthly``, the first
of an ISO week ``weekly``, other scheduled ones ``daily``, and the ones an operator asked for
``manual``. A complete backup is kept until the latest of the dates its tiers give it:

- every kind: started + BACKUP_RETENTION_DAYS days;
- ``weekly`` and ``monthly``: started + 7 * BACKUP_WEEKLY_RETENTION_WEEKS days (a monthly backup
  is also the weekly one of its week);
- ``monthly``: started + BACKUP_MONTHLY_RETENTION_MONTHS calendar months, the day clamped to the
  month's length (Jan 31 + 1 month = Feb 28, or 29).

A ``manual`` backup has the daily tier only. A complete backup whose kind is unknown (its manifest
cannot be read) is kept as if monthly, and the reason says so. The newest complete backup is never
deleted, whatever its age. A log archive goes after BACKUP_LOGS_RETENTION_DAYS while the rest of
its backup stays. Files of a backup without a manifest stay for the policy's grace (it may still be
running) unless its run is known to have failed (``ended``), then go; so do the partial uploads of
a complete backup once older than the grace. A backup that goes whole loses its manifest first, so
a half-deleted backup never looks complete.

Suspicious backups (anomalies, catalog.anomalies) must not push the last good ones out: while any
suspicious, unaccepted complete backup is newer than the newest good one, the newest
``keep_good`` (BACKUP_ANOMALY_KEEP_GOOD) good complete backups are kept whatever their age
(``kept`` says why); their logs and unfinished uploads still go as usual. Suspicious backups
themselves follow the tiers. A good backup is trusted, of a known kind and not suspicious (or
accepted); which ones are suspicious is the caller's to say (``retention.plan`` reads it).

Ages come from the backup ids (UTC start times), never from file times, and kinds never change
after the fact: so the decision depends neither on the order of the listing nor on how often
prune runs (pruning at t1 then at t2 leaves what pruning once at t2 leaves).
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from vq_tasks.catalog.backup_set import CLOCK_SKEW, ROLE_ORDER, BackupSet

IN_PROGRESS_GRACE = timedelta(days=1)
KINDS = ("daily", "weekly", "monthly", "manual")
SHOWN_SUSPICIOUS = 3  # a reason names at most this many suspicious backups


@dataclass(frozen=True)
class Policy:
    retention_days: int
    logs_retention_days: int
    weekly_weeks: int = 0
    monthly_months: int = 0
    in_progress_grace: timedelta = IN_PROGRESS_GRACE
    keep_good: int = 0  # BACKUP_ANOMALY_KEEP_GOOD; 0: suspicious backups change nothing


@dataclass(frozen=True, order=True)
class Deletion:
    backup_id: str
    order: int  # the manifest goes first, so a half-deleted backup never looks complete
    name: str
    reason: str


def add_months(when: datetime, months: int) -> datetime:
    """Given a time and a number of months, return the same time that many calendar months later,
    the day clamped to the length of the month it lands in."""
    index = when.month - 1 + months
    year, month = when.year + index // 12, index % 12 + 1
    return when.replace(year=year, month=month, day=min(when.day, calendar.monthrange(year, month)[1]))


@dataclass(frozen=True)
class LockDates:
    """Until when BACKUP_IMMUTABILITY locks a backup's objects: the tiers' ``keep_until`` for
    its manifest, signature and bundle, the logs' own retention (never longer) for its logs. The
    same tiers decide what prune deletes, so a lock never outlasts retention's promise."""

    until: datetime
    logs_until: datetime


def lock_dates(started: datetime, kind: str, policy: Policy) -> LockDates:
    """Given a backup's start and kind (as its manifest records them), return its lock dates."""
    backup = max(until for until, _ in _tiers_of(started, kind, policy))
    return LockDates(backup, min(backup, started + timedelta(days=policy.logs_retention_days)))


def _tiers(backup: BackupSet, policy: Policy) -> list[tuple[datetime, str]]:
    """Return (kept until, the setting that says so) for each tier that keeps ``backup``."""
    return _tiers_of(backup.started, backup.kind, policy)


def _tiers_of(started: datetime, kind: str | None, policy: Policy) -> list[tuple[datetime, str]]:
    kind, days = kind if kind in KINDS else None, policy.retention_days
    tiers = [(started + timedelta(days=days), f"BACKUP_RETENTION_DAYS={days}")]
    if kind in ("weekly", "monthly", None):
        weeks = policy.weekly_weeks
        tiers.append((started + timedelta(weeks=weeks), f"BACKUP_WEEKLY_RETENTION_WEEKS={weeks}"))
    if kind in ("monthly", None):
        months = policy.monthly_months
        tiers.append((add_months(started, months), f"BACKUP_MONTHLY_RETENTION_MONTHS={months}"))
    return tiers


def keep_until(backup: BackupSet, policy: Policy) -> datetime:
    """Given a complete backup and the policy, return the time until which its tiers keep it."""
    return max(until for until, _ in _tiers(backup, policy))


def expiry_reason(backup: BackupSet, policy: Policy) -> str:
    """Given a complete backup, return why it goes once past ``keep_until``: its kind and the
    tier that kept it longest (the higher tier when two end together)."""
    tiers = _tiers(backup, policy)
    latest = max(until for until, _ in tiers)
    setting = [setting for until, setting in tiers if until == latest][-1]
    if backup.kind in KINDS:
        return f"{backup.kind} backup older than {setting}"
    return f"backup of unknown kind (manifest unreadable, kept as monthly) older than {setting}"


@dataclass(frozen=True)
class Kept:
    """A complete backup past its retention that is kept anyway, and why."""

    backup_id: str
    reason: str


@dataclass(frozen=True)
class LastGood:
    """While suspicious backups are newer than every good one: the good ones kept whatever their
    age (``ids``), and the suspicious ones that make it so (``because``, oldest first)."""

    ids: frozenset[str] = frozenset()
    because: tuple[str, ...] = ()

    def reason(self, keep_good: int) -> str:
        shown = ", ".join(self.because[:SHOWN_SUSPICIOUS])
        more = len(self.because) - SHOWN_SUSPICIOUS
        shown += f" and {more} more" if more > 0 else ""
        return f"one of the last {keep_good} good backups while newer ones are suspicious ({shown})"


def _believable(backups: list[BackupSet], now: datetime) -> list[BackupSet]:
    """The complete backups that may count as the newest: trusted and not dated after ``now`` +
    CLOCK_SKEW (all complete ones when none is)."""
    complete = [b for b in backups if b.complete]
    return [b for b in complete if b.trusted and b.started <= now + CLOCK_SKEW] or complete


def _newest(backups: list[BackupSet]) -> BackupSet | None:
    return max(backups, key=lambda b: (b.started, b.backup_id), default=None)


def last_good(
    backups: Iterable[BackupSet], now: datetime, policy: Policy, suspicious: frozenset[str]
) -> LastGood:
    """Given the stored backups and the ids of the suspicious, unaccepted ones, return the newest
    ``policy.keep_good`` good complete backups if a suspicious one is newer than all of them,
    with those suspicious ones (nothing when none is, or ``keep_good`` is 0). Only trusted
    backups not dated after ``now`` + CLOCK_SKEW count, suspicious or good."""
    counted = sorted(
        (b for b in backups if b.complete and b.trusted and b.started <= now + CLOCK_SKEW),
        key=lambda b: (b.started, b.backup_id),
    )
    good = [b for b in counted if b.kind in KINDS and b.backup_id not in suspicious]
    if policy.keep_good <= 0 or not good:
        return LastGood()
    newer = [b.backup_id for b in counted[counted.index(good[-1]) + 1 :] if b.backup_id in suspicious]
    if not newer:
        return LastGood()
    return LastGood(frozenset(b.backup_id for b in good[-policy.keep_good :]), tuple(newer))


def decide(
    backups: Iterable[BackupSet],
    now: datetime,
    policy: Policy,
    ended: frozenset[str] = frozenset(),
    suspicious: frozenset[str] = frozenset(),
) -> list[Deletion]:
    """Given the stored backups, the time and the policy, return what to delete, sorted by backup
    and with each manifest before its other files. Never the newest complete backup, never a
    backup within its retention, never a backup without a manifest that is younger than the
    policy's grace (it may be in progress) unless its id is in ``ended`` (its run failed), never
    one of the last good backups while newer ones are in ``suspicious`` (``last_good``). The
    newest is chosen among the trusted backups not dated after ``now`` + CLOCK_SKEW (when there are
    any): a forged or future-dated manifest must not leave the real last backup unprotected."""
    backups = list(backups)
    newest = _newest(_believable(backups, now))
    spared = last_good(backups, now, policy, suspicious).ids
    deletions: list[Deletion] = []
    for backup in backups:
        if newest is None or backup.backup_id != newest.backup_id:
            deletions += _decide_one(
                backup, now, policy, backup.backup_id in ended, backup.backup_id in spared
            )
    return sorted(deletions)


def kept(
    backups: Iterable[BackupSet], now: datetime, policy: Policy, suspicious: frozenset[str]
) -> list[Kept]:
    """Given what ``decide`` is given, return the complete backups past their retention that it
    keeps all the same (the last good ones while newer ones are suspicious), oldest first, and why."""
    backups = list(backups)
    guard = last_good(backups, now, policy, suspicious)
    reason = guard.reason(policy.keep_good)
    spared = [b for b in backups if b.backup_id in guard.ids and now > keep_until(b, policy)]
    return [Kept(b.backup_id, reason) for b in sorted(spared, key=lambda b: (b.started, b.backup_id))]


def _decide_one(
    backup: BackupSet, now: datetime, policy: Policy, ended: bool, spared: bool = False
) -> list[Deletion]:
    age = now - backup.started
    if not backup.complete:
        if ended:
            return _delete(backup, ROLE_ORDER, "no manifest: debris of a run that failed")
        if age <= policy.in_progress_grace:
            return []
        return _delete(backup, ROLE_ORDER, "no manifest: debris of a failed or interrupted run")
    if now > keep_until(backup, policy) and not spared:
        return _delete(backup, ROLE_ORDER, expiry_reason(backup, policy))
    found = []
    if age > timedelta(days=policy.logs_retention_days):
        reason = f"logs older than BACKUP_LOGS_RETENTION_DAYS={policy.logs_retention_days}"
        found += _delete(backup, ("logs",), reason)
    if age > policy.in_progress_grace:
        found += _delete(backup, ("partial",), "unfinished upload")
    return found


def _delete(backup: BackupSet, roles: Iterable[str], reason: str) -> list[Deletion]:
    return [
        Deletion(backup.backup_id, ROLE_ORDER[role], name, reason)
        for role in roles
        for name in sorted(backup.roles.get(role, []))
    ]


def retention_start(now: datetime, policy: Policy) -> datetime:
    """The start of the longest retention window (daily, weekly or monthly): the primary storage
    holds only what the policy keeps, so every backup it holds from then on is worth copying."""
    return min(now - timedelta(days=policy.retention_days), now - timedelta(weeks=policy.weekly_weeks),
               add_months(now, -policy.monthly_months))  # fmt: skip
