"""Put a restored and checked database in place of the live one, or drop it.

What: the names (``<DB_NAME>_restore_<stamp>``, ``<DB_NAME>_before_<stamp>``), the carry-over of what
a dump of a database's contents does not hold (settings, grants, connection limit, comment), the
swap, and the drops. Why apart: this is the only part that changes the live database, and it does
so in one rename transaction: a failure, or the restore killed, before the commit changes nothing.
The new database of a killed restore is dropped by the next restore (drop_left_over).
"""

from __future__ import annotations

import logging
import re
from typing import Any, cast

import psycopg
from psycopg import sql

from vq_tasks.clients.pg_connect import connect, db_where
from vq_tasks.errors import BackupError, TransientError
from vq_tasks.restore.postgres_connect import database_row
from vq_tasks.settings import Settings

logger = logging.getLogger(__name__)

STAMP_DIGITS = 14  # YYYYMMDDHHMMSS, the stamp of derived names
NAME_LIMIT = 63  # bytes (NAMEDATALEN - 1): PostgreSQL cuts longer names silently
LOCK_TIMEOUT = 30.0  # seconds the swap waits for another session's lock on a database
RENAME_ATTEMPTS = 3
LIST_SETTINGS = {"search_path", "temp_tablespaces", "local_preload_libraries", "session_preload_libraries"}
ACL_QUERY = """SELECT a.privilege_type,
  CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.is_grantable
FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = %s"""
SETTINGS_QUERY = """SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE s.setrole::regrole::text END, c.setting
FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase, unnest(s.setconfig) c(setting)
WHERE d.datname = %s ORDER BY s.setrole"""
END_SESSIONS = """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = ANY(%s)
  AND pid <> pg_backend_pid() AND backend_type IS DISTINCT FROM 'autovacuum worker'"""


def derived_name(base: str, kind: str, stamp: str) -> str:
    """Given a database name, a kind (``restore``, ``before``) and a stamp, return
    ``<base>_<kind>_<stamp>``, the base shortened so that the whole fits in PostgreSQL's 63 bytes."""
    suffix = f"_{kind}_{stamp}"
    room = NAME_LIMIT - len(suffix.encode())
    return base.encode()[:room].decode("utf-8", "ignore") + suffix


def left_over(names: list[str], base: str, kind: str) -> list[str]:
    """Given database names, return those derived_name makes for ``base`` and ``kind`` with any
    stamp (``<base>_<kind>_<14 digits>``): the scratch databases of restores or drills of ``base``."""
    prefix = derived_name(base, kind, "0" * STAMP_DIGITS)[:-STAMP_DIGITS]
    pattern = re.compile(re.escape(prefix) + rf"\d{{{STAMP_DIGITS}}}")
    return [name for name in names if pattern.fullmatch(name)]


def scratch_databases(admin: psycopg.Connection, base: str, kind: str) -> list[str]:
    """Given a connection, return the databases named ``<base>_<kind>_<stamp>`` (left_over). Only
    names with their prefix are read: another database's name on a SQL_ASCII server may be bytes
    that are not UTF-8, which the connection (client_encoding UTF8) would refuse to read."""
    prefix = derived_name(base, kind, "0" * STAMP_DIGITS)[:-STAMP_DIGITS]
    query = "SELECT datname FROM pg_database WHERE starts_with(datname, %s)"
    return left_over([row[0] for row in admin.execute(query, [prefix]).fetchall()], base, kind)


def drop_left_over(settings: Settings, maintenance_db: str, base: str, kind: str) -> list[str]:
    """Drop the scratch databases ``<base>_<kind>_<stamp>`` that killed runs left; return their names.
    Call only under the restore lock, which tells that no restore or drill runs that would still use
    one. Raise TransientError or PermanentError as connect does."""
    with connect(settings, maintenance_db) as admin:
        dropped = scratch_databases(admin, base, kind)
        for name in dropped:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            logger.warning("dropped %s, left by a %s that was killed", db_where(settings, name), kind)
    return dropped


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


def carry_over(settings: Settings, maintenance_db: str, live: str, new: str) -> list[str]:
    """Give the new database the live one's owner, settings, grants, connection limit and comment;
    return a warning for each that could not be carried over."""
    warnings = []
    with connect(settings, maintenance_db) as admin:
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
    row = admin.execute(
        "SELECT datdba::regrole::text, datconnlimit, shobj_description(oid, 'pg_database'), "
        "datacl IS NOT NULL FROM pg_database WHERE datname = %s",
        [live],
    ).fetchone()
    owner, limit, comment, has_acl = cast(tuple[Any, ...], row)  # the live database: it exists
    # the owner first: on PostgreSQL 15+ the public schema follows it, and the application's rights
    statements = [sql.SQL("ALTER DATABASE {} OWNER TO {}").format(target, sql.SQL(owner))]
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


def swap_in(settings: Settings, maintenance_db: str, target: str, new: str, stamp: str) -> str | None:
    """Put ``new`` in place of ``target``; return the name the replaced database now has (None if
    there was none). One transaction does it all, so a failure, or this process killed, before the
    commit leaves the target as it was and taking connections (only its sessions ended)."""
    previous: str | None = derived_name(target, "before", stamp)
    with connect(settings, maintenance_db) as admin:
        exists = database_row(admin, target) is not None
        _rename(admin, settings, target, new, previous if exists else None)
    previous = previous if exists else None
    logger.info("swapped %s in (the replaced database: %s)", db_where(settings, target), previous)
    return previous


def _rename(
    admin: psycopg.Connection, settings: Settings, target: str, new: str, previous: str | None
) -> None:
    """In one transaction: end the sessions on both databases, rename, and let the target take
    connections. Why no ALLOW_CONNECTIONS false first: committed on its own, it outlives a killed
    restore. RENAME takes the database's lock, which a new session waits for and then finds the
    name moved on; a session that slipped in before it makes RENAME fail (ObjectInUse, after
    PostgreSQL waited 5 s for it to go), and the whole transaction is tried again."""
    for attempt in range(RENAME_ATTEMPTS):
        try:
            with admin.transaction():
                admin.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{LOCK_TIMEOUT}s")))
                admin.execute(END_SESSIONS, [[target, new]])
                if previous is not None:
                    _rename_one(admin, target, previous)
                _rename_one(admin, new, target)
                _allow_connections(admin, target, True)
            return
        except psycopg.errors.ObjectInUse:  # a session came in before the rename's lock
            if attempt == RENAME_ATTEMPTS - 1:
                raise TransientError(
                    f"sessions on {db_where(settings, target)} kept coming back during the swap, which was"
                    f" tried {RENAME_ATTEMPTS} times; stop the application's connections and try again"
                ) from None
        except psycopg.errors.LockNotAvailable:
            raise TransientError(
                f"another session holds a lock on {db_where(settings, target)} (such as an open "
                f"ALTER or COMMENT ON DATABASE): the swap waited {LOCK_TIMEOUT:.0f} s; try again"
            ) from None


def _rename_one(admin: psycopg.Connection, old: str, new: str) -> None:
    admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))


def _allow_connections(admin: psycopg.Connection, name: str, allow: bool) -> None:
    statement = sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}")
    admin.execute(statement.format(sql.Identifier(name), sql.SQL("true" if allow else "false")))


def drop_quietly(settings: Settings, maintenance_db: str, name: str, cause: BaseException) -> None:
    try:
        with connect(settings, maintenance_db) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        logger.info("dropped %s after a failed restore", db_where(settings, name))
    except BackupError as exc:
        note = f"the partly restored {db_where(settings, name)} could not be dropped ({exc}): drop it by hand"
        logger.error(note)
        cause.add_note(note)


def drop_previous(settings: Settings, maintenance_db: str, name: str) -> list[str]:
    try:
        with connect(settings, maintenance_db) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        return []
    except BackupError as exc:
        return [f"the replaced database {name} could not be dropped ({exc}): drop it by hand"]
