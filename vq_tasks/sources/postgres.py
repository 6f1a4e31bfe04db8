"""PostgreSQL: a plain SQL dump by ``pg_dump``, streamed from its stdout; facts read on the way.

pg_dump is found, given its environment and its errors classified by clients/pg_tools.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
from collections.abc import Iterator

from vq_tasks.clients.pg_tools import STDERR_KEPT, classify_pg_error, pg_environment, pg_tool
from vq_tasks.clients.sql_dump import SqlDumpInspector
from vq_tasks.errors import TransientError
from vq_tasks.manifest import DatabaseFacts
from vq_tasks.settings import Settings
from vq_tasks.streams.stages import TapStage, Writer, pump

PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def dump_database(settings: Settings, out: Writer) -> DatabaseFacts:
    """Stream a plain SQL dump (schema and data) of DB_NAME into ``out`` and return its facts.
    Raise TransientError when the server may come back, PermanentError otherwise."""
    inspector = SqlDumpInspector()
    argv = [pg_tool(settings, "pg_dump"), "--format=plain", "--no-password", "--dbname", settings.db_name]
    with _pg_dump_process(argv, pg_environment(settings)) as (process, stderr):
        assert process.stdout is not None
        pump(process.stdout, TapStage(out, inspector.feed))
        returncode = process.wait()
    if returncode != 0:
        raise classify_pg_error(stderr.decode("utf-8", "replace"), settings)
    if not inspector.complete:
        raise TransientError("pg_dump exited without its closing line: the dump is incomplete")
    return DatabaseFacts(
        database=settings.db_name,
        server_version=inspector.server_version,
        pg_dump_version=inspector.pg_dump_version,
        tables=inspector.tables,
        complete=True,
    )


@contextlib.contextmanager
def _pg_dump_process(
    argv: list[str], env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[bytes], bytearray]]:
    """Run pg_dump with a large stdout pipe; collect stderr in a file (no deadlock on chatter).
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
