"""What the restore reads of PostgreSQL beside its connection: a database's pg_database row, and
psql's errors.

What: read a database's row (its settings, encoding and owner) and turn psql's stderr on loading a
dump into our error and the roles it says are missing. Why: an operator must read the dump's line
that failed and what DB_USER lacks there, never a password. Connections and their errors are
clients/pg_connect.py's, shared with the backup.
"""

from __future__ import annotations

import re

import psycopg

from vq_tasks.clients.pg_connect import failure
from vq_tasks.clients.pg_tools import last_lines
from vq_tasks.errors import BackupError, redact
from vq_tasks.settings import Settings

_MISSING_ROLE = re.compile(r'role "((?:[^"]|"")+)" does not exist')
_PSQL_ERROR = re.compile(r"^psql:.*:(\d+): (?:ERROR|FATAL):\s+(.*)((?:\n(?:DETAIL|HINT):.*)*)", re.M)
DATABASE_QUERY = """SELECT to_jsonb(d) || jsonb_build_object('encoding_name', pg_encoding_to_char(d.encoding))
FROM pg_database d WHERE d.datname = %s"""


def psql_failure(settings: Settings, stderr: str, dbname: str, source: str) -> tuple[BackupError, list[str]]:
    """Given psql's stderr on loading ``source``, return the error to raise and the roles it says
    are missing."""
    text = redact(stderr.strip(), settings.secret_values())
    found = _PSQL_ERROR.search(text)
    if found:
        details = " | ".join(d.strip() for d in found.group(3).splitlines() if d.strip())
        line = f"{source} line {found.group(1)}: {found.group(2)}" + (f" | {details}" if details else "")
    else:
        line = last_lines(text)
    return failure(settings, dbname, line if found else text, summary=line), _missing_roles(line)


def statement_failure(
    settings: Settings, exc: psycopg.Error, dbname: str, where: str
) -> tuple[BackupError, list[str]]:
    """Given the server's error on a statement of a dump and ``where`` it stands (file, line,
    entry), return the error to raise, worded as psql_failure's, and the roles it says are missing."""
    diag = exc.diag
    line = f"{where}: {diag.message_primary or str(exc).strip()}"
    for label, text in (("DETAIL", diag.message_detail), ("HINT", diag.message_hint)):
        line += f" | {label}: {text}" if text else ""
    return failure(settings, dbname, line, sqlstate=exc.sqlstate, summary=line), _missing_roles(line)


def database_row(admin: psycopg.Connection, name: str) -> dict | None:
    """Return a database's pg_database row as a dict (with its encoding's name), None when there is
    no such database."""
    row = admin.execute(DATABASE_QUERY, [name]).fetchone()
    return row[0] if row else None


def _missing_roles(message: str) -> list[str]:
    """The roles a PostgreSQL error message says do not exist, unquoted."""
    return [name.replace('""', '"') for name in _MISSING_ROLE.findall(message)]
