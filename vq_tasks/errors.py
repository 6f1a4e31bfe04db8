"""Errors that say whether a retry may help, and the redaction every message passes through."""

from __future__ import annotations

from collections.abc import Iterable

REDACTED = "***"


class BackupError(Exception):
    """A failure of one step of a backup; ``transient`` errors are retried with backoff."""

    transient = False


class TransientError(BackupError):
    """A failure that may pass: a refused connection, a timeout, a server starting up."""

    transient = True


class PermanentError(BackupError):
    """A failure that retrying cannot fix: bad credentials, a missing database, a full disk."""


def is_transient(exc: BaseException) -> bool:
    """Return whether ``exc`` is worth a retry."""
    return bool(getattr(exc, "transient", False))


def redact(text: str, secrets: Iterable[str]) -> str:
    """Return ``text`` with every secret value replaced, longest first (one may contain another)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redacted_message(exc: BaseException, secrets: Iterable[str]) -> str:
    """Return what an operator reads of ``exc``: its message (its type's name when it has none)
    with every secret replaced."""
    return redact(str(exc) or type(exc).__name__, secrets)
