"""Backup ids, object names, the records dump tasks return, and the manifest: the commit record.

A backup exists only once its manifest exists. The manifest is a versioned pydantic model; it
holds sizes and checksums of every stored file and every component, and the facts a restore check
needs. It never holds a secret.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

from vq_tasks.streams import Checksums

MANIFEST_VERSION = 1
ID_TIME_FORMAT = "%Y%m%d_%H%M%S"
COMPONENTS = ("database", "redis", "config", "logs")
BUNDLED = ("database", "redis", "config")
Component = Literal["database", "redis", "config", "logs"]
Kind = Literal["daily", "weekly", "monthly", "manual"]
# every name a backup stores, by suffix and role; longest suffixes first so that they match first
SUFFIX_ROLES = {
    "_manifest.json": "manifest",
    "_logs.tar.gz": "logs",
    "_logs.tar": "logs",
    ".tar.gz": "bundle",
    ".tar": "bundle",
}


class DatabaseFacts(BaseModel):
    database: str
    server_version: str
    pg_dump_version: str
    tables: dict[str, int] = Field(description="rows per table, counted in the dump itself")
    complete: bool = Field(description="pg_dump's closing line was seen")


class RedisFacts(BaseModel):
    redis_version: str
    rdb_version: int
    keys: dict[str, int] = Field(description="keys per logical database, from INFO before the sync")
    expires: dict[str, int] = Field(default_factory=dict)
    crc64_checked: bool


class FilesFacts(BaseModel):
    roots: list[str]
    files: list[str]
    skipped: list[str] = Field(default_factory=list, description="entries that could not be read")


Facts = DatabaseFacts | RedisFacts | FilesFacts


class StagedPart(BaseModel):
    """What a dump task hands to finalize_backup: where its part is and what it contains."""

    component: Component
    member: str = Field(description="file name inside the bundle, or the stored logs archive")
    path: str
    worker: str
    compressed: bool = Field(description="gzip members (COMPRESSION_ENABLED of the worker that dumped)")
    staged_size: int
    staged_sha256: str
    content: Checksums = Field(description="the uncompressed member")
    facts: Facts
    duration_seconds: float = Field(0.0, description="time taken to dump and stage it")


class StoredFile(BaseModel):
    name: str
    md5: str
    sha256: str
    size: int


class ComponentEntry(BaseModel):
    member: str
    stored_in: str
    content: Checksums
    facts: Facts
    stored_size: int | None = Field(None, description="bytes it takes in storage (compressed)")
    duration_seconds: float | None = Field(None, description="time its dump task took")


class ManifestSignature(BaseModel):
    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str = Field(description="the first 16 hex digits of the SHA-256 of the public key")
    value: str = Field(description="base64 of the signature")


class Manifest(BaseModel):
    format_version: int = MANIFEST_VERSION
    backup_id: str
    status: Literal["complete"] = "complete"
    kind: Kind
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    tool_version: str
    compression: Literal["gzip", "none"]
    files: list[StoredFile]
    components: dict[str, ComponentEntry]
    signature: ManifestSignature | None = Field(
        None, description="Ed25519 signature of the rest of the manifest (vq_tasks.signing)"
    )


def new_backup_id(prefix: str, now: datetime) -> str:
    """Return the id of a backup started at ``now``: ``<prefix>_YYYYMMDD_HHMMSS`` in UTC."""
    return f"{prefix}_{now.astimezone(UTC).strftime(ID_TIME_FORMAT)}"


def parse_backup_id(backup_id: str, prefix: str) -> datetime:
    """Return the UTC start time a backup id names. Raise ValueError for anything else."""
    match = re.fullmatch(re.escape(prefix) + r"_(\d{8}_\d{6})", backup_id)
    if not match:
        raise ValueError(f"{backup_id!r} is not a backup id of the form {prefix}_YYYYMMDD_HHMMSS")
    return datetime.strptime(match.group(1), ID_TIME_FORMAT).replace(tzinfo=UTC)


def split_object_name(name: str, prefix: str) -> tuple[str, str] | None:
    """Return (backup id, role) of a stored object's name, the role being ``manifest``,
    ``bundle`` or ``logs``; None for a name that is not ours."""
    for suffix, role in SUFFIX_ROLES.items():
        if name.endswith(suffix):
            backup_id = name[: -len(suffix)]
            try:
                parse_backup_id(backup_id, prefix)
            except ValueError:
                return None
            return backup_id, role
    return None


def data_names(backup_id: str) -> list[str]:
    """Return every name a backup's data files may have (not the manifest), in either compression."""
    return [f"{backup_id}{suffix}" for suffix, role in SUFFIX_ROLES.items() if role != "manifest"]


def bundle_name(backup_id: str, compressed: bool) -> str:
    return f"{backup_id}.tar.gz" if compressed else f"{backup_id}.tar"


def logs_name(backup_id: str, compressed: bool) -> str:
    return f"{backup_id}_logs.tar.gz" if compressed else f"{backup_id}_logs.tar"


def manifest_name(backup_id: str) -> str:
    return f"{backup_id}_manifest.json"


def member_name(component: Component, backup_id: str, compressed: bool) -> str:
    """Return the name a component has inside the bundle (or, for logs, in storage)."""
    if component == "database":
        return "database.sql"
    if component == "redis":
        return "redis.rdb"
    if component == "config":
        return "config.tar.gz" if compressed else "config.tar"
    return logs_name(backup_id, compressed)


def kind_for(started: datetime, scheduled: bool, earlier: list[datetime]) -> Kind:
    """Given a backup's start, whether beat started it, and the starts of earlier complete
    scheduled backups, return its kind: the first of a month is monthly, the first of an ISO
    week weekly, other scheduled ones daily, and the rest manual."""
    if not scheduled:
        return "manual"
    if not any((e.year, e.month) == (started.year, started.month) for e in earlier):
        return "monthly"
    if not any(e.isocalendar()[:2] == started.isocalendar()[:2] for e in earlier):
        return "weekly"
    return "daily"
