"""Checks on the extracted files before a restore uses them: the first and last bytes of a SQL dump
or an RDB, which may not be what the manifest says. Each returns or raises a message that says what
was wrong; none of them reads more than a few KiB."""

from __future__ import annotations

from pathlib import Path

from vq_tasks.clients.rdb import HEADER_SIZE, MAGIC
from vq_tasks.clients.sql_dump import (
    CLOSING_LINE,
    DUMPED_BY,
    DUMPED_FROM,
    HEADER_LIMIT,
    OPENING_LINES,
    TAIL_LIMIT,
)
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import (
    Component,
    DatabaseFacts,
    Manifest,
    RedisFacts,
)


def sql_dump_problem(head: bytes, tail: bytes, facts: DatabaseFacts | None = None) -> str | None:
    """Given the first HEADER_LIMIT and last TAIL_LIMIT bytes of a file (and the manifest's facts of the
    dump, if known), return why it is not a complete plain dump by pg_dump, or None."""
    if not head.startswith(OPENING_LINES):
        return f"it does not start with pg_dump's header ('-- PostgreSQL database dump'): {head[:40]!r}"
    found = {}
    for what, pattern in (("server", DUMPED_FROM), ("pg_dump", DUMPED_BY)):
        match = pattern.search(head)
        if match is None:
            return f"its header lacks pg_dump's 'Dumped {'from' if what == 'server' else 'by'}' line"
        found[what] = match.group(1).decode("utf-8", "replace")
    if CLOSING_LINE not in tail:
        return "it lacks pg_dump's closing line ('-- PostgreSQL database dump complete'): incomplete"
    if facts is not None:
        for what, recorded in (("server", facts.server_version), ("pg_dump", facts.pg_dump_version)):
            if recorded != "unknown" and found[what] != recorded:
                return f"its header says {what} version {found[what]}, the manifest {recorded}"
    return None


def rdb_problem(head: bytes, rdb_version: int | None = None) -> str | None:
    """Given the first bytes of a file (and the manifest's RDB version, if known), return why it
    is not an RDB of that version, or None."""
    digits = head[len(MAGIC) : HEADER_SIZE]
    if len(head) < HEADER_SIZE or not head.startswith(MAGIC) or not digits.isdigit():
        return f"it does not start with an RDB header (REDIS and 4 digits): {head[:16]!r}"
    if rdb_version is not None and int(digits) != rdb_version:
        return f"its header says RDB version {int(digits)}, the manifest {rdb_version}"
    return None


def head_and_tail(path: Path, head: int, tail: int) -> tuple[bytes, bytes]:
    """Return the first ``head`` and the last ``tail`` bytes of a file. Raise PermanentError if
    it cannot be read."""
    try:
        with open(path, "rb") as stream:
            first = stream.read(head)
            size = stream.seek(0, 2)
            stream.seek(max(0, size - tail))
            return first, stream.read(tail)
    except OSError as exc:
        raise PermanentError(f"cannot read {path}: {exc.strerror or exc}") from None


def check_sql_dump(path: Path, facts: DatabaseFacts | None = None) -> None:
    """Raise PermanentError unless ``path`` is a complete plain dump by pg_dump (of the versions
    ``facts`` records, if given)."""
    problem = sql_dump_problem(*head_and_tail(path, HEADER_LIMIT, TAIL_LIMIT), facts)
    if problem:
        raise PermanentError(f"{path.name} is not a plain dump by pg_dump: {problem}; psql was not run")


def check_rdb(path: Path, rdb_version: int | None = None) -> None:
    """Raise PermanentError unless ``path`` starts with an RDB header (of ``rdb_version``, if given)."""
    problem = rdb_problem(head_and_tail(path, HEADER_SIZE, 0)[0], rdb_version)
    if problem:
        raise PermanentError(f"{path.name} is not the backup's RDB: {problem}; it was not loaded")


def check_contents(manifest: Manifest, files: dict[Component, Path]) -> None:
    """Raise PermanentError if the SQL dump or the RDB among ``files`` (by component) is not what
    the manifest says it is: a complete dump by pg_dump of its versions, an RDB of its version."""
    database, redis = manifest.components.get("database"), manifest.components.get("redis")
    if "database" in files and database is not None and isinstance(database.facts, DatabaseFacts):
        check_sql_dump(files["database"], database.facts)
    elif "database" in files:
        check_sql_dump(files["database"])
    if "redis" in files:
        facts = redis.facts if redis is not None else None
        check_rdb(files["redis"], facts.rdb_version if isinstance(facts, RedisFacts) else None)
