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

Ages come from the backup ids (UTC start times), never from file times, and kinds never change
after the fact: so the decision depends neither on the order of the listing nor on how often
prune runs (pruning at t1 then at t2 leaves what pruning once at t2 leaves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

ROLE_ORDER = {"manifest": 0, "bundle": 1, "logs": 2, "partial": 3}


CLOCK_SKEW = timedelta(days=1)  # a backup id later than now by more is forged or from a wrong clock


@dataclass
class BackupSet:
    """The stored objects of one backup id: ``roles`` maps a role (``manifest``, ``bundle``,
    ``logs``, ``partial``) to object names; ``kind`` is the manifest's (None when the backup is
    incomplete or its manifest could not be read)."""

    backup_id: str
    started: datetime
    roles: dict[str, list[str]] = field(default_factory=dict)
    kind: str | None = None
    trusted: bool = True  # False: its manifest's signature fails BACKUP_SIGNING_PUBLIC_KEYS

    @property
    def complete(self) -> bool:
        return bool(self.roles.get("manifest"))
