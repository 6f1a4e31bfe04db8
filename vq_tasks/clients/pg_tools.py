"""Running PostgreSQL's client tools (pg_dump, psql) and reading their errors, shared by the dump and
the restore.

The password reaches a tool through the environment (PGPASSWORD), never its argv. Messages are
forced to English (LC_MESSAGES=C) so that errors can be classified as transient or permanent.
"""

from __future__ import annotations

import os
import re
import shutil

from vq_tasks.errors import PermanentError, TransientError, redact
from vq_tasks.settings import Settings

STDERR_KEPT = 64 << 10
INHERITED_ENVIRONMENT = {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PGSSLMODE", "PGSSLROOTCERT"}
_VERSION_MISMATCH = re.compile(r"server version: ([\d.]+\S*); pg_dump version: ([\d.]+\S*)")
_PERMANENT = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "permission denied",
    "no password supplied",
    "must be superuser",
)


_TRANSIENT = (
    "connection to server",
    "could not connect",
    "connection refused",
    "timeout expired",
    "timed out",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "server closed the connection unexpectedly",
    "terminating connection due to administrator command",
    "could not receive data",
    "too many clients",
    "could not translate host name",
    "conflict with recovery",
    "deadlock detected",
    "could not obtain lock",
    "lock timeout",
)


def pg_tool(settings: Settings, name: str) -> str:
    """Return the path of a PostgreSQL client program (PG_BIN_DIR first, then PATH)."""
    if settings.pg_bin_dir is not None:
        candidate = settings.pg_bin_dir / name
        if candidate.exists():
            return str(candidate)
        raise PermanentError(f"{name} not found in PG_BIN_DIR {settings.pg_bin_dir}")
    found = shutil.which(name)
    if found is None:
        raise PermanentError(
            f"{name} not found on PATH: install the PostgreSQL client of the server's version "
            "or set PG_BIN_DIR"
        )
    return found


def pg_environment(settings: Settings) -> dict[str, str]:
    """Return the environment for a libpq program: connection settings, password, English messages,
    and nothing else of the worker's (whose environment holds other secrets). No PGCLIENTENCODING,
    on purpose: pg_dump then writes the database's own bytes in its own encoding (its ``SET
    client_encoding`` line names it), and psql loads them so, recoding nothing (a SQL_ASCII database's
    bytes are not valid in any other encoding)."""
    env = {k: v for k, v in os.environ.items() if k in INHERITED_ENVIRONMENT}
    env.update(
        PGHOST=settings.db_host,
        PGPORT=str(settings.db_port),
        PGUSER=settings.db_user,
        PGDATABASE=settings.db_name,
        PGCONNECT_TIMEOUT=str(settings.db_connect_timeout),
        LC_MESSAGES="C",
        LANGUAGE="C",
    )
    if settings.db_password is not None:
        env["PGPASSWORD"] = settings.db_password.get_secret_value()
    return env


def classify_pg_error(stderr: str, settings: Settings) -> Exception:
    """Given pg_dump's or psql's stderr, return the error to raise: transient or permanent, with a
    message that says what to fix. Secrets are redacted."""
    text = redact(stderr.strip(), settings.secret_values())
    lowered = text.lower()
    where = f"PostgreSQL {settings.db_host}:{settings.db_port}/{settings.db_name}"
    mismatch = _VERSION_MISMATCH.search(text)
    if mismatch:
        server, client = mismatch.groups()
        return PermanentError(
            f"pg_dump {client} is older than the PostgreSQL server {server} at {where}: install "
            f"pg_dump {server.split('.')[0]} or newer on the workers (or point PG_BIN_DIR at it)"
        )
    if any(p in lowered for p in _PERMANENT):
        return PermanentError(f"{where}: {last_lines(text)}")
    if any(p in lowered for p in _TRANSIENT):
        return TransientError(f"{where} unreachable: {last_lines(text)}")
    return PermanentError(f"pg_dump failed on {where}: {last_lines(text)}")


def last_lines(text: str, count: int = 4) -> str:
    """Return the last ``count`` non-empty lines of a tool's output on one line, for a message."""
    return " | ".join(line.strip() for line in text.splitlines()[-count:] if line.strip())
