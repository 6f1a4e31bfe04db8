"""What is in storage, grouped by backup id, and the manifests read from it: only a backup with a
manifest is complete."""

from __future__ import annotations

import logging

from vq_tasks.catalog.backup_set import BackupSet
from vq_tasks.crypto import signing
from vq_tasks.errors import BackupError, PermanentError
from vq_tasks.manifest import Manifest, manifest_name, parse_backup_id, signature_name, split_object_name
from vq_tasks.storage.base import PARTIAL_MARKER, Storage, StoredObject

logger = logging.getLogger(__name__)
MAX_SIGNATURE_BYTES = 1024


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
    """Return the manifest of ``backup_id``, with its stored bytes and its detached signature if
    it has one. Raise PermanentError if there is none or it is unreadable."""
    name = manifest_name(backup_id)
    try:
        data = storage.read_bytes(name)
    except FileNotFoundError:
        raise PermanentError(f"no complete backup {backup_id} in {storage.describe()}") from None
    return parse_manifest(data, f"{name} in {storage.describe()}", read_signature(storage, backup_id))


def read_signature(storage: Storage, backup_id: str) -> str | None:
    """Return the text of the manifest's detached signature (None: there is none)."""
    name = signature_name(backup_id)
    found = storage.stat(name)
    if found is None:
        return None
    if found.size > MAX_SIGNATURE_BYTES:
        return ""  # no signature is that long: it fails the check, and stops nothing else
    try:
        data = storage.read_bytes(name, limit=MAX_SIGNATURE_BYTES)
    except FileNotFoundError:
        return None
    return data.decode("ascii", "replace").strip()


def parse_manifest(data: bytes, where: str, detached_signature: str | None = None) -> Manifest:
    """Return the manifest ``data`` holds, noting those bytes and ``detached_signature``. Raise
    PermanentError naming ``where`` if it is none."""
    try:
        return Manifest.model_validate_json(data).as_stored(data, detached_signature)
    except ValueError as exc:
        raise PermanentError(f"{where} is not a valid manifest: {exc}") from None


def readable_manifests(
    storage: Storage, prefix: str, keys: signing.PublicKeys | None = None
) -> list[Manifest]:
    """Return the manifests of every complete backup, oldest first; one that cannot be read, or
    whose signature fails ``keys`` (BACKUP_SIGNING_PUBLIC_KEYS), is logged and left out (it must
    neither stop new backups nor steer their kind)."""
    found = []
    for entry in backup_sets(storage.list(), prefix):
        if entry.complete:
            try:
                manifest = load_manifest(storage, entry.backup_id)
            except BackupError as exc:
                logger.warning("%s", exc)
                continue
            problem = signing.distrust(manifest, keys or {})
            if problem:
                logger.warning("%s: manifest signature %s; left out", entry.backup_id, problem)
                continue
            found.append(manifest)
    return found
