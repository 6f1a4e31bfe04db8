"""The record that a suspicious backup was intended (`vq-backup accept`): ``<id>_accepted.json``.

Why an object of its own: the manifest is signed and may be locked, so it cannot change; the
acceptance sits beside it, names the manifest it accepts by the SHA-256 of its stored bytes, and is
deleted with the backup. Where BACKUP_SIGNING_PUBLIC_KEYS (or a signing key) is set, an
acceptance counts only when signed by one of those keys: otherwise whoever can write to storage
could mark an emptied database's backup good, and retention would then let the good ones go.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, Field, ValidationError

from vq_tasks.crypto import signing
from vq_tasks.manifest import BACKUP_ID, SHA256_HEX, Manifest, acceptance_name
from vq_tasks.storage.base import Storage

logger = logging.getLogger(__name__)
MAX_BYTES = 16 << 10


class Acceptance(BaseModel):
    backup_id: str = Field(pattern=BACKUP_ID)
    accepted_at: datetime
    by: str = Field(max_length=200, description="who: cli:<user>, or the task's origin")
    reason: str = Field(max_length=1000)
    manifest_sha256: str = Field(pattern=SHA256_HEX, description="of the stored manifest it accepts")
    signature: str | None = Field(None, description="base64 Ed25519 of the document without this field")

    def document(self) -> bytes:
        """The bytes that are signed: this acceptance without its signature."""
        return self.model_dump_json(indent=2, exclude={"signature"}).encode() + b"\n"


def manifest_digest(manifest: Manifest) -> str:
    """The SHA-256 of the manifest's stored bytes (of its JSON when read from nowhere)."""
    stored = manifest.stored_bytes or signing.manifest_document(manifest)
    return hashlib.sha256(stored).hexdigest()


def signed(acceptance: Acceptance, key: Ed25519PrivateKey | None) -> Acceptance:
    """Return ``acceptance`` signed with ``key`` (as is without one)."""
    if key is None:
        return acceptance
    value = base64.b64encode(key.sign(acceptance.document())).decode()
    return acceptance.model_copy(update={"signature": value})


def read_acceptance(storage: Storage, manifest: Manifest, keys: signing.PublicKeys) -> Acceptance | None:
    """Return the acceptance of ``manifest``'s backup if there is one that counts: it names this
    backup and this very manifest, and is signed by one of ``keys`` when any are given. One that
    does not count is logged and taken for none."""
    name = acceptance_name(manifest.backup_id)
    try:
        data = storage.read_bytes(name, limit=MAX_BYTES)
        found = Acceptance.model_validate_json(data)
    except FileNotFoundError:
        return None
    except (ValidationError, ValueError) as exc:
        logger.warning("%s is not an acceptance: %s; left out", name, str(exc).splitlines()[0])
        return None
    problem = _problem(found, manifest, keys)
    if problem:
        logger.warning("%s %s; the backup stays suspicious", name, problem)
        return None
    return found


def _problem(found: Acceptance, manifest: Manifest, keys: signing.PublicKeys) -> str | None:
    if found.backup_id != manifest.backup_id:
        return f"names another backup ({found.backup_id})"
    if found.manifest_sha256 != manifest_digest(manifest):
        return "names another manifest than the one stored"
    if keys and not any(_verifies(key, found) for key in keys.values()):
        return "is not signed by a key of BACKUP_SIGNING_PUBLIC_KEYS"
    return None


def _verifies(key, found: Acceptance) -> bool:
    return found.signature is not None and signing.verifies(key, found.signature, found.document())


def write_acceptance(storage: Storage, acceptance: Acceptance) -> str:
    """Store ``acceptance`` as ``<id>_accepted.json`` and return that name. Never locked (even with
    BACKUP_IMMUTABILITY): it goes with its backup, and deleting it only makes the backup
    suspicious again, which keeps more, never less."""
    name = acceptance_name(acceptance.backup_id)
    with storage.open_write(name) as out:
        out.write(acceptance.model_dump_json(indent=2).encode() + b"\n")
    return name
