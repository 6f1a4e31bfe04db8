"""The audit trail: one JSON line per operation, to BACKUP_AUDIT_LOG and to the log stream.

A line holds the time, the operation, its outcome, the backup id, where it came from, how long it
took and a few details (never a secret: details pass through the same redaction as logs). Failing
to write the file is logged, never raised: an audit problem must not fail a restore.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from vq_tasks.errors import redact

if TYPE_CHECKING:
    from vq_tasks.settings import Settings

logger = logging.getLogger("vq_tasks.audit")


def audit_line(operation: str, outcome: str, secrets: Iterable[str] = (), **fields: Any) -> str:
    """Return the JSON line of one operation (keys sorted, fields without a value left out), every
    text in it with ``secrets`` replaced before encoding (JSON escapes would hide a secret that
    holds a quote, a backslash or a non-ASCII character from a later redaction)."""
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "operation": operation,
        "outcome": outcome,
    }
    entry.update({key: value for key, value in fields.items() if value is not None})
    secrets = list(secrets)
    return json.dumps(_redacted(entry, secrets), sort_keys=True, default=lambda v: redact(str(v), secrets))


def _redacted(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {_redacted(k, secrets): _redacted(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(item, secrets) for item in value]
    return value


def audit(settings: Settings, operation: str, outcome: str, **fields: Any) -> str:
    """Record one operation; return the line written."""
    line = audit_line(operation, outcome, settings.secret_values(), **fields)
    logger.info("audit %s", line)
    path = settings.backup_audit_log
    if path is None:
        return line
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as stream:
            stream.write(line + "\n")
    except OSError as exc:
        logger.warning("could not write the audit log %s: %s", path, exc.strerror or exc)
    return line
