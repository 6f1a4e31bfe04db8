"""A psycopg connection as DB_USER and its errors, shared by the backup and the restore.

What: connect as DB_USER (password and TLS as parameters, never in argv), name a database in
messages, and turn PostgreSQL's errors into ours. Why: an operator must read in each error what
DB_USER lacks (with the GRANT or ALTER that fixes it) or whether a retry may help, and never a
password. The privilege hints end in "or restore as a superuser": the restore is where these errors
reach an operator (the backup's own, on what pg_dump may not read, are built in clients/pg_tools.py).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import psycopg
from psycopg.conninfo import make_conninfo

from vq_tasks.clients.pg_tools import classify_pg_error, last_lines, tls_fix, tls_parameters
from vq_tasks.errors import BackupError, PermanentError, TransientError, redact
from vq_tasks.settings import Settings

APPLICATION_NAME = "vq-backup"
TRANSIENT_STATES = {"55006", "55P03", "40P01", "40001", "57P01", "57P03"}
_HINTS = (
    (r"permission denied to create database", "may not create databases: ALTER ROLE {user} CREATEDB"),
    (r"must be owner of (\w+(?: \w+)? \S+)", "must own {0}"),
    (r'must be (?:a )?member of role "(.+?)"', 'may not act as role "{0}": GRANT "{0}" TO {user}'),
    (r'must be able to SET ROLE "(.+?)"', 'may not act as role "{0}": GRANT "{0}" TO {user}'),
    (
        r"must be a superuser to terminate|SUPERUSER attribute may terminate",
        "may not end a superuser's session: end it by hand first",
    ),
    (
        r"role whose process is being terminated|permission denied to terminate",
        "may not end other roles' sessions: GRANT pg_signal_backend TO {user}",
    ),
    (r"(?i:must be (?:a )?superuser)", "is not a superuser, which this needs: restore as a superuser"),
    (r"permission denied for (\w+(?: \w+)? \S+)", "lacks a privilege on {0}: grant it"),
    (r"permission denied to (\w+(?: \w+)?)", "may not {0}"),
)
NOT_UTF8 = (
    "the restore reads names, roles, settings and comments as UTF-8: in a SQL_ASCII database or"
    " cluster they must be ASCII or UTF-8; rename what is not"
)


@contextlib.contextmanager
def connect(
    settings: Settings, dbname: str, application_name: str = APPLICATION_NAME
) -> Iterator[psycopg.Connection]:
    """Connect as DB_USER (password as a parameter, never in argv), with pg_dump's TLS
    (tls_parameters: DB_SSL* only), client_encoding UTF8; errors become ours.

    Why UTF8, whatever the database's encoding (or PGCLIENTENCODING) says: these connections carry
    names, roles, settings and comments; table data only after the dump's own ``SET
    client_encoding`` line (restore/postgres_parallel.py), as bytes.
    Left to the database's encoding, a SQL_ASCII database gives psycopg bytes for every text column
    (and psycopg encodes queries as ASCII), which breaks every str comparison and every quoting of a
    name. Every server encoding converts to UTF8 without loss; SQL_ASCII is not converted
    but checked, so a name that is not UTF-8 there fails clearly (CHARACTER_NOT_IN_REPERTOIRE) rather
    than being read wrong."""
    password = settings.db_password.get_secret_value() if settings.db_password else None
    try:
        conn = psycopg.connect(
            make_conninfo(**tls_parameters(settings)),  # paths and sslmode only
            host=settings.db_host,
            port=settings.db_port,
            user=settings.db_user,
            password=password,
            dbname=dbname,
            connect_timeout=settings.db_connect_timeout,
            application_name=application_name,
            client_encoding="UTF8",
            autocommit=True,
        )
    except psycopg.Error as exc:
        raise failure(settings, dbname, str(exc)) from None
    try:
        with conn:
            yield conn
    except psycopg.Error as exc:
        detail = f" ({exc.diag.message_detail})" if exc.diag.message_detail else ""
        if isinstance(exc, psycopg.errors.CharacterNotInRepertoire):
            detail += f" ({NOT_UTF8})"
        raise failure(settings, dbname, f"{exc}{detail}", sqlstate=exc.sqlstate) from None


def failure(
    settings: Settings, dbname: str, text: str, sqlstate: str | None = None, summary: str | None = None
) -> BackupError:
    """Given an error's text, return a PermanentError naming the DB_SSL* variable to fix on a TLS
    failure or what DB_USER lacks when it is about privileges, a TransientError when a retry may help,
    else a PermanentError."""
    text = redact(text.strip(), settings.secret_values())
    summary = summary or last_lines(text)
    where, user = db_where(settings, dbname), settings.db_user
    tls = tls_fix(text, settings) if sqlstate is None else None  # a server's SQL error is never TLS
    if tls is not None:
        return PermanentError(f"{where}: TLS: {tls} ({summary})")
    for pattern, hint in _HINTS:
        match = re.search(pattern, text)
        if match:
            fix = hint.format(*match.groups(), user=user)
            fix += "" if "superuser" in hint else ", or restore as a superuser"
            return PermanentError(f"{where}: DB_USER {user} {fix} ({summary})")
    if sqlstate in TRANSIENT_STATES or isinstance(classify_pg_error(text, settings), TransientError):
        return TransientError(f"{where}: {summary}")
    return PermanentError(f"{where}: {summary}")


def db_where(settings: Settings, dbname: str) -> str:
    """Return how messages name a database: its server and name."""
    return f"PostgreSQL {settings.db_host}:{settings.db_port}/{dbname}"
