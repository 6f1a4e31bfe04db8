"""What is in storage, grouped by backup id; only a backup with a manifest is complete."""

from __future__ import annotations

from datetime import datetime

from vq_tasks.errors import PermanentError
from vq_tasks.manifest import Manifest, manifest_name, parse_backup_id, split_object_name
from vq_tasks.retention import BackupSet, Deletion, Policy, decide
from vq_tasks.settings import Settings
from vq_tasks.storage.base import Storage, StoredObject
from vq_tasks.storage.local import PARTIAL_MARKER

ROLES = {
    "_manifest.json": "manifest",
    ".tar.gz": "bundle",
    ".tar": "bundle",
    "_logs.tar.gz": "logs",
    "_logs.tar": "logs",
}


def backup_sets(objects: list[StoredObject], prefix: str) -> list[BackupSet]:
    """Group stored objects by backup id; objects that are not ours are left out."""
    sets: dict[str, BackupSet] = {}
    for obj in objects:
        parsed = _role_of(obj.name, prefix)
        if parsed is None:
            continue
        backup_id, role = parsed
        entry = sets.setdefault(backup_id, BackupSet(backup_id, parse_backup_id(backup_id, prefix)))
        entry.roles.setdefault(role, []).append(obj.name)
    return sorted(sets.values(), key=lambda b: b.started)


def _role_of(name: str, prefix: str) -> tuple[str, str] | None:
    if name.startswith(".") and PARTIAL_MARKER in name:
        inner = split_object_name(name[1 : name.index(PARTIAL_MARKER)], prefix)
        return (inner[0], "partial") if inner else None
    parsed = split_object_name(name, prefix)
    return (parsed[0], ROLES[parsed[1]]) if parsed else None


def load_manifest(storage: Storage, backup_id: str) -> Manifest:
    """Return the manifest of ``backup_id``. Raise PermanentError if there is none or it is unreadable."""
    name = manifest_name(backup_id)
    try:
        data = storage.read_bytes(name)
    except FileNotFoundError:
        raise PermanentError(f"no complete backup {backup_id} in {storage.describe()}") from None
    try:
        return Manifest.model_validate_json(data)
    except ValueError as exc:
        raise PermanentError(f"{name} in {storage.describe()} is not a valid manifest: {exc}") from None


def complete_manifests(storage: Storage, prefix: str) -> list[Manifest]:
    """Return the manifests of every complete backup, oldest first."""
    return [
        load_manifest(storage, entry.backup_id)
        for entry in backup_sets(storage.list(), prefix)
        if entry.complete
    ]


def prune(storage: Storage, settings: Settings, now: datetime, dry_run: bool = False) -> list[Deletion]:
    """Delete what the retention policy says may go (nothing with ``dry_run``); return it."""
    policy = Policy(settings.backup_retention_days, settings.backup_logs_retention_days)
    deletions = decide(backup_sets(storage.list(), settings.backup_name_prefix), now, policy)
    if not dry_run:
        for deletion in deletions:
            storage.delete(deletion.name)
    return deletions
