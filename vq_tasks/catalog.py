"""What is in storage, grouped by backup id; only a backup with a manifest is complete."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from vq_tasks.errors import BackupError, PermanentError
from vq_tasks.manifest import Manifest, manifest_name, parse_backup_id, split_object_name
from vq_tasks.retention import IN_PROGRESS_GRACE, BackupSet, Deletion, Policy, decide
from vq_tasks.settings import Settings
from vq_tasks.staging import remove_stale
from vq_tasks.storage.base import Storage, StoredObject
from vq_tasks.storage.local import PARTIAL_MARKER

logger = logging.getLogger(__name__)


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
    return split_object_name(name, prefix)


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


def readable_manifests(storage: Storage, prefix: str) -> list[Manifest]:
    """Return the manifests of every complete backup, oldest first; one that cannot be read is
    logged and left out (it must not stop new backups)."""
    found = []
    for entry in backup_sets(storage.list(), prefix):
        if entry.complete:
            try:
                found.append(load_manifest(storage, entry.backup_id))
            except BackupError as exc:
                logger.warning("%s", exc)
    return found


def in_progress_grace(settings: Settings) -> timedelta:
    """How long a backup without a manifest may still be running: a day, or two task time limits."""
    return max(IN_PROGRESS_GRACE, timedelta(seconds=2 * settings.backup_task_time_limit))


def prune(
    storage: Storage,
    settings: Settings,
    now: datetime,
    dry_run: bool = False,
    clean_staging: bool = True,
    failed_runs: Callable[[list[str]], set[str]] | None = None,
) -> PruneResult:
    """Delete what the retention policy lets go, uploads that never completed, and (with
    ``clean_staging``) the staging folders of runs that died; nothing with ``dry_run``. Given
    ``failed_runs`` (ids -> those whose run is known to have failed), the debris of a failed run
    goes at once instead of after the grace. Return what was (or would be) deleted and why."""
    grace = in_progress_grace(settings)
    policy = Policy(settings.backup_retention_days, settings.backup_logs_retention_days, grace)
    sets = backup_sets(storage.list(), settings.backup_name_prefix)
    incomplete = [b.backup_id for b in sets if not b.complete]
    ended = frozenset(failed_runs(incomplete)) if failed_runs and incomplete else frozenset()
    deletions = decide(sets, now, policy, ended)
    if dry_run:
        return PruneResult(deletions, [], [])
    stale = (
        remove_stale(settings.backup_staging_dir, settings.backup_name_prefix, now, grace)
        if clean_staging
        else []
    )
    for deletion in deletions:
        storage.delete(deletion.name)
    try:
        aborted = storage.abort_stale_uploads(now - grace)
    except BackupError as exc:  # e.g. no s3:ListBucketMultipartUploads: the rest of prune still counts
        logger.warning("could not abort stale uploads in %s: %s", storage.describe(), exc)
        aborted = []
    return PruneResult(deletions, stale, aborted)


@dataclass(frozen=True)
class PruneResult:
    deletions: list[Deletion]
    stale_staging: list[str]
    aborted_uploads: list[str] = field(default_factory=list)
