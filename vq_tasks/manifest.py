"""Backup ids, object names, the records dump tasks return, and the manifest: the commit record.

A backup exists only once its manifest exists. The manifest is a versioned pydantic model; it
holds sizes and checksums of every stored file and every component, and the facts a restore check
needs. It never holds a secret.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, PrivateAttr, field_validator

MANIFEST_VERSION = 1
ID_TIME_FORMAT = "%Y%m%d_%H%M%S"
COMPONENTS: tuple[Component, ...] = ("database", "redis", "config", "logs")
BUNDLED: tuple[Component, ...] = ("database", "redis", "config")
Component = Literal["database", "redis", "config", "logs"]
Kind = Literal["daily", "weekly", "monthly", "manual"]
# what a manifest may hold (it may be forged): names without a folder, lowercase hex digests
PLAIN_NAME = r"^[^./\\\x00][^/\\\x00]{0,254}$"
MD5_HEX = r"^[0-9a-f]{32}$"
SHA256_HEX = r"^[0-9a-f]{64}$"
BACKUP_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]*_[0-9]{8}_[0-9]{6}$"
Count = Annotated[int, Field(ge=0)]
GLOBALS_MEMBER: Literal["globals.sql"] = "globals.sql"  # the roles, beside database.sql in the bundle
ENCRYPTED_SUFFIX = ".age"  # after the plain name of an encrypted file: <id>.tar.gz.age
Compression = Literal["gzip", "zstd", "none"]
COMPRESSIONS: tuple[Compression, ...] = ("gzip", "zstd", "none")
TAR_SUFFIX = {"gzip": ".tar.gz", "zstd": ".tar.zst", "none": ".tar"}  # an archive's, by compression
SIGNATURE_SUFFIX = "_manifest.json.sig"  # the detached Ed25519 signature of the manifest's bytes
ACCEPTANCE_SUFFIX = "_accepted.json"  # `vq-backup accept`: a suspicious backup marked as intended
# every name a backup stores, by suffix and role; longest suffixes first so that they match first
SUFFIX_ROLES = {
    SIGNATURE_SUFFIX: "signature",
    ACCEPTANCE_SUFFIX: "acceptance",
    "_manifest.json": "manifest",
    **{f"_logs{TAR_SUFFIX[c]}{age}": "logs" for c in COMPRESSIONS for age in (ENCRYPTED_SUFFIX, "")},
    **{f"{TAR_SUFFIX[c]}{age}": "bundle" for c in COMPRESSIONS for age in (ENCRYPTED_SUFFIX, "")},
}


class Checksums(BaseModel):
    """Size and digests of a byte stream."""

    size: int
    md5: str
    sha256: str


def checked_digests(content: Checksums) -> Checksums:
    """Return ``content`` if its size is not negative and its digests are lowercase hex of their
    length. Raise ValueError otherwise."""
    if content.size < 0:
        raise ValueError(f"size {content.size} is negative")
    for name, pattern, digits in (("md5", MD5_HEX, 32), ("sha256", SHA256_HEX, 64)):
        if not re.fullmatch(pattern, getattr(content, name)):
            raise ValueError(f"{name} {getattr(content, name)[:80]!r} is not {digits} lowercase hex digits")
    return content


class GlobalsFacts(BaseModel):
    """globals.sql, beside database.sql in the bundle: the server's roles (pg_dumpall --roles-only),
    which a dump of one database does not hold and a restore onto a new server needs."""

    member: Literal["globals.sql"] = GLOBALS_MEMBER
    content: Checksums
    roles: list[str] = Field(description="the roles it defines (CREATE ROLE)")
    passwords: bool = Field(
        description="whether it holds the roles' password hashes: false where pg_authid cannot be read "
        "(a user that is not a superuser, as on managed services: --no-role-passwords)"
    )

    @field_validator("content")
    @classmethod
    def _digests(cls, content: Checksums) -> Checksums:
        return checked_digests(content)


class DatabaseFacts(BaseModel):
    database: str
    server_version: str
    pg_dump_version: str
    tables: dict[str, Count] = Field(description="rows per table, counted in the dump itself")
    complete: bool = Field(description="pg_dump's closing line was seen")
    globals: GlobalsFacts | None = Field(
        default=None, description="the roles, in a member of their own (older backups have none)"
    )
    skipped: list[str] = Field(
        default_factory=list,
        description="what pg_dump said it left out (its warnings), such as subscriptions for a user "
        "that is not a superuser",
    )


class RedisFacts(BaseModel):
    redis_version: str
    rdb_version: int = Field(ge=0)
    keys: dict[str, Count] = Field(
        description="keys per logical database: from INFO before the sync; dump: the keys written"
    )
    expires: dict[str, Count] = Field(default_factory=dict)
    crc64_checked: bool
    method: Literal["sync", "dump"] = Field(
        default="sync",
        description="sync: the server's own RDB over the replication protocol, one point in time; dump: a "
        "logical snapshot (SCAN, DUMP, each key's expiry) written as an RDB, where the server refuses SYNC",
    )
    snapshot_seconds: float | None = Field(
        default=None,
        description="dump only: how long the snapshot took; a key written meanwhile may be in it "
        "before or after its change (it is not one point in time)",
    )
    keys_vanished: Count = Field(default=0, description="dump only: keys deleted between SCAN and DUMP")
    keys_repeated: Count = Field(default=0, description="dump only: keys SCAN returned again, written once")
    functions: bool | None = Field(
        default=None, description="dump only: whether the function libraries are in it (FUNCTION DUMP)"
    )


class FilesFacts(BaseModel):
    roots: list[str]
    files: list[str]
    skipped: list[str] = Field(default_factory=list, description="entries that could not be read")


Facts = DatabaseFacts | RedisFacts | FilesFacts


class StagedMember(BaseModel):
    """A file a dump task staged for the bundle: where it is, what it holds."""

    member: str = Field(
        pattern=PLAIN_NAME, description="file name inside the bundle, or the stored logs archive"
    )
    path: str
    staged_size: int = Field(ge=0)
    staged_sha256: str = Field(pattern=SHA256_HEX)
    content: Checksums = Field(description="the uncompressed member")

    @field_validator("content")
    @classmethod
    def _digests(cls, content: Checksums) -> Checksums:
        return checked_digests(content)

    def describe(self) -> str:
        return f"staged {self.member}"


class StagedPart(StagedMember):
    """What a dump task hands to finalize_backup: where its part is and what it contains."""

    component: Component
    worker: str
    compression: Compression = Field(
        description="gzip members, zstd frames or none (COMPRESSION_ENABLED and _ALGORITHM of the worker)"
    )
    facts: Facts
    duration_seconds: float = Field(0.0, description="time taken to dump and stage it")
    extras: list[StagedMember] = Field(
        default_factory=list, description="more members of the component, after it (globals.sql)"
    )

    def describe(self) -> str:
        return f"{self.component} part staged by worker {self.worker}"


class StoredFile(BaseModel):
    name: str = Field(pattern=PLAIN_NAME)
    md5: str = Field(pattern=MD5_HEX)
    sha256: str = Field(pattern=SHA256_HEX)
    size: int = Field(ge=0)


class ComponentEntry(BaseModel):
    member: str = Field(pattern=PLAIN_NAME)
    stored_in: str = Field(pattern=PLAIN_NAME)
    content: Checksums
    facts: Facts
    stored_size: int | None = Field(default=None, ge=0, description="bytes it takes in storage (compressed)")
    duration_seconds: float | None = Field(default=None, description="time its dump task took")

    @field_validator("content")
    @classmethod
    def _digests(cls, content: Checksums) -> Checksums:
        return checked_digests(content)


class ManifestSignature(BaseModel):
    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str = Field(description="the first 16 hex digits of the SHA-256 of the public key")
    value: str = Field(description="base64 of the signature")


class EncryptionInfo(BaseModel):
    """How the stored files are encrypted: never a key, only what tells which key opens them."""

    format: Literal["age"] = "age"
    recipients: list[Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]] = Field(
        min_length=1,
        description="each recipient's fingerprint: the first 16 hex digits of the SHA-256 of its age1...",
    )


class LockInfo(BaseModel):
    """The retention locks a backup's objects were written with (BACKUP_IMMUTABILITY): what
    verify holds the store to, signed with the rest of the manifest."""

    mode: Literal["governance", "compliance"]
    until: datetime = Field(description="the lock of the manifest, its signature and the bundle")
    logs_until: datetime = Field(description="the lock of the logs archive")


AnomalyKind = Literal[
    "table_gone", "table_rows", "total_rows", "redis_keys", "total_keys", "component_size", "config_gone"
]


class Anomaly(BaseModel):
    """A drop from the backups before (never growth): what, from what to what, said plainly."""

    kind: AnomalyKind
    subject: str = Field(description="the table, Redis database (db0), component or config file")
    before: int | None = Field(description="the window's value (its median; for a gone one, the last)")
    after: int | None = Field(description="this backup's value; None: gone")
    text: str = Field(description='e.g. "table public.queue_entries: 1,204,331 → 12 rows"')


class Manifest(BaseModel):
    format_version: int = MANIFEST_VERSION
    backup_id: str = Field(pattern=BACKUP_ID)
    status: Literal["complete"] = "complete"
    kind: Kind
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    tool_version: str
    compression: Compression
    files: list[StoredFile]
    components: dict[Component, ComponentEntry]
    encryption: EncryptionInfo | None = Field(
        default=None, description="the bundle and logs archive are age files (<name>.age) to these recipients"
    )
    locks: LockInfo | None = Field(default=None, description="written locked (BACKUP_IMMUTABILITY)")
    anomalies: list[Anomaly] = Field(
        default_factory=list,
        description="drops beyond BACKUP_ANOMALY_* from the good backups before it: any makes it suspicious",
    )
    compared_with: list[Annotated[str, Field(pattern=BACKUP_ID)]] = Field(
        default_factory=list, description="the backups its facts were compared with (BACKUP_ANOMALY_WINDOW)"
    )
    signature: ManifestSignature | None = Field(
        default=None,
        description="the embedded Ed25519 signature of releases before the detached one "
        "(<backup_id>_manifest.json.sig, vq_tasks.crypto.signing); new manifests carry none",
    )
    _stored: bytes | None = PrivateAttr(default=None)
    _detached_signature: str | None = PrivateAttr(default=None)

    def as_stored(self, data: bytes, detached_signature: str | None) -> Manifest:
        """Note the exact bytes this manifest was read from (or written as) and the text of its
        detached signature (None: it has none), which is what a signature check looks at."""
        self._stored = data
        self._detached_signature = detached_signature
        return self

    @property
    def stored_bytes(self) -> bytes | None:
        return self._stored

    def __eq__(self, other: object) -> bool:
        """Manifests are equal when their content is, wherever they were read from."""
        if not isinstance(other, Manifest):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    @property
    def detached_signature(self) -> str | None:
        return self._detached_signature


def new_backup_id(prefix: str, now: datetime) -> str:
    """Return the id of a backup started at ``now``: ``<prefix>_YYYYMMDD_HHMMSS`` in UTC."""
    return f"{prefix}_{now.astimezone(UTC).strftime(ID_TIME_FORMAT)}"


def parse_backup_id(backup_id: str, prefix: str) -> datetime:
    """Return the UTC start time a backup id names. Raise ValueError for anything else."""
    match = re.fullmatch(re.escape(prefix) + r"_([0-9]{8}_[0-9]{6})", backup_id)  # ASCII digits only
    if not match:
        raise ValueError(f"{backup_id!r} is not a backup id of the form {prefix}_YYYYMMDD_HHMMSS")
    return datetime.strptime(match.group(1), ID_TIME_FORMAT).replace(tzinfo=UTC)


def split_object_name(name: str, prefix: str) -> tuple[str, str] | None:
    """Return (backup id, role) of a stored object's name, the role being ``manifest``,
    ``signature``, ``bundle`` or ``logs``; None for a name that is not ours."""
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
    """Return every name a backup's other files may have (not the manifest): its data files, in
    either compression, encrypted or not, and the manifest's detached signature."""
    return [f"{backup_id}{suffix}" for suffix, role in SUFFIX_ROLES.items() if role != "manifest"]


def stored_name(name: str, encrypted: bool) -> str:
    """Return the name a file is stored under: its own, with ``.age`` after it when encrypted."""
    return name + ENCRYPTED_SUFFIX if encrypted else name


def is_encrypted(name: str) -> bool:
    """Return whether a stored file's name says it is encrypted (``.age``)."""
    return name.endswith(ENCRYPTED_SUFFIX)


def plain_name(name: str) -> str:
    """Return a stored file's name without ``.age``: the name of what it holds once decrypted."""
    return name.removesuffix(ENCRYPTED_SUFFIX)


def bundle_name(backup_id: str, compression: Compression, encrypted: bool = False) -> str:
    return stored_name(f"{backup_id}{TAR_SUFFIX[compression]}", encrypted)


def logs_name(backup_id: str, compression: Compression, encrypted: bool = False) -> str:
    return stored_name(f"{backup_id}_logs{TAR_SUFFIX[compression]}", encrypted)


def manifest_name(backup_id: str) -> str:
    return f"{backup_id}_manifest.json"


def acceptance_name(backup_id: str) -> str:
    """The record that a suspicious backup was marked as intended (`vq-backup accept`)."""
    return f"{backup_id}{ACCEPTANCE_SUFFIX}"


def signature_name(backup_id: str) -> str:
    """The detached signature beside the manifest: the base64 of its 64 raw bytes, on one line."""
    return f"{backup_id}{SIGNATURE_SUFFIX}"


def member_name(component: Component, backup_id: str, compression: Compression) -> str:
    """Return the name a component has inside the bundle (or, for logs, in storage)."""
    if component == "database":
        return "database.sql"
    if component == "redis":
        return "redis.rdb"
    if component == "config":
        return f"config{TAR_SUFFIX[compression]}"
    return logs_name(backup_id, compression)


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
