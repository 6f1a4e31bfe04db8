"""Signed manifests: workers sign each manifest with an Ed25519 key (BACKUP_SIGNING_KEY_FILE);
`vq-backup verify`, restores and drills check it against BACKUP_SIGNING_PUBLIC_KEYS, so a manifest
that was changed, or forged by someone who can write to the storage, is refused — by anyone
holding the public key, no decryption key needed. The manifest names the stored files' SHA-256,
so signing it covers every byte of the backup.

What is signed is the exact bytes of the stored manifest; the signature is stored beside it,
detached, as ``<backup_id>_manifest.json.sig``: the base64 of the 64 raw signature bytes on one
line, written before the manifest (which stays the backup's commit marker). Anyone can check it
with openssl (README, "Signed manifests"), and a manifest read by a later release whose model has
more fields still verifies. Releases before it embedded the signature in the manifest, over the
manifest without its ``signature`` field as canonical JSON (sorted keys, no spaces, UTF-8): such
manifests are checked over that canonical form of the stored document itself (never of the model,
which a new field would change). Public keys are written as base64 of their 32 raw bytes; a key's
id is the first 16 hex digits of the SHA-256 of those bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vq_tasks.errors import PermanentError
from vq_tasks.manifest import Manifest

RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
PublicKeys = dict[str, Ed25519PublicKey]  # by key id


@dataclass(frozen=True)
class SignatureCheck:
    ok: bool
    expected: str
    actual: str


def embedded_signed_bytes(manifest: Manifest) -> bytes:
    """Return the bytes an embedded (older releases') signature covers: the stored document
    without its ``signature``, canonical JSON. Read from the stored bytes when known, so that
    fields the model gained since, or formatting it would change, make no difference."""
    if manifest.stored_bytes is not None:
        document = json.loads(manifest.stored_bytes)
        document.pop("signature", None)
    else:
        document = manifest.model_dump(mode="json", exclude={"signature"})
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def public_key_text(key: Ed25519PublicKey) -> str:
    """Return the form BACKUP_SIGNING_PUBLIC_KEYS takes: base64 of the 32 raw bytes."""
    return base64.b64encode(key.public_bytes(*RAW)).decode()


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(key.public_bytes(*RAW)).hexdigest()[:16]


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Return the Ed25519 private key in the PEM file ``path`` (from `vq-backup signing-key` or
    `openssl genpkey -algorithm ed25519`). Raise PermanentError naming the file, never its content."""
    try:
        if path.stat().st_mode & 0o077:
            raise PermanentError(
                f"BACKUP_SIGNING_KEY_FILE {path} can be read by others than its owner: chmod 600 it"
            )
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise PermanentError(f"BACKUP_SIGNING_KEY_FILE {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise PermanentError(
            f"BACKUP_SIGNING_KEY_FILE {path} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PermanentError(f"BACKUP_SIGNING_KEY_FILE {path} holds a key that is not Ed25519")
    return key


def parse_public_keys(values: Iterable[str]) -> dict[str, Ed25519PublicKey]:
    """Return the public keys by key id. Raise ValueError naming each entry that is no key."""
    keys, bad = {}, []
    for position, text in enumerate(values, start=1):
        try:
            raw = base64.b64decode(text, validate=True)
            key = Ed25519PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError):
            bad.append(f"entry {position} is not the base64 of a 32-byte Ed25519 public key")
            continue
        keys[key_id(key)] = key
    if bad:
        raise ValueError("; ".join(bad))
    return keys


def trusted_keys(settings) -> dict[str, Ed25519PublicKey]:
    """Return the keys whose signatures count: BACKUP_SIGNING_PUBLIC_KEYS, and the public half of
    BACKUP_SIGNING_KEY_FILE (a worker that signs also checks, without a list of its own)."""
    keys = parse_public_keys(settings.backup_signing_public_keys)
    if settings.backup_signing_key_file is not None:
        own = load_signing_key(settings.backup_signing_key_file).public_key()
        keys[key_id(own)] = own
    return keys


def manifest_document(manifest: Manifest) -> bytes:
    """Return the bytes a manifest is stored as (no embedded signature: it is signed detached)."""
    return manifest.model_dump_json(indent=2, exclude={"signature"}).encode() + b"\n"


def detached_signature(document: bytes, key: Ed25519PrivateKey) -> bytes:
    """Return the content of ``<backup_id>_manifest.json.sig`` for the stored manifest ``document``."""
    return base64.b64encode(key.sign(document)) + b"\n"


def check(manifest: Manifest, public_keys: dict[str, Ed25519PublicKey]) -> SignatureCheck:
    """Check the manifest's signature (detached, else embedded) against the trusted
    ``public_keys`` (by id). With none configured nothing can be checked, which is reported, not
    failed."""
    detached, embedded = manifest.detached_signature, manifest.signature
    if not public_keys:
        shown = "signed, not checked" if detached is not None else "unsigned"
        if embedded is not None and detached is None:
            shown = f"signed by {embedded.key_id}, not checked"
        return SignatureCheck(True, "not checked: BACKUP_SIGNING_PUBLIC_KEYS is not set", shown)
    expected = f"Ed25519 by {', '.join(sorted(public_keys))}"
    stored = manifest.stored_bytes
    if stored is not None and type(manifest).model_validate_json(stored) != manifest:
        return SignatureCheck(False, expected, "the manifest differs from the bytes it was read from")
    if detached is not None:
        return _check_detached(manifest, detached, public_keys, expected)
    if embedded is None:
        return SignatureCheck(False, expected, "unsigned")
    key = public_keys.get(embedded.key_id)
    if key is None:
        return SignatureCheck(False, expected, f"signed by unknown key {embedded.key_id}")
    if not verifies(key, embedded.value, embedded_signed_bytes(manifest)):
        return SignatureCheck(False, expected, MISMATCH)
    return SignatureCheck(True, expected, f"valid, by {embedded.key_id}")


MISMATCH = "signature does not match: changed after signing, or forged"


def _check_detached(manifest: Manifest, signature: str, keys: PublicKeys, expected: str) -> SignatureCheck:
    """Check the detached ``signature`` of the manifest's stored bytes with each trusted key."""
    document = manifest.stored_bytes
    if document is None:  # a manifest noted with a signature is noted with its bytes too
        return SignatureCheck(False, expected, "the manifest's stored bytes are unknown: not checkable")
    for kid, key in sorted(keys.items()):
        if verifies(key, signature, document):
            return SignatureCheck(True, expected, f"valid, by {kid}")
    return SignatureCheck(False, expected, MISMATCH)


def verifies(key: Ed25519PublicKey, signature: str, data: bytes) -> bool:
    """Whether ``signature`` (base64) is ``key``'s Ed25519 signature of ``data``."""
    try:
        key.verify(base64.b64decode(signature.strip(), validate=True), data)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def distrust(manifest: Manifest, public_keys: PublicKeys) -> str | None:
    """Return why ``manifest`` is not to be trusted under ``public_keys`` (its signature), or None;
    always None when no keys are configured."""
    signed = check(manifest, public_keys)
    return None if signed.ok else signed.actual


def new_signing_key(path: Path) -> Ed25519PublicKey:
    """Write a new Ed25519 private key to ``path`` (PEM, mode 600; an existing file is never
    replaced) and return its public key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PermanentError(f"{path} exists already: a signing key is never overwritten") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return key.public_key()
