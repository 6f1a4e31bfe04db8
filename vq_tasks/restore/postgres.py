"""Restore a plain SQL dump into PostgreSQL without ever leaving the live database half restored.

The dump is loaded (postgres_parallel.py: over BACKUP_RESTORE_JOBS connections, split by its TOC;
one psql session if its TOC cannot be read with certainty) into a new database
``<DB_NAME>_restore_<YYYYMMDDHHMMSS>`` (template0, the live database's encoding and locale; with no
live database, the dump's encoding) and its rows per table are checked against the backup's. Only
then, connected to the maintenance database, are the names swapped: both databases stop taking
connections, their sessions are ended, and one transaction renames the live one to
``<DB_NAME>_before_<stamp>``, the new one to ``<DB_NAME>`` and lets both take connections again.
Whatever fails before that transaction commits drops the new database and leaves the live one as it
was. What a dump of a database's contents does not hold (its settings, grants, connection limit and
comment) is carried over from the live database.

Here: the public functions, creating the new database, loading and checking it. The swap and the
carry-over are in postgres_swap.py, the role scan of a dump in postgres_roles.py, connections and
errors in postgres_connect.py.

The dump's bytes are the database's own, in its encoding (pg_dump's ``SET client_encoding`` line):
each loading session runs that line first and sends them unconverted into a database in that
encoding, so a SQL_ASCII or LATIN1 database comes back byte for byte. The connections that check
and swap carry only names (clients/pg_connect.connect).

The dump may not be what the manifest says: before anything is created it must be a complete plain
dump by pg_dump (its header and closing line). No backslash command in it runs, so a forged dump
cannot reach the worker's shell (``\\!``) or files (``\\o``, ``\\copy``): the parallel load sends
SQL to the server, which rejects one; psql runs it in restricted mode under a key of our own
(``\\restrict``, psql 13.22, 14.19, 15.14, 16.10, 17.6 or newer, required before anything is
created), the dump's own ``\\restrict``/``\\unrestrict`` lines (pg_dump's, with its key) made comments.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import psycopg
from psycopg import sql
from pydantic import BaseModel, Field

from vq_tasks.clients.pg_connect import connect, db_where
from vq_tasks.clients.pg_tools import pg_tool
from vq_tasks.clients.sql_dump import HEADER_LIMIT, dump_encoding
from vq_tasks.errors import PermanentError
from vq_tasks.restore.contents import check_sql_dump
from vq_tasks.restore.postgres_connect import database_row
from vq_tasks.restore.postgres_globals import RolesPlan, create_roles, plan_roles
from vq_tasks.restore.postgres_load import NO_RESTRICT, knows_restrict
from vq_tasks.restore.postgres_parallel import LoadReport, load_dump
from vq_tasks.restore.postgres_swap import (
    carry_over,
    derived_name,
    drop_left_over,
    drop_previous,
    drop_quietly,
    swap_in,
)
from vq_tasks.settings import Settings

logger = logging.getLogger(__name__)


MAINTENANCE_DB = "postgres"


TABLES_QUERY = r"""SELECT n.nspname, c.relname, format('%I.%I', n.nspname, c.relname),
  EXISTS (SELECT FROM pg_depend e
          WHERE e.classid = 'pg_class'::regclass AND e.objid = c.oid AND e.deptype = 'e')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema' ORDER BY 3"""


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
    roles_created: list[str] = Field(
        default_factory=list, description="roles created from globals.sql: the server lacked them"
    )
    jobs: int = Field(1, description="connections the dump was loaded over")
    split_by_toc: bool = Field(
        True, description="loaded by TOC entries in parallel; false: one psql session (the log says why)"
    )
    phases: dict[str, float] = Field(default_factory=dict, description="seconds spent in each phase")


class DatabaseRestorePlan(BaseModel):
    database: str
    exists: bool
    tables: dict[str, int] = Field(description="rows per table now in the database")
    expected_tables: dict[str, int] = Field(description="rows per table in the backup")
    only_in_database: list[str] = Field(description="tables the restore would remove")
    only_in_backup: list[str] = Field(description="tables the restore would add")
    roles: RolesPlan | None = Field(None, description="the roles of globals.sql it would create")


def restore_database(
    settings: Settings,
    sql_path: str | os.PathLike[str],
    expected_tables: Mapping[str, int],
    target_db: str | None = None,
    swap: bool = True,
    keep_previous: bool = True,
    maintenance_db: str = MAINTENANCE_DB,
    now: datetime | None = None,
    globals_path: Path | None = None,
) -> DatabaseRestoreResult:
    """Given a plain SQL dump and the backup's rows per table, load it into a new database, check it
    and put it in place of ``target_db`` (default DB_NAME), keeping the replaced one as
    ``<name>_before_<stamp>`` unless not ``keep_previous``; without ``swap``, load it straight into a
    new database ``target_db`` (a drill). Return what was restored. Raise PermanentError or
    TransientError, the new database dropped and the target as it was, if any step before the swap fails.
    With ``swap``, call it under the restore lock: the new databases of killed restores go first.
    Given the backup's ``globals_path``, the roles it defines that the server lacks are created
    before the load (postgres_globals.py), and stay if the restore fails."""
    started = time.monotonic()
    path = _readable(Path(sql_path))
    check_sql_dump(path)  # before anything is created
    if not knows_restrict(pg_tool(settings, "psql")):
        raise PermanentError(NO_RESTRICT.format(psql=pg_tool(settings, "psql")))
    target = target_db or settings.db_name
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    new = derived_name(target, "restore", stamp) if swap else target
    with path.open("rb") as dump:
        encoding = dump_encoding(dump.read(HEADER_LIMIT))
    left = drop_left_over(settings, maintenance_db, target, "restore") if swap else []
    live = _prepare(settings, maintenance_db, target, new, swap, encoding)
    try:
        roles, warnings = create_roles(settings, maintenance_db, globals_path) if globals_path else ([], [])
        counts, load = _load_and_check(settings, path, new, expected_tables, maintenance_db, encoding)
        warnings += carry_over(settings, maintenance_db, target, new) if live and swap else []
        previous = swap_in(settings, maintenance_db, target, new, stamp) if swap else None
    except BaseException as exc:
        drop_quietly(settings, maintenance_db, new, exc)
        raise
    warnings += [f"dropped {name}, left by a restore that was killed" for name in left]
    if previous and not keep_previous:
        problems = drop_previous(settings, maintenance_db, previous)
        warnings += problems
        previous = previous if problems else None
    logger.info("restored %s into %s (previous: %s)", path.name, db_where(settings, target), previous)
    return DatabaseRestoreResult(
        database=target,
        previous_name=previous,
        swapped=swap,
        tables=sorted(counts),
        row_counts=counts,
        duration_seconds=round(time.monotonic() - started, 3),
        warnings=warnings,
        roles_created=roles,
        jobs=load.jobs,
        split_by_toc=load.split_by_toc,
        phases=load.phases,
    )


def plan_database_restore(
    settings: Settings,
    expected_tables: Mapping[str, int],
    target_db: str | None = None,
    maintenance_db: str = MAINTENANCE_DB,
    globals_path: Path | None = None,
) -> DatabaseRestorePlan:
    """Given the backup's rows per table, return what a restore would replace: whether the target
    (default DB_NAME) exists and its tables and rows now, and the roles of ``globals_path`` it would
    create. Change nothing (read-only). Raise
    TransientError or PermanentError when PostgreSQL cannot answer."""
    target = target_db or settings.db_name
    with connect(settings, maintenance_db) as admin:
        exists = database_row(admin, target) is not None
    current = database_row_counts(settings, target) if exists else {}
    expected = dict(expected_tables)
    return DatabaseRestorePlan(
        database=target,
        exists=exists,
        tables=current,
        expected_tables=expected,
        only_in_database=sorted(current.keys() - expected.keys()),
        only_in_backup=sorted(expected.keys() - current.keys()),
        roles=plan_roles(settings, maintenance_db, globals_path) if globals_path else None,
    )


def database_row_counts(settings: Settings, dbname: str | None = None) -> dict[str, int]:
    """Given settings and a database (default DB_NAME), return rows per table keyed as pg_dump names
    tables in its COPY statements (``public.tickets``, ``public."Weird Name"``): ordinary tables and
    partitions, not partitioned parents nor tables of extensions; count(*) in one read-only snapshot.
    Raise TransientError or PermanentError."""
    with connect(settings, dbname or settings.db_name) as conn:
        return {name: rows for name, rows, member in _count_tables(conn) if not member}


def locale_options(database: Mapping[str, Any]) -> list[sql.Composable]:
    """Given a pg_database row (as JSON, with ``encoding_name``), return the CREATE DATABASE options
    that give a new database the same encoding, collation and locale provider."""
    options: list[sql.Composable] = [
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


def new_database_options(template: Mapping[str, Any], encoding: str | None) -> list[sql.Composable]:
    """Given template0's pg_database row (as JSON) and the dump's encoding (None if it names none),
    return the CREATE DATABASE options of a new database with no live one to copy them from (a
    drill, or a live database gone): none when template0 has the dump's encoding, else that encoding
    with the C locale (libc), which accepts every encoding (a plain dump records no locale). Why:
    psql loads the dump's bytes unconverted only into a database in their encoding; into the
    server's default (UTF8, say), a SQL_ASCII dump's bytes beyond ASCII fail, a LATIN1 one's are recoded."""
    if encoding is None or template["encoding_name"] == encoding:
        return []
    options: list[sql.Composable] = [
        sql.SQL("ENCODING {}").format(sql.Literal(encoding)),
        sql.SQL("LC_COLLATE 'C' LC_CTYPE 'C'"),
    ]
    if template.get("datlocprovider", "c") != "c":  # PostgreSQL 15+: else template0's ICU or builtin
        options.append(sql.SQL("LOCALE_PROVIDER libc"))
    return options


def _readable(path: Path) -> Path:
    if not path.is_file() or not os.access(path, os.R_OK):
        raise PermanentError(f"SQL dump {path} is not a readable file on this worker")
    return path.resolve()


def _prepare(
    settings: Settings, maintenance_db: str, target: str, new: str, swap: bool, encoding: str | None
) -> dict | None:
    """Check that the restore may go ahead and create the new database (in the live one's encoding and
    locale, or the dump's ``encoding``); return the live one's row."""
    with connect(settings, maintenance_db) as admin:
        live = database_row(admin, target)
        if live is not None and not swap:
            raise PermanentError(
                f"{db_where(settings, target)} already exists: a restore without swap only loads into a new "
                "database; drop it or name another"
            )
        _check_privileges(admin, settings, target if live else None, maintenance_db)
        options = [
            sql.SQL("OWNER {}").format(sql.Identifier(settings.db_user)),
            sql.SQL("TEMPLATE template0"),
        ]
        if live:
            options += locale_options(live)
        else:
            options += new_database_options(cast(dict, database_row(admin, "template0")), encoding)
        logger.info("creating database %s", db_where(settings, new))
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
    superuser, createdb, owns, owner = cast(tuple[Any, ...], row)  # current_user is always in pg_roles
    user, where = settings.db_user, db_where(settings, live or maintenance_db)
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
    settings: Settings,
    path: Path,
    dbname: str,
    expected: Mapping[str, int],
    maintenance_db: str,
    encoding: str | None = None,
) -> tuple[dict[str, int], LoadReport]:
    """Load the dump (in ``encoding``) into ``dbname`` (postgres_parallel.py), then compare rows
    per table; return them and how the dump was loaded."""
    load = load_dump(settings, path, dbname, maintenance_db, encoding)
    started = time.monotonic()
    with connect(settings, dbname) as conn:
        tables = _count_tables(conn)
    load.phases["check"] = round(time.monotonic() - started, 3)
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
        raise PermanentError(f"restored {db_where(settings, dbname)} does not match the backup: {shown}")
    return counts, load


def _count_tables(conn: psycopg.Connection) -> list[tuple[str, int, bool]]:
    conn.isolation_level, conn.read_only = psycopg.IsolationLevel.REPEATABLE_READ, True
    with conn.transaction():
        tables = conn.execute(TABLES_QUERY).fetchall()
        count = sql.SQL("SELECT count(*) FROM ONLY {}.{}")  # an inheritance parent's own rows, as dumped
        return [
            (
                name,
                cast(  # count(*) always returns a row
                    tuple[Any, ...],
                    conn.execute(count.format(sql.Identifier(schema), sql.Identifier(rel))).fetchone(),
                )[0],
                member,
            )
            for schema, rel, name, member in tables
        ]
