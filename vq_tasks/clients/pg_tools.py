"""Running PostgreSQL's client tools (pg_dump, psql) and reading their errors, shared by the dump and
the restore.

The password reaches a tool through the environment (PGPASSWORD), never its argv. Messages are
forced to English (LC_MESSAGES=C) so that errors can be classified as transient or permanent.
TLS comes from DB_SSLMODE, DB_SSLROOTCERT, DB_SSLCERT and DB_SSLKEY only (tls_environment), for
the tools and psycopg alike; a TLS failure is permanent and names the variable that fixes it.
When pg_dump stops at an object DB_USER may not read, access_error names every such object (listed
by the caller) with the privilege that fixes it; its warnings on success say what it left out.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vq_tasks.errors import PermanentError, TransientError, redact
from vq_tasks.settings import Settings

STDERR_KEPT = 64 << 10
INHERITED_ENVIRONMENT = {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"}  # HOME: ~/.postgresql
TLS_PARAMETERS = {
    "PGSSLMODE": "sslmode",
    "PGSSLROOTCERT": "sslrootcert",
    "PGSSLCERT": "sslcert",
    "PGSSLKEY": "sslkey",
}
NAMES_SHOWN = 10
WARNINGS_KEPT = 20
WARNING_LENGTH = 300
# pg_dump stops at the first object it may not read (LOCK, COPY, SELECT or lo_open failed)
_ACCESS_DENIED = re.compile(
    r"permission denied for (?:table|schema|sequence|view|materialized view|large object) [^\n]+"
    r"|query would be affected by row-level security policy for table [^\n]+"
)
_WARNING = re.compile(r"^pg_dump: warning: (.*)$", re.I)
_DETAIL = re.compile(r"^pg_dump: detail: (.*)$", re.I)
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")
_VERSION_MISMATCH = re.compile(r"server version: ([\d.]+\S*); pg_dump(?:all)? version: ([\d.]+\S*)")
# libpq's TLS failures (inside a "connection to server" line, which alone means transient), as regular
# expressions of the lowered text, each with what fixes it; checked before any other pattern
_TLS = (
    (
        "ssl error: certificate verify failed",
        "the server's certificate is not signed by a CA of DB_SSLROOTCERT ({rootcert}): set DB_SSLROOTCERT "
        "to the CA bundle of the server's provider",
    ),
    (
        "does not match host name",
        "the server's certificate does not name DB_HOST {host}: set DB_HOST to a name the certificate holds "
        "(the endpoint the provider gives)",
    ),
    (
        "server does not support ssl",
        "the server does not offer TLS, which DB_SSLMODE={mode} requires: turn ssl on in the server, or "
        "lower DB_SSLMODE",
    ),
    (
        'root certificate file "',
        "DB_SSLMODE={mode} checks the server's certificate against DB_SSLROOTCERT ({rootcert}), which "
        "cannot be read: set DB_SSLROOTCERT to the CA bundle of the server's provider",
    ),
    (
        "requires a valid client certificate",
        "the server asks for a client certificate: set DB_SSLCERT and DB_SSLKEY",
    ),
    (
        "certificate authentication failed",
        "the client certificate DB_SSLCERT ({cert}) does not name DB_USER {user} (its CN must be the user)",
    ),
    (
        r"ssl error: \w+ alert (?:unknown ca|bad certificate|certificate)",
        "the server refused the client certificate DB_SSLCERT ({cert}): it is not signed by a CA the "
        "server trusts (its ssl_ca_file), or has expired",
    ),
    (
        r'(?:certificate|private key) file "|certificate present, but not private key',
        "the client certificate DB_SSLCERT ({cert}) or its key DB_SSLKEY ({key}) cannot be used",
    ),
    (
        "no pg_hba.conf entry .*no encryption",
        "no pg_hba.conf line lets DB_USER {user} in without TLS (DB_SSLMODE={mode}): where the server "
        "wants TLS, set DB_SSLMODE=verify-full and DB_SSLROOTCERT",
    ),
)
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
    env.update(tls_environment(settings))
    if settings.db_password is not None:
        env["PGPASSWORD"] = settings.db_password.get_secret_value()
    return env


def tls_environment(settings: Settings) -> dict[str, str]:
    """Return libpq's TLS variables (PGSSLMODE, PGSSLROOTCERT, PGSSLCERT, PGSSLKEY) of DB_SSLMODE and
    the DB_SSL* files that are set: the one source of TLS for pg_dump, psql and psycopg, so that the
    backup and the restore meet the server alike. Paths only: libpq reads the files."""
    files = {
        "PGSSLROOTCERT": settings.db_sslrootcert,
        "PGSSLCERT": settings.db_sslcert,
        "PGSSLKEY": settings.db_sslkey,
    }
    return {"PGSSLMODE": settings.db_sslmode} | {k: str(v) for k, v in files.items() if v is not None}


def tls_parameters(settings: Settings) -> dict[str, str]:
    """Return tls_environment as psycopg's connection parameters. An unset file is given as "", which
    libpq reads as unset (its default file), so that the worker's own PGSSL* variables, which libpq
    would read otherwise, count for nothing here either."""
    env = tls_environment(settings)
    return {parameter: env.get(name, "") for name, parameter in TLS_PARAMETERS.items()}


def tls_fix(text: str, settings: Settings) -> str | None:
    """Given libpq's error text, return what to fix when it is a TLS failure (naming DB_SSLMODE,
    DB_SSLROOTCERT, DB_SSLCERT, DB_SSLKEY or DB_HOST), else None. Paths and names only, no secret."""
    lowered = text.lower()
    for pattern, fix in _TLS:
        if re.search(pattern, lowered):
            return fix.format(
                mode=settings.db_sslmode,
                rootcert=settings.db_sslrootcert or "unset: ~/.postgresql/root.crt",
                cert=settings.db_sslcert or "unset",
                key=settings.db_sslkey or "unset",
                host=settings.db_host,
                user=settings.db_user,
            )
    return None


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
    fix = tls_fix(text, settings)
    if fix is not None:
        return PermanentError(f"{where}: TLS: {fix} ({last_lines(text)})")
    if any(p in lowered for p in _PERMANENT):
        return PermanentError(f"{where}: {last_lines(text)}")
    if any(p in lowered for p in _TRANSIENT):
        return TransientError(f"{where} unreachable: {last_lines(text)}")
    return PermanentError(f"pg_dump failed on {where}: {last_lines(text)}")


def last_lines(text: str, count: int = 4) -> str:
    """Return the last ``count`` non-empty lines of a tool's output on one line, for a message."""
    return " | ".join(line.strip() for line in text.splitlines()[-count:] if line.strip())


@dataclass(frozen=True)
class Unreadable:
    """Objects of one kind DB_USER may not read although pg_dump must: ``total`` of them, the first
    ``names`` (quoted as SQL names; large objects by OID). Kinds: schema, table, sequence,
    row security (tables), large object."""

    kind: str
    total: int
    names: tuple[str, ...]


def access_denied(stderr: str) -> str | None:
    """Return pg_dump's message when it stopped at an object DB_USER may not read, else None."""
    found = _ACCESS_DENIED.search(stderr)
    return found.group(0).strip() if found else None


def access_error(settings: Settings, unreadable: Sequence[Unreadable], stopped_at: str) -> PermanentError:
    """Given what DB_USER may not read (by kind) and pg_dump's own message, return a PermanentError
    naming each object (the first NAMES_SHOWN of a kind) and the privilege that fixes each kind."""
    by_kind = {u.kind: u for u in unreadable if u.total}
    user = quote_ident(settings.db_user)
    parts = [
        _privileges_part(by_kind, user),
        _row_security_part(by_kind.get("row security"), user),
        _large_objects_part(by_kind.get("large object"), user),
    ]
    where = f"PostgreSQL {settings.db_host}:{settings.db_port}/{settings.db_name}"
    text = f"{where}: DB_USER {settings.db_user} may not read all that pg_dump must. " + " ".join(
        p for p in parts if p
    )
    return PermanentError(redact(f"{text} (pg_dump stopped at: {stopped_at})", settings.secret_values()))


def _privileges_part(by_kind: dict[str, Unreadable], user: str) -> str:
    """Return the sentences on tables and sequences without SELECT and schemas without USAGE."""
    found = [
        f"{label}: {shown(by_kind[kind])}"
        for kind, label in (
            ("table", "Tables without SELECT"),
            ("sequence", "sequences without SELECT"),
            ("schema", "schemas without USAGE"),
        )
        if kind in by_kind
    ]
    if not found:
        return ""
    found[0] = found[0][0].upper() + found[0][1:]
    return (
        f"{'; '.join(found)}. Fix: GRANT pg_read_all_data TO {user} (PostgreSQL 14+; on RDS, Azure or "
        "Cloud SQL the admin user can grant it), or GRANT USAGE ON SCHEMA and SELECT ON those tables and "
        f"sequences TO {user}."
    )


def _row_security_part(found: Unreadable | None, user: str) -> str:
    """Return the sentences on tables whose row-level security applies to DB_USER."""
    if found is None:
        return ""
    return (
        f"Tables with row-level security (pg_dump reads every row): {shown(found)}. Fix: ALTER ROLE "
        f"{user} BYPASSRLS, or back up as their owner (when they do not FORCE ROW LEVEL SECURITY)."
    )


def _large_objects_part(found: Unreadable | None, user: str) -> str:
    """Return the sentences on large objects without SELECT."""
    if found is None:
        return ""
    return (
        f"Large objects without SELECT: {shown(found)}. Fix: GRANT SELECT ON LARGE OBJECT {found.names[0]} "
        f"TO {user}, one per object (pg_read_all_data covers them only from PostgreSQL 19), or back up "
        "as their owner."
    )


def shown(found: Unreadable) -> str:
    """Return the names of ``found`` for a message: the first NAMES_SHOWN and how many more."""
    names = ", ".join(found.names[:NAMES_SHOWN])
    more = found.total - min(len(found.names), NAMES_SHOWN)
    return f"{names} and {more} more" if more > 0 else names


def quote_ident(name: str) -> str:
    """Return ``name`` as PostgreSQL reads it in a statement: as is when plain, else double-quoted."""
    return name if _PLAIN_NAME.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def dump_warnings(stderr: str, secrets: Iterable[str]) -> list[str]:
    """Given pg_dump's stderr after a success, return its warnings (what it left out), each without
    its "pg_dump: warning: " prefix, with its detail lines, redacted, deduplicated, at most
    WARNINGS_KEPT of WARNING_LENGTH characters."""
    found: list[str] = []
    for line in redact(stderr, secrets).splitlines():
        warning, detail = _WARNING.match(line), _DETAIL.match(line)
        if warning:
            found.append(warning.group(1).strip())
        elif detail and found:
            found[-1] += f" ({detail.group(1).strip()})"
    kept = [w if len(w) <= WARNING_LENGTH else w[: WARNING_LENGTH - 1] + "…" for w in dict.fromkeys(found)]
    return kept[:WARNINGS_KEPT]
