"""Restore a plain SQL dump into PostgreSQL without ever leaving the live database half restored.

The dump is loaded by ``psql --single-transaction`` into a new database
``<DB_NAME>_restore_<YYYYMMDDHHMMSS>`` (template0, the live database's encoding and locale) and its
rows per table are checked against the backup's. Only then, connected to the maintenance database,
are the names swapped: both databases stop taking connections, their sessions are ended, and one
transaction renames the live one to ``<DB_NAME>_before_<stamp>``, the new one to ``<DB_NAME>`` and
lets both take connections again. Whatever fails before that transaction commits drops the new
database and leaves the live one as it was. What a dump of a database's contents does not hold (its
settings, grants, connection limit and comment) is carried over from the live database.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from pydantic import BaseModel, Field

from vq_tasks.errors import BackupError, PermanentError, TransientError, redact
from vq_tasks.settings import Settings
from vq_tasks.sources.postgres import STDERR_KEPT, classify_pg_error, pg_environment, pg_tool

logger = logging.getLogger(__name__)

MAINTENANCE_DB = "postgres"
NAME_LIMIT = 63  # bytes (NAMEDATALEN - 1): PostgreSQL cuts longer names silently
SESSION_END_TIMEOUT = 30.0
RENAME_ATTEMPTS = 3
LINE_LIMIT = 64 << 10  # the role scan reads at most this much of a line at once
APPLICATION_NAME = "vq-backup restore"
LIST_SETTINGS = {"search_path", "temp_tablespaces", "local_preload_libraries", "session_preload_libraries"}
TRANSIENT_STATES = {"55006", "55P03", "40P01", "40001", "57P01", "57P03"}
_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_OWNER = re.compile(rf"^ALTER .* OWNER TO ({_IDENT});$")
_GRANTEES = re.compile(
    rf"^(?:GRANT|REVOKE|ALTER DEFAULT PRIVILEGES) .*\s(?:TO|FROM)\s+({_IDENT}(?:\s*,\s*{_IDENT})*)"
    rf"(?:\s+WITH (?:GRANT|ADMIN) OPTION)?(?:\s+GRANTED BY\s+{_IDENT})?;$"
)
_FOR_ROLE = re.compile(rf"^ALTER DEFAULT PRIVILEGES FOR ROLE ({_IDENT})")
_SESSION = re.compile(r"^SET SESSION AUTHORIZATION '((?:[^']|'')+)';$")
_NOT_ROLES = {"public", "current_user", "session_user", "current_role"}
_MISSING_ROLE = re.compile(r'role "((?:[^"]|"")+)" does not exist')
_PSQL_ERROR = re.compile(r"^psql:.*:(\d+): (?:ERROR|FATAL):\s+(.*)((?:\n(?:DETAIL|HINT):.*)*)", re.M)
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
DATABASE_QUERY = """SELECT to_jsonb(d) || jsonb_build_object('encoding_name', pg_encoding_to_char(d.encoding))
FROM pg_database d WHERE d.datname = %s"""
TABLES_QUERY = r"""SELECT n.nspname, c.relname, format('%I.%I', n.nspname, c.relname),
  EXISTS (SELECT FROM pg_depend e
          WHERE e.classid = 'pg_class'::regclass AND e.objid = c.oid AND e.deptype = 'e')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema' ORDER BY 3"""
ACL_QUERY = """SELECT a.privilege_type,
  CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.is_grantable
FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = %s"""
SETTINGS_QUERY = """SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE s.setrole::regrole::text END, c.setting
FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase, unnest(s.setconfig) c(setting)
WHERE d.datname = %s ORDER BY s.setrole"""
END_SESSIONS = """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = ANY(%s)
  AND pid <> pg_backend_pid() AND backend_type IS DISTINCT FROM 'autovacuum worker'"""


class DatabaseRestoreResult(BaseModel):
    database: str = Field(description="the database that holds the restored data")
    previous_name: str | None = Field(
        None, description="the database it replaced, kept under this name: drop it once satisfied"
    )
    swapped: bool
    tables: list[str]
    row_counts: dict[str, int]
    duration_seconds: float
    warnings: list[str] = Field(default_factory=list)


class DatabaseRestorePlan(BaseModel):
    database: str
    exists: bool
    tables: dict[str, int] = Field(description="rows per table now in the database")
    expected_tables: dict[str, int] = Field(description="rows per table in the backup")
    only_in_database: list[str] = Field(description="tables the restore would remove")
    only_in_backup: list[str] = Field(description="tables the restore would add")


def restore_database(
    settings: Settings,
    sql_path: str | os.PathLike[str],
    expected_tables: Mapping[str, int],
    target_db: str | None = None,
    swap: bool = True,
    keep_previous: bool = True,
    maintenance_db: str = MAINTENANCE_DB,
    now: datetime | None = None,
) -> DatabaseRestoreResult:
    """Given a plain SQL dump and the backup's rows per table, load it into a new database, check it
    and put it in place of ``target_db`` (default DB_NAME), keeping the replaced one as
    ``<name>_before_<stamp>`` unless not ``keep_previous``; without ``swap``, load it straight into a
    new database ``target_db`` (a drill). Return what was restored. Raise PermanentError or
    TransientError, the new database dropped and the target as it was, if any step before the swap fails."""
    started = time.monotonic()
    path = _readable(Path(sql_path))
    target = target_db or settings.db_name
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    new = derived_name(target, "restore", stamp) if swap else target
    live = _prepare(settings, maintenance_db, target, new, swap)
    try:
        counts = _load_and_check(settings, path, new, expected_tables, maintenance_db)
        warnings = _carry_over(settings, maintenance_db, target, new) if live and swap else []
        previous = _swap(settings, maintenance_db, target, new, stamp) if swap else None
    except BaseException as exc:
        _drop_quietly(settings, maintenance_db, new, exc)
        raise
    if previous and not keep_previous:
        problems = _drop_previous(settings, maintenance_db, previous)
        warnings += problems
        previous = previous if problems else None
    logger.info("restored %s into %s (previous: %s)", path.name, _where(settings, target), previous)
    return DatabaseRestoreResult(
        database=target,
        previous_name=previous,
        swapped=swap,
        tables=sorted(counts),
        row_counts=counts,
        duration_seconds=round(time.monotonic() - started, 3),
        warnings=warnings,
    )


def plan_database_restore(
    settings: Settings,
    expected_tables: Mapping[str, int],
    target_db: str | None = None,
    maintenance_db: str = MAINTENANCE_DB,
) -> DatabaseRestorePlan:
    """Given the backup's rows per table, return what a restore would replace: whether the target
    (default DB_NAME) exists and its tables and rows now. Change nothing (read-only). Raise
    TransientError or PermanentError when PostgreSQL cannot answer."""
    target = target_db or settings.db_name
    with _connect(settings, maintenance_db) as admin:
        exists = _database_row(admin, target) is not None
    current = database_row_counts(settings, target) if exists else {}
    expected = dict(expected_tables)
    return DatabaseRestorePlan(
        database=target,
        exists=exists,
        tables=current,
        expected_tables=expected,
        only_in_database=sorted(current.keys() - expected.keys()),
        only_in_backup=sorted(expected.keys() - current.keys()),
    )


def database_row_counts(settings: Settings, dbname: str | None = None) -> dict[str, int]:
    """Given settings and a database (default DB_NAME), return rows per table keyed as pg_dump names
    tables in its COPY statements (``public.tickets``, ``public."Weird Name"``): ordinary tables and
    partitions, not partitioned parents nor tables of extensions; count(*) in one read-only snapshot.
    Raise TransientError or PermanentError."""
    with _connect(settings, dbname or settings.db_name) as conn:
        return {name: rows for name, rows, member in _count_tables(conn) if not member}


def derived_name(base: str, kind: str, stamp: str) -> str:
    """Given a database name, a kind (``restore``, ``before``) and a stamp, return
    ``<base>_<kind>_<stamp>``, the base shortened so that the whole fits in PostgreSQL's 63 bytes."""
    suffix = f"_{kind}_{stamp}"
    room = NAME_LIMIT - len(suffix.encode())
    return base.encode()[:room].decode("utf-8", "ignore") + suffix


def locale_options(database: Mapping[str, Any]) -> list[sql.Composable]:
    """Given a pg_database row (as JSON, with ``encoding_name``), return the CREATE DATABASE options
    that give a new database the same encoding, collation and locale provider."""
    options = [
        sql.SQL("ENCODING {}").format(sql.Literal(database["encoding_name"])),
        sql.SQL("LC_COLLATE {}").format(sql.Literal(database["datcollate"])),
        sql.SQL("LC_CTYPE {}").format(sql.Literal(database["datctype"])),
    ]
    provider = database.get("datlocprovider", "c")
    locale = database.get("daticulocale") or database.get("datlocale")
    if provider == "i":
        options += [sql.SQL("LOCALE_PROVIDER icu ICU_LOCALE {}").format(sql.Literal(locale))]
        if database.get("daticurules"):
            options.append(sql.SQL("ICU_RULES {}").format(sql.Literal(database["daticurules"])))
    elif provider == "b":
        options.append(sql.SQL("LOCALE_PROVIDER builtin BUILTIN_LOCALE {}").format(sql.Literal(locale)))
    return options


def setting_statement(dbname: str, role: str | None, setting: str) -> sql.Composed:
    """Given a database, a role (already quoted, None for all) and a ``name=value`` of
    pg_db_role_setting, return the ALTER statement that sets it on that database."""
    name, _, value = setting.partition("=")
    if role is None:
        target = sql.SQL("ALTER DATABASE {}").format(sql.Identifier(dbname))
    else:
        target = sql.SQL("ALTER ROLE {} IN DATABASE {}").format(sql.SQL(role), sql.Identifier(dbname))
    literal = sql.SQL(value) if name.lower() in LIST_SETTINGS else sql.Literal(value)
    return sql.SQL("{} SET {} TO {}").format(target, sql.Identifier(name), literal)


def referenced_roles(path: Path) -> set[str]:
    """Given a plain SQL dump, return the roles its statements name as owners, grantees or session
    users. COPY data is skipped; lines are read in bounded pieces, so memory does not grow."""
    roles: set[str] = set()
    in_copy, at_start = False, True
    with path.open("rb") as dump:
        while piece := dump.readline(LINE_LIMIT):
            starts, at_start = at_start, piece.endswith(b"\n")
            if not starts or not at_start:
                continue  # part of a long line: COPY data or a function body
            if in_copy:
                in_copy = piece != b"\\.\n"
            elif piece.startswith(b"COPY ") and piece.endswith(b" FROM stdin;\n"):
                in_copy = True
            elif piece.startswith((b"ALTER ", b"GRANT ", b"REVOKE ", b"SET SESSION AUTHORIZATION ")):
                roles |= roles_in_statement(piece.decode("utf-8", "replace").rstrip("\n"))
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


def psql_failure(settings: Settings, stderr: str, dbname: str, source: str) -> tuple[BackupError, list[str]]:
    """Given psql's stderr on loading ``source``, return the error to raise and the roles it says
    are missing."""
    text = redact(stderr.strip(), settings.secret_values())
    found = _PSQL_ERROR.search(text)
    if found:
        details = " | ".join(d.strip() for d in found.group(3).splitlines() if d.strip())
        line = f"{source} line {found.group(1)}: {found.group(2)}" + (f" | {details}" if details else "")
    else:
        line = _last_lines(text)
    missing = [name.replace('""', '"') for name in _MISSING_ROLE.findall(line)]
    return _failure(settings, dbname, line if found else text, summary=line), missing


def _readable(path: Path) -> Path:
    if not path.is_file() or not os.access(path, os.R_OK):
        raise PermanentError(f"SQL dump {path} is not a readable file on this worker")
    return path.resolve()


def _prepare(settings: Settings, maintenance_db: str, target: str, new: str, swap: bool) -> dict | None:
    """Check that the restore may go ahead and create the new database; return the live one's row."""
    with _connect(settings, maintenance_db) as admin:
        live = _database_row(admin, target)
        if live is not None and not swap:
            raise PermanentError(
                f"{_where(settings, target)} already exists: a restore without swap only loads into a new "
                "database; drop it or name another"
            )
        _check_privileges(admin, settings, target if live else None, maintenance_db)
        options = [
            sql.SQL("OWNER {}").format(sql.Identifier(settings.db_user)),
            sql.SQL("TEMPLATE template0"),
        ]
        options += locale_options(live) if live else []
        logger.info("creating database %s", _where(settings, new))
        admin.execute(sql.SQL("CREATE DATABASE {} ").format(sql.Identifier(new)) + sql.SQL(" ").join(options))
    return live


def _check_privileges(
    admin: psycopg.Connection, settings: Settings, live: str | None, maintenance_db: str
) -> None:
    """Fail before the long load if DB_USER could not create the new database or swap it in."""
    row = admin.execute(
        "SELECT r.rolsuper, r.rolcreatedb, d.datname IS NULL OR pg_has_role(d.datdba, 'USAGE'), "
        "d.datdba::regrole::text FROM pg_roles r LEFT JOIN pg_database d ON d.datname = %s "
        "WHERE r.rolname = current_user",
        [live],
    ).fetchone()
    superuser, createdb, owns, owner = row
    user, where = settings.db_user, _where(settings, live or maintenance_db)
    if not (superuser or createdb):
        raise PermanentError(
            f"{where}: DB_USER {user} may not create databases: ALTER ROLE {user} CREATEDB, "
            "or restore as a superuser"
        )
    if not (superuser or owns):
        raise PermanentError(
            f"{where}: DB_USER {user} must own database {live} (owner: {owner}) to replace it: "
            f"ALTER DATABASE {live} OWNER TO {user}, or restore as a superuser"
        )


def _load_and_check(
    settings: Settings, path: Path, dbname: str, expected: Mapping[str, int], maintenance_db: str
) -> dict[str, int]:
    """Load the dump into ``dbname`` in one transaction, then compare rows per table."""
    _run_psql(settings, path, dbname, maintenance_db)
    with _connect(settings, dbname) as conn:
        tables = _count_tables(conn)
    counts = {name: rows for name, rows, member in tables if not member}
    members = {name for name, _, member in tables if member}
    wrong = [
        f"{name}: {counts[name]} rows, the backup {rows}"
        for name, rows in expected.items()
        if name in counts and counts[name] != rows
    ]
    wrong += [f"{name}: missing" for name in expected if name not in counts and name not in members]
    if wrong:
        shown = "; ".join(wrong[:10]) + (f"; and {len(wrong) - 10} more" if len(wrong) > 10 else "")
        raise PermanentError(f"restored {_where(settings, dbname)} does not match the backup: {shown}")
    return counts


def _run_psql(settings: Settings, path: Path, dbname: str, maintenance_db: str) -> None:
    """Run psql on the file (it streams it): one transaction, stop at the first error."""
    argv = [
        pg_tool(settings, "psql"),
        "-X",
        "--quiet",
        "--no-password",
        "-v",
        "ON_ERROR_STOP=1",
        "--single-transaction",
        "-f",
        str(path),
    ]
    env = pg_environment(_scoped(settings, dbname))  # the name through PGDATABASE: never parsed as conninfo
    logger.info("loading %s into %s", path.name, _where(settings, dbname))
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, env=env
        )
        try:
            returncode = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        if returncode == 0:
            return
        errors.seek(max(0, errors.seek(0, os.SEEK_END) - STDERR_KEPT))
        stderr = errors.read().decode("utf-8", "replace")
    error, missing = psql_failure(settings, stderr, dbname, path.name)
    if missing:
        error = _missing_roles_error(settings, maintenance_db, path, missing)
    raise error


def _missing_roles_error(
    settings: Settings, maintenance_db: str, path: Path, named: list[str]
) -> PermanentError:
    """psql stops at the first missing role: list every role the dump names that the server lacks."""
    missing = set(named)
    with contextlib.suppress(BackupError, OSError):
        wanted = referenced_roles(path) | missing
        with _connect(settings, maintenance_db) as admin:
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


def _carry_over(settings: Settings, maintenance_db: str, live: str, new: str) -> list[str]:
    """Give the new database the live one's settings, grants, connection limit and comment; return a
    warning for each that could not be carried over."""
    warnings = []
    with _connect(settings, maintenance_db) as admin:
        for statement in _carry_over_statements(admin, live, new):
            try:
                admin.execute(statement)
            except psycopg.Error as exc:
                text = statement.as_string(admin)
                warnings.append(f"not carried over to the restored database, apply by hand: {text} ({exc})")
    for warning in warnings:
        logger.warning(warning)
    return warnings


def _carry_over_statements(admin: psycopg.Connection, live: str, new: str) -> list[sql.Composed]:
    target = sql.Identifier(new)
    limit, comment, has_acl = admin.execute(
        "SELECT datconnlimit, shobj_description(oid, 'pg_database'), datacl IS NOT NULL "
        "FROM pg_database WHERE datname = %s",
        [live],
    ).fetchone()
    statements = []
    if limit != -1:
        statements.append(
            sql.SQL("ALTER DATABASE {} WITH CONNECTION LIMIT {}").format(target, sql.Literal(limit))
        )
    if comment is not None:
        statements.append(sql.SQL("COMMENT ON DATABASE {} IS {}").format(target, sql.Literal(comment)))
    if has_acl:
        statements.append(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(target))
    for privilege, grantee, grantable in admin.execute(ACL_QUERY, [live]).fetchall():
        option = sql.SQL(" WITH GRANT OPTION" if grantable else "")
        statements.append(
            sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                sql.SQL(privilege), target, sql.SQL(grantee), option
            )
        )
    statements += [
        setting_statement(new, role, s) for role, s in admin.execute(SETTINGS_QUERY, [live]).fetchall()
    ]
    return statements


def _swap(settings: Settings, maintenance_db: str, target: str, new: str, stamp: str) -> str | None:
    """Put ``new`` in place of ``target``; return the name the replaced database now has (None if
    there was none). On failure the target takes connections again, unchanged."""
    previous = derived_name(target, "before", stamp)
    with _connect(settings, maintenance_db) as admin:
        exists = _database_row(admin, target) is not None
        try:
            _allow_connections(admin, new, False)
            if exists:
                _allow_connections(admin, target, False)
            _rename(admin, settings, target, new, previous if exists else None)
        except BaseException as exc:
            if exists and not _reallow(settings, maintenance_db, target) and isinstance(exc, Exception):
                raise PermanentError(
                    f"{exc}; and {_where(settings, target)} still refuses connections: run "
                    f'ALTER DATABASE "{target}" WITH ALLOW_CONNECTIONS true'
                ) from exc
            raise
    previous = previous if exists else None
    logger.info("swapped %s in (the replaced database: %s)", _where(settings, target), previous)
    return previous


def _rename(
    admin: psycopg.Connection, settings: Settings, target: str, new: str, previous: str | None
) -> None:
    """End the sessions on both databases, then rename and re-allow connections in one transaction."""
    for attempt in range(RENAME_ATTEMPTS):
        _end_sessions(admin, settings, [target, new])
        try:
            with admin.transaction():
                if previous is not None:
                    _rename_one(admin, target, previous)
                    _allow_connections(admin, previous, True)
                _rename_one(admin, new, target)
                _allow_connections(admin, target, True)
            return
        except psycopg.errors.ObjectInUse:  # a session came back between the two steps
            if attempt == RENAME_ATTEMPTS - 1:
                raise


def _end_sessions(admin: psycopg.Connection, settings: Settings, names: list[str]) -> None:
    deadline = time.monotonic() + SESSION_END_TIMEOUT
    while admin.execute(END_SESSIONS, [names]).fetchone()[0]:
        if time.monotonic() > deadline:
            raise TransientError(
                f"sessions on {_where(settings, names[0])} did not end within "
                f"{SESSION_END_TIMEOUT:.0f} s; try again"
            )
        time.sleep(0.1)


def _rename_one(admin: psycopg.Connection, old: str, new: str) -> None:
    admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))


def _allow_connections(admin: psycopg.Connection, name: str, allow: bool) -> None:
    statement = sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}")
    admin.execute(statement.format(sql.Identifier(name), sql.SQL("true" if allow else "false")))


def _reallow(settings: Settings, maintenance_db: str, name: str) -> bool:
    try:
        with _connect(settings, maintenance_db) as admin:
            _allow_connections(admin, name, True)
        return True
    except BackupError as exc:
        logger.error("could not re-allow connections to %s: %s", _where(settings, name), exc)
        return False


def _drop_quietly(settings: Settings, maintenance_db: str, name: str, cause: BaseException) -> None:
    try:
        with _connect(settings, maintenance_db) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        logger.info("dropped %s after a failed restore", _where(settings, name))
    except BackupError as exc:
        note = f"the partly restored {_where(settings, name)} could not be dropped ({exc}): drop it by hand"
        logger.error(note)
        cause.add_note(note)


def _drop_previous(settings: Settings, maintenance_db: str, name: str) -> list[str]:
    try:
        with _connect(settings, maintenance_db) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        return []
    except BackupError as exc:
        return [f"the replaced database {name} could not be dropped ({exc}): drop it by hand"]


def _count_tables(conn: psycopg.Connection) -> list[tuple[str, int, bool]]:
    conn.isolation_level, conn.read_only = psycopg.IsolationLevel.REPEATABLE_READ, True
    with conn.transaction():
        tables = conn.execute(TABLES_QUERY).fetchall()
        count = sql.SQL("SELECT count(*) FROM {}.{}")
        return [
            (
                name,
                conn.execute(count.format(sql.Identifier(schema), sql.Identifier(rel))).fetchone()[0],
                member,
            )
            for schema, rel, name, member in tables
        ]


def _database_row(admin: psycopg.Connection, name: str) -> dict | None:
    row = admin.execute(DATABASE_QUERY, [name]).fetchone()
    return row[0] if row else None


@contextlib.contextmanager
def _connect(settings: Settings, dbname: str) -> Iterator[psycopg.Connection]:
    """Connect as DB_USER (password as a parameter, never in argv); errors become ours."""
    password = settings.db_password.get_secret_value() if settings.db_password else None
    try:
        conn = psycopg.connect(
            host=settings.db_host,
            port=settings.db_port,
            user=settings.db_user,
            password=password,
            dbname=dbname,
            connect_timeout=settings.db_connect_timeout,
            application_name=APPLICATION_NAME,
            autocommit=True,
        )
    except psycopg.Error as exc:
        raise _failure(settings, dbname, str(exc)) from None
    try:
        with conn:
            yield conn
    except psycopg.Error as exc:
        detail = f" ({exc.diag.message_detail})" if exc.diag.message_detail else ""
        raise _failure(settings, dbname, f"{exc}{detail}", sqlstate=exc.sqlstate) from None


def _failure(
    settings: Settings, dbname: str, text: str, sqlstate: str | None = None, summary: str | None = None
) -> BackupError:
    """Given an error's text, return a PermanentError naming what DB_USER lacks when it is about
    privileges, a TransientError when a retry may help, else a PermanentError."""
    text = redact(text.strip(), settings.secret_values())
    summary = summary or _last_lines(text)
    where, user = _where(settings, dbname), settings.db_user
    for pattern, hint in _HINTS:
        match = re.search(pattern, text)
        if match:
            fix = hint.format(*match.groups(), user=user)
            fix += "" if "superuser" in hint else ", or restore as a superuser"
            return PermanentError(f"{where}: DB_USER {user} {fix} ({summary})")
    if sqlstate in TRANSIENT_STATES or isinstance(classify_pg_error(text, settings), TransientError):
        return TransientError(f"{where}: {summary}")
    return PermanentError(f"{where}: {summary}")


def _where(settings: Settings, dbname: str) -> str:
    return f"PostgreSQL {settings.db_host}:{settings.db_port}/{dbname}"


def _scoped(settings: Settings, dbname: str) -> Settings:
    return settings.model_copy(update={"db_name": dbname})


def _last_lines(text: str, count: int = 4) -> str:
    return " | ".join(line.strip() for line in text.splitlines()[-count:] if line.strip())
