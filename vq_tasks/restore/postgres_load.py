"""Load a plain SQL dump into a database with psql: streamed through its stdin, in one transaction,
stopping at the first error, in restricted mode under a key of our own (``\\restrict``), so that no
backslash command in the dump runs; pg_dump's own restrict lines become comments on the way."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import subprocess
import tempfile
from pathlib import Path

from vq_tasks.clients.pg_connect import db_where
from vq_tasks.clients.pg_tools import STDERR_KEPT, pg_environment, pg_tool
from vq_tasks.clients.sql_dump import DUMP_KEY, HEADER_LIMIT, python_codec
from vq_tasks.errors import PermanentError
from vq_tasks.restore.leftovers import die_with_parent
from vq_tasks.restore.postgres_connect import psql_failure
from vq_tasks.restore.postgres_roles import missing_roles_error
from vq_tasks.settings import Settings
from vq_tasks.streams.stages import CHUNK_SIZE

logger = logging.getLogger(__name__)
NO_RESTRICT = (
    "{psql} cannot run a dump in restricted mode (\\restrict: psql 13.22, 14.19, 15.14, 16.10, 17.6 or"
    " newer), without which a dump could run shell commands on this worker: set PG_BIN_DIR to a newer"
    " PostgreSQL client; nothing was changed"
)


def run_psql(
    settings: Settings, path: Path, dbname: str, maintenance_db: str, encoding: str | None = None
) -> None:
    """Run psql on the file, streamed through its stdin (pg_dump's own restrict lines made comments),
    in restricted mode under a new random key: one transaction, stop at the first error. psql starts
    in the database's encoding (no PGCLIENTENCODING; it takes the locale's only on a terminal) and
    the dump's ``SET client_encoding`` line makes it the dump's: no byte is recoded when the two are
    the same. The server's errors then come in the dump's ``encoding``, read so."""
    psql = pg_tool(settings, "psql")
    if not knows_restrict(psql):
        raise PermanentError(NO_RESTRICT.format(psql=psql))
    argv = [psql, "-X", "--quiet", "--no-password", "-v", "ON_ERROR_STOP=1", "--single-transaction"]
    argv += ["-c", f"\\restrict {secrets.token_hex(24)}", "-f", "-"]
    env = pg_environment(_scoped(settings, dbname))  # the name through PGDATABASE: never parsed as conninfo
    logger.info("loading %s into %s", path.name, db_where(settings, dbname))
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            env=env,
            preexec_fn=die_with_parent(),  # killed with us: its transaction rolls back
        )
        try:
            feed_dump(path, process.stdin)
            returncode = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        if returncode == 0:
            return
        errors.seek(max(0, errors.seek(0, os.SEEK_END) - STDERR_KEPT))
        stderr = errors.read().decode(python_codec(encoding), "replace")
    error, missing = psql_failure(settings, stderr, dbname, path.name)
    if missing:
        error = missing_roles_error(settings, maintenance_db, path, missing)
    raise error


@functools.lru_cache(maxsize=8)
def knows_restrict(psql: str) -> bool:
    """Return whether this psql has ``\\restrict`` (its list of backslash commands names it)."""
    try:
        listed = subprocess.run(
            [psql, "--help=commands"], capture_output=True, timeout=30, env={"LC_ALL": "C"}, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return b"\\restrict" in listed


def feed_dump(path: Path, stdin) -> None:
    """Write the dump at ``path`` to psql's ``stdin`` in chunks, and close it; the lines
    ``\\restrict KEY`` and ``\\unrestrict KEY`` with the key of the dump's header become comments
    (line numbers stay). Stop quietly if psql has exited (its error is what counts)."""
    with open(path, "rb") as dump:
        head = dump.read(HEADER_LIMIT)
        found = DUMP_KEY.search(head)
        key = found.group(1) if found else None
        needles = [b"\n\\restrict " + key, b"\n\\unrestrict " + key] if key else []
        keep = max((len(n) for n in needles), default=1) - 1
        carry, chunk = b"", head
        try:
            while chunk:
                data = carry + chunk
                for needle in needles:
                    data = data.replace(needle, b"\n-- " + needle[1:])
                cut = max(0, len(data) - keep)
                stdin.write(data[:cut])
                carry, chunk = data[cut:], dump.read(CHUNK_SIZE)
            stdin.write(carry)
        except BrokenPipeError:
            pass
        finally:
            with contextlib.suppress(OSError):
                stdin.close()


def _scoped(settings: Settings, dbname: str) -> Settings:
    return settings.model_copy(update={"db_name": dbname})
