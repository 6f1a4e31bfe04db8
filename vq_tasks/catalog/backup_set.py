"""One backup as storage holds it: its stored files by role, and whether its manifest is there and
trusted. Also how far ahead of now a backup id may be dated before it is taken for forged."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

ROLE_ORDER = {"manifest": 0, "signature": 1, "acceptance": 2, "bundle": 3, "logs": 4, "partial": 5}
CLOCK_SKEW = timedelta(days=1)  # a backup id later than now by more is forged or from a wrong clock


@dataclass
class BackupSet:
    """The stored objects of one backup id: ``roles`` maps a role (``manifest``, ``signature``,
    ``acceptance``, ``bundle``, ``logs``, ``partial``) to object names; ``kind`` is the manifest's
    (None when the backup is incomplete or its manifest could not be read)."""

    backup_id: str
    started: datetime
    roles: dict[str, list[str]] = field(default_factory=dict)
    kind: str | None = None
    trusted: bool = True  # False: its manifest's signature fails BACKUP_SIGNING_PUBLIC_KEYS

    @property
    def complete(self) -> bool:
        return bool(self.roles.get("manifest"))
