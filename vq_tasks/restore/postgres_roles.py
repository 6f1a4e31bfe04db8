"""The roles a plain SQL dump names, and the error listing those the server lacks.

Why: roles belong to the server, not to a database dump, and psql stops at the first role it
misses. So when it does, the dump is scanned (owners, grantees, FOR ROLE, SESSION AUTHORIZATION;
COPY data skipped, lines read in bounded pieces so that memory does not grow) and the error names
every missing role at once, with how to create them.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from vq_tasks.clients.pg_connect import connect
from vq_tasks.clients.sql_dump import HEADER_LIMIT, dump_encoding, python_codec
from vq_tasks.errors import BackupError, PermanentError
from vq_tasks.settings import Settings

LINE_LIMIT = 64 << 10  # the role scan reads at most this much of a line at once
_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_OWNER = re.compile(rf"^ALTER .* OWNER TO ({_IDENT});$")
_GRANTEES = re.compile(
    rf"^(?:GRANT|REVOKE|ALTER DEFAULT PRIVILEGES) .*\s(?:TO|FROM)\s+({_IDENT}(?:\s*,\s*{_IDENT})*)"
    rf"(?:\s+WITH (?:GRANT|ADMIN) OPTION)?(?:\s+GRANTED BY\s+{_IDENT})?;$"
)
_FOR_ROLE = re.compile(rf"^ALTER DEFAULT PRIVILEGES FOR ROLE ({_IDENT})")
_SESSION = re.compile(r"^SET SESSION AUTHORIZATION '((?:[^']|'')+)';$")
_NOT_ROLES = {"public", "current_user", "session_user", "current_role"}


def referenced_roles(path: Path) -> set[str]:
    """Given a plain SQL dump, return the roles its statements name as owners, grantees or session
    users. COPY data is skipped; lines are read in bounded pieces, so memory does not grow."""
    roles: set[str] = set()
    in_copy, at_start = False, True
    with path.open("rb") as dump:
        codec = python_codec(dump_encoding(dump.read(HEADER_LIMIT)))  # names are in the dump's encoding
        dump.seek(0)
        while piece := dump.readline(LINE_LIMIT):
            starts, at_start = at_start, piece.endswith(b"\n")
            if not starts or not at_start:
                continue  # part of a long line: COPY data or a function body
            if in_copy:
                in_copy = piece != b"\\.\n"
            elif piece.startswith(b"COPY ") and piece.endswith(b" FROM stdin;\n"):
                in_copy = True
            elif piece.startswith((b"ALTER ", b"GRANT ", b"REVOKE ", b"SET SESSION AUTHORIZATION ")):
                roles |= roles_in_statement(piece.decode(codec, "replace").rstrip("\n"))
    return roles


def roles_in_statement(line: str) -> set[str]:
    """Given one line of a dump, return the roles it names (OWNER TO, grantees, FOR ROLE, SESSION
    AUTHORIZATION), unquoted; PUBLIC and CURRENT_USER are not roles."""
    found: list[str] = []
    for pattern in (_OWNER, _GRANTEES, _FOR_ROLE):
        match = pattern.search(line)
        if match:
            found += re.findall(_IDENT, match.group(1))
    roles = {name[1:-1].replace('""', '"') for name in found if name.startswith('"')}
    roles |= {name.lower() for name in found if not name.startswith('"') and name.lower() not in _NOT_ROLES}
    session = _SESSION.search(line)
    if session:
        roles.add(session.group(1).replace("''", "'"))
    return roles


def missing_roles_error(
    settings: Settings, maintenance_db: str, path: Path, named: list[str]
) -> PermanentError:
    """psql stops at the first missing role: list every role the dump names that the server lacks."""
    missing = set(named)
    with contextlib.suppress(BackupError, OSError):
        wanted = referenced_roles(path) | missing
        with connect(settings, maintenance_db) as admin:
            found = {
                r
                for (r,) in admin.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [list(wanted)]
                )
            }
        missing = wanted - found
    names = ", ".join(f'"{name}"' for name in sorted(missing))
    return PermanentError(
        f"the dump references roles that do not exist on PostgreSQL {settings.db_host}:{settings.db_port}: "
        f"{names}. Roles belong to the server, not to a database dump: create them (CREATE ROLE ...; "
        "`pg_dumpall --roles-only` of the source server has their definitions), then restore again; "
        "or restore a dump taken with --no-owner --no-privileges"
    )
