"""The retention decision, a pure function: stored backups + now + policy -> what to delete, why.

Ages come from the backup ids (UTC start times), never from file times, so the decision does not
depend on the provider or on the order of the listing. Nothing is deleted that is not ours.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

IN_PROGRESS_GRACE = timedelta(days=1)


@dataclass(frozen=True)
class Policy:
    retention_days: int
    logs_retention_days: int
    in_progress_grace: timedelta = IN_PROGRESS_GRACE


@dataclass
class BackupSet:
    """The stored objects of one backup id: ``roles`` maps a role (``manifest``, ``bundle``,
    ``logs``, ``partial``) to object names."""

    backup_id: str
    started: datetime
    roles: dict[str, list[str]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.roles.get("manifest"))


@dataclass(frozen=True, order=True)
class Deletion:
    backup_id: str
    order: int  # the manifest goes first, so a half-deleted backup never looks complete
    name: str
    reason: str


ROLE_ORDER = {"manifest": 0, "bundle": 1, "logs": 2, "partial": 3}


def decide(
    backups: Iterable[BackupSet], now: datetime, policy: Policy, ended: frozenset[str] = frozenset()
) -> list[Deletion]:
    """Return what to delete, sorted by backup and with each manifest before its other files.
    Never the newest complete backup, never a backup within its retention, never a backup without
    a manifest that is younger than the policy's grace (it may be in progress) unless its id is in
    ``ended`` (its run is known to have failed)."""
    backups = list(backups)
    complete = [b for b in backups if b.complete]
    newest = max(complete, key=lambda b: b.started).backup_id if complete else None
    deletions: list[Deletion] = []
    for backup in backups:
        if backup.backup_id != newest:
            deletions += _decide_one(backup, now - backup.started, policy, backup.backup_id in ended)
    return sorted(deletions)


def _decide_one(backup: BackupSet, age: timedelta, policy: Policy, ended: bool) -> list[Deletion]:
    if not backup.complete:
        if ended:
            return _delete(backup, ROLE_ORDER, "no manifest: debris of a run that failed")
        if age <= policy.in_progress_grace:
            return []
        return _delete(backup, ROLE_ORDER, "no manifest: debris of a failed or interrupted run")
    if age > timedelta(days=policy.retention_days):
        return _delete(backup, ROLE_ORDER, f"older than BACKUP_RETENTION_DAYS={policy.retention_days}")
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
