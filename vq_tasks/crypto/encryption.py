"""Encryption before storage, from settings to stream stages: who a backup is encrypted to, which
keys open it, and what the manifest records about it.

With BACKUP_ENCRYPTION_ENABLED, finalize encrypts the bundle and the logs archive to every public
key of BACKUP_ENCRYPTION_RECIPIENTS (age X25519 recipients, ``age1...``) as they stream to storage;
workers hold no private key. The manifest stays plain JSON and records the format and a
fingerprint of each recipient (the first 16 hex digits of the SHA-256 of its ``age1...`` text),
never a key. Reading the contents back (verify's content checks, restore, extract, drill) needs a
private key: BACKUP_ENCRYPTION_IDENTITY_FILE, an ``age-keygen`` file of mode 600 or stricter. An
operator opens a file with the ``age`` CLI alone: ``age -d -i key.txt < file.tar.gz.age | tar -tz``.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vq_tasks.crypto.age import (
    AgeEncryptStage,
    AgeReader,
    NoIdentityMatch,
    Readable,
    X25519Identity,
    X25519Recipient,
)
from vq_tasks.crypto.age import parse_identities as parse_identity_text
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import EncryptionInfo
from vq_tasks.streams.stages import Writer

if TYPE_CHECKING:
    from vq_tasks.settings import Settings

IDENTITY_VARIABLE = "BACKUP_ENCRYPTION_IDENTITY_FILE"
NOT_SET = f"encrypted, {IDENTITY_VARIABLE} not set"


class KeyUnavailable(PermanentError):
    """An encrypted file cannot be read because the private key is missing or is not one it was
    encrypted to; the file itself may be intact. ``reason`` is the short form for a report."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def fingerprint(recipient: X25519Recipient | str) -> str:
    """Return a recipient's fingerprint: the first 16 hex digits of the SHA-256 of its ``age1...``
    text (in its canonical, lower-case form)."""
    text = str(X25519Recipient.parse(recipient) if isinstance(recipient, str) else recipient)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_recipients(values: Iterable[str]) -> list[X25519Recipient]:
    """Return the recipients of BACKUP_ENCRYPTION_RECIPIENTS. Raise ValueError naming each bad
    entry by its position, never its text (a private key pasted there by mistake stays unshown)."""
    found, problems = [], []
    for position, text in enumerate(values, start=1):
        if text.strip().upper().startswith("AGE-SECRET-KEY-"):
            problems.append(
                f"entry {position} is a private key (AGE-SECRET-KEY-...), not a recipient: give its "
                "public key (age1..., printed by age-keygen) and keep the private key off the workers"
            )
            continue
        try:
            found.append(X25519Recipient.parse(text))
        except ValueError as exc:
            problems.append(f"entry {position} is not an age X25519 recipient (age1...): {exc}")
    if problems:
        raise ValueError("; ".join(problems))
    return found


def load_identities(path: Path) -> list[X25519Identity]:
    """Return the identities in the identity file ``path``. Raise PermanentError, naming the file
    and never its content, if it cannot be read, is open to other users (group or other
    permission bits: it must be mode 600 or stricter), or holds no valid identity."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise PermanentError(
                f"{IDENTITY_VARIABLE} {path} has mode {mode:04o}: other users could read the private "
                "key; make it mode 600 (chmod 600) or stricter"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PermanentError(f"{IDENTITY_VARIABLE} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PermanentError(f"{IDENTITY_VARIABLE} {path} is not an age identity file (not text)") from None
    try:
        return parse_identity_text(text)
    except ValueError as exc:
        raise PermanentError(f"{IDENTITY_VARIABLE} {path}: {exc}") from None


def recipients_of(settings: Settings) -> list[X25519Recipient] | None:
    """Return whom stored files are encrypted to, or None when encryption is off."""
    if not settings.backup_encryption_enabled:
        return None
    return parse_recipients(settings.backup_encryption_recipients)


def info_of(recipients: Sequence[X25519Recipient] | None) -> EncryptionInfo | None:
    """Return what the manifest records about encryption to ``recipients`` (None: not encrypted)."""
    if not recipients:
        return None
    return EncryptionInfo(recipients=[fingerprint(r) for r in recipients])


def encrypting(downstream: Writer, recipients: Sequence[X25519Recipient]) -> AgeEncryptStage:
    """Return a stage that writes an age file, encrypted to ``recipients``, into ``downstream``;
    close it to seal the last chunk."""
    return AgeEncryptStage(downstream, recipients)


def identities_of(settings: Settings) -> list[X25519Identity] | None:
    """Return the private keys of BACKUP_ENCRYPTION_IDENTITY_FILE, or None when it is not set.
    Raise PermanentError if the file cannot be used."""
    path = settings.backup_encryption_identity_file
    return None if path is None else load_identities(path)


def decrypting(
    source: Readable,
    name: str,
    identities: Sequence[X25519Identity] | None,
    info: EncryptionInfo | None = None,
) -> AgeReader:
    """Return a reader of the plaintext of the age file ``source`` (stored as ``name``), its header
    read and checked. Raise KeyUnavailable when ``identities`` is None (no identity file) or none
    of them opens the file, naming the fingerprints it was encrypted to (from the manifest's
    ``info``) and those of the keys tried; AgeError when the file is not age or is damaged."""
    if identities is None:
        raise KeyUnavailable(
            f"{IDENTITY_VARIABLE} is not set: {name} is encrypted (age); the private key is needed to "
            "verify contents and restore",
            NOT_SET,
        )
    try:
        return AgeReader(source, identities, name)
    except NoIdentityMatch:
        wanted = ", ".join(info.recipients) if info is not None and info.recipients else "not recorded"
        held = ", ".join(fingerprint(i.recipient) for i in identities)
        message = (
            f"none of the identities in {IDENTITY_VARIABLE} opens {name} (it is encrypted to key "
            f"fingerprints {wanted}; the identity file holds {held})"
        )
        raise KeyUnavailable(message, message) from None
