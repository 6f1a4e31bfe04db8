"""globals.sql: the server's roles, by ``pg_dumpall --roles-only``, for a restore onto a server that
lacks them (a database dump names its roles as owners and grantees, but does not define them).

The password hashes come along where DB_USER may read pg_authid (a superuser); elsewhere (a managed
service's admin user, any user that is not a superuser) pg_dumpall runs with
``--no-role-passwords``, and the facts say so. Which one is asked of the server first, not read
from an error: the server's messages may be in any language. The output streams through to the
staged member, read on the way (one tap) for the names of the roles it creates and its closing line.
"""

from __future__ import annotations

from dataclasses import dataclass

from vq_tasks.clients.globals_sql import GlobalsReader
from vq_tasks.clients.pg_connect import connect
from vq_tasks.clients.pg_tools import classify_pg_error, pg_environment, pg_tool
from vq_tasks.errors import TransientError
from vq_tasks.settings import Settings
from vq_tasks.sources.postgres import pg_dump_process
from vq_tasks.streams.stages import TapStage, Writer, pump

PASSWORDS_READABLE = "SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT')"


@dataclass(frozen=True)
class RolesDump:
    roles: list[str]  # the roles globals.sql creates
    passwords: bool  # whether it holds their password hashes


def dump_globals(settings: Settings, out: Writer) -> RolesDump:
    """Write the roles of DB_HOST's server, as ``pg_dumpall --roles-only`` gives them, into ``out``;
    return which roles and whether with passwords. Raise TransientError or PermanentError."""
    with connect(settings, settings.db_name) as conn:
        row = conn.execute(PASSWORDS_READABLE).fetchone()
    passwords = bool(row and row[0])
    argv = [pg_tool(settings, "pg_dumpall"), "--roles-only", "--no-password", "-l", settings.db_name]
    argv += [] if passwords else ["--no-role-passwords"]
    reader = GlobalsReader()
    with pg_dump_process(argv, pg_environment(settings)) as (process, stderr):
        assert process.stdout is not None
        pump(process.stdout, TapStage(out, reader.feed))
        returncode = process.wait()
    if returncode != 0:
        error = classify_pg_error(stderr.decode("utf-8", "replace"), settings)
        raise type(error)(f"pg_dumpall --roles-only: {error}")
    if not reader.complete:
        raise TransientError("pg_dumpall --roles-only exited without its closing line: roles incomplete")
    return RolesDump(list(reader.close().roles), passwords)
