"""PostgreSQL: a plain SQL dump by ``pg_dump``, streamed from its stdout; facts read on the way.

pg_dump is found, given its environment and its errors classified by clients/pg_tools.py. pg_dump
stops at the first object DB_USER may not read: then one query, as DB_USER, lists them all, so that
one message names every object and the privilege each lacks (not only the first). What pg_dump warns
it left out (subscriptions, for a user that is not a superuser) goes into the facts' ``skipped``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator

from vq_tasks.clients.pg_connect import connect, db_where
from vq_tasks.clients.pg_tools import (
    NAMES_SHOWN,
    STDERR_KEPT,
    Unreadable,
    access_denied,
    access_error,
    classify_pg_error,
    dump_warnings,
    pg_environment,
    pg_tool,
)
from vq_tasks.clients.sql_dump import SqlDumpInspector
from vq_tasks.errors import BackupError, TransientError
from vq_tasks.manifest import DatabaseFacts
from vq_tasks.settings import Settings
from vq_tasks.streams.stages import TapStage, Writer, pump

logger = logging.getLogger(__name__)

PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
LISTING_TIMEOUT = "60s"  # the listing reads catalogs only; it must never hold up the error
# What pg_dump reads and DB_USER may not, by kind: relations whose data it dumps (tables, partitioned
# tables, sequences; not extension members, unless extension configuration tables; not pg_catalog,
# information_schema, pg_toast or temporary schemas), their schemas, tables whose row-level security
# applies to DB_USER (pg_dump sets row_security off, so such a COPY fails), and large objects. The
# first NAMES_SHOWN names of each kind and how many there are in all.
UNREADABLE_QUERY = """
WITH me AS (
  SELECT rolsuper, rolsuper OR rolbypassrls AS bypassrls FROM pg_roles WHERE rolname = current_user
),
dumped AS (
  SELECT c.oid, c.relkind, c.relnamespace, c.relowner, c.relrowsecurity, c.relforcerowsecurity,
         format('%I.%I', n.nspname, c.relname) AS name
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'S') AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
    AND (NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                     AND d.deptype = 'e')
         OR c.oid IN (SELECT unnest(extconfig) FROM pg_extension))
),
found (kind, name, number) AS (
  SELECT 'schema', format('%I', n.nspname), 0::bigint FROM pg_namespace n
  WHERE NOT has_schema_privilege(n.oid, 'USAGE') AND n.oid IN (SELECT relnamespace FROM dumped)
  UNION ALL
  SELECT CASE relkind WHEN 'S' THEN 'sequence' ELSE 'table' END, name, 0 FROM dumped
  WHERE NOT has_table_privilege(oid, 'SELECT')
  UNION ALL
  SELECT 'row security', name, 0 FROM dumped
  WHERE relkind = 'r' AND relrowsecurity AND NOT (SELECT bypassrls FROM me)
    AND (relforcerowsecurity OR NOT pg_has_role(relowner, 'USAGE'))
  UNION ALL
  SELECT 'large object', l.oid::text, l.oid::bigint FROM pg_largeobject_metadata l
  WHERE NOT (SELECT rolsuper FROM me) AND NOT current_setting('lo_compat_privileges')::bool
    AND NOT ({large_object_readable})
)
SELECT kind, count(*), (array_agg(name ORDER BY number, name))[1:{shown}] FROM found GROUP BY kind
"""
# has_largeobject_privilege exists from PostgreSQL 17 on; before, the ACL is read as the server does
# (no ACL: the owner's default, which grants the owner everything)
LARGE_OBJECT_READABLE = "has_largeobject_privilege(l.oid, 'SELECT')"
LARGE_OBJECT_READABLE_BEFORE_17 = """EXISTS (
    SELECT FROM aclexplode(coalesce(l.lomacl, acldefault('L', l.lomowner))) a
    WHERE a.privilege_type = 'SELECT'
      AND CASE WHEN a.grantee = 0 THEN true ELSE pg_has_role(a.grantee, 'USAGE') END)"""


def dump_database(settings: Settings, out: Writer) -> DatabaseFacts:
    """Stream a plain SQL dump (schema and data) of DB_NAME into ``out`` and return its facts.
    Raise TransientError when the server may come back, PermanentError otherwise."""
    inspector = SqlDumpInspector()
    argv = [pg_tool(settings, "pg_dump"), "--format=plain", "--no-password", "--dbname", settings.db_name]
    with pg_dump_process(argv, pg_environment(settings)) as (process, stderr):
        assert process.stdout is not None
        pump(process.stdout, TapStage(out, inspector.feed))
        returncode = process.wait()
    text = stderr.decode("utf-8", "replace")
    if returncode != 0:
        raise _dump_failure(settings, text)
    if not inspector.complete:
        raise TransientError("pg_dump exited without its closing line: the dump is incomplete")
    return DatabaseFacts(
        database=settings.db_name,
        server_version=inspector.server_version,
        pg_dump_version=inspector.pg_dump_version,
        tables=inspector.tables,
        complete=True,
        skipped=_skipped(settings, text),
    )


def _dump_failure(settings: Settings, stderr: str) -> Exception:
    """Given pg_dump's stderr on a failure, return the error to raise: when it stopped at an object
    DB_USER may not read, one naming every such object; else classify_pg_error's."""
    stopped_at = access_denied(stderr)
    if stopped_at is None:
        return classify_pg_error(stderr, settings)
    try:
        unreadable = list_unreadable(settings)
    except BackupError as exc:  # its message is redacted (pg_connect.failure)
        logger.warning("%s: could not list what DB_USER may not read: %s", _where(settings), exc)
        unreadable = []
    if not unreadable:
        return classify_pg_error(stderr, settings)
    return access_error(settings, unreadable, stopped_at)


def list_unreadable(settings: Settings) -> list[Unreadable]:
    """Return, by kind, what pg_dump reads in DB_NAME and DB_USER may not (one query, as DB_USER).
    Raise BackupError when the query cannot run."""
    with connect(settings, settings.db_name) as conn:
        readable = (
            LARGE_OBJECT_READABLE if conn.info.server_version >= 170000 else LARGE_OBJECT_READABLE_BEFORE_17
        )
        query = UNREADABLE_QUERY.format(large_object_readable=readable, shown=NAMES_SHOWN)
        conn.execute(f"SET statement_timeout = '{LISTING_TIMEOUT}'")
        rows = conn.execute(query).fetchall()  # no parameters: its % signs are format()'s
    return [Unreadable(kind, total, tuple(names)) for kind, total, names in rows]


def _skipped(settings: Settings, stderr: str) -> list[str]:
    """Return what pg_dump warned it left out (its warnings), logged on one line."""
    skipped = dump_warnings(stderr, settings.secret_values())
    if skipped:
        logger.warning("%s: pg_dump left out: %s", _where(settings), "; ".join(skipped))
    return skipped


def _where(settings: Settings) -> str:
    return db_where(settings, settings.db_name)


@contextlib.contextmanager
def pg_dump_process(
    argv: list[str], env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[bytes], bytearray]]:
    """Run pg_dump (or pg_dumpall) with a large stdout pipe; collect stderr in a file (no deadlock).
    The process is killed if the caller fails while reading."""
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, env=env, bufsize=0)
        assert process.stdout is not None  # stdout=PIPE
        with contextlib.suppress(OSError):
            fcntl.fcntl(process.stdout.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
        collected = bytearray()
        try:
            yield process, collected
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            process.stdout.close()
        size = errors.seek(0, os.SEEK_END)
        errors.seek(max(0, size - STDERR_KEPT))  # the end says what went wrong
        collected += errors.read()
