"""Load a plain SQL dump over several connections, split by its TOC entries, as pg_restore -j does.

What: read the dump's TOC (clients/sql_toc.py), plan the order (postgres_plan.py), run the pre-data
in one transaction on one connection, then the steps over BACKUP_RESTORE_JOBS connections, each
step as soon as what it needs is done and no running step holds its tables. Each connection first
runs the dump's preamble (its SET lines: encoding, standard_conforming_strings, search_path, ...)
and keeps the session settings pg_dump changes between entries (default_tablespace,
default_table_access_method) as each entry expects them. Table data goes to PostgreSQL by COPY,
read from the file in CHUNK pieces: the dump already lies whole on the staging disk, so a step
waiting for a connection costs no memory and no second copy. Nothing is left half done: the caller
loads into a scratch database and drops it on any error.

Why not psql: psql runs one session; pg_restore -j needs the custom format, and the operators' guide
keeps the plain one. The statements go as simple queries, as psql sends them, and no backslash
command can run: the server rejects one as SQL (psql's restricted mode, likewise, refuses them).
A dump whose TOC cannot be read with certainty is loaded by one psql session, and the log says why.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from vq_tasks.clients.pg_connect import connect, db_where
from vq_tasks.clients.sql_toc import CHUNK, DumpToc, TocEntry, TocError, line_number, read_toc
from vq_tasks.errors import BackupError
from vq_tasks.restore.postgres_connect import statement_failure
from vq_tasks.restore.postgres_load import run_psql
from vq_tasks.restore.postgres_plan import LoadPlan, Step, plan_load
from vq_tasks.restore.postgres_roles import missing_roles_error
from vq_tasks.settings import Settings

logger = logging.getLogger(__name__)
# Sent before each piece of an entry: a query of two statements or more runs in a transaction block
# (an implicit one), as under psql --single-transaction, so what may not run in one (DROP or CREATE
# DATABASE, ALTER SYSTEM, a TABLESPACE) is refused there too, not run with the restore's rights.
_IN_A_BLOCK = b"SELECT 1;\n"
LOAD_APPLICATION_NAME = "vq-backup-load"  # how pg_stat_activity names the load's sessions
PROGRESS_EVERY = 30.0  # seconds between progress lines of a long load
DEADLOCK_RETRIES = 3
_COPY_LINE = re.compile(r"\bline (\d+)")


@dataclass
class LoadReport:
    jobs: int
    split_by_toc: bool
    phases: dict[str, float] = field(default_factory=dict)


def load_dump(
    settings: Settings, path: Path, dbname: str, maintenance_db: str, encoding: str | None = None
) -> LoadReport:
    """Load the plain dump at ``path`` into the (new, empty) database ``dbname`` over
    settings.restore_jobs connections, or with one psql session if its TOC cannot be read with
    certainty. Return how, and the seconds of each phase. Raise PermanentError or TransientError
    on the first failing entry (the database is then half loaded: drop it)."""
    started = time.monotonic()
    try:
        toc = read_toc(path)
    except TocError as exc:
        logger.warning("%s cannot be split by its TOC (%s): loading it with one psql session", path.name, exc)
        run_psql(settings, path, dbname, maintenance_db, encoding)
        return LoadReport(1, False, {"psql": round(time.monotonic() - started, 3)})
    plan = plan_load(toc.entries, path)
    phases = {"index": round(time.monotonic() - started, 3)}
    jobs = max(1, min(settings.restore_jobs, len(plan.steps) or 1))
    logger.info(
        "loading %s into %s over %d connection(s): %d TOC entries, %d steps after the pre-data",
        path.name, db_where(settings, dbname), jobs, len(toc.entries), len(plan.steps),
    )  # fmt: skip
    used = _Load(settings, path, dbname, maintenance_db, toc, plan, jobs, phases).run()
    return LoadReport(used, True, phases)


@dataclass
class _Session:
    """One connection of the load, with the session settings it is in."""

    conn: psycopg.Connection
    state: dict[bytes, bytes] = field(default_factory=dict)
    busy: bool = False


class _Stopped(Exception):
    """Another step failed: this one stops where it is."""


class _Load:
    def __init__(
        self,
        settings: Settings,
        path: Path,
        dbname: str,
        maintenance_db: str,
        toc: DumpToc,
        plan: LoadPlan,
        jobs: int,
        phases: dict[str, float],
    ) -> None:
        self.settings, self.path, self.dbname, self.maintenance_db = settings, path, dbname, maintenance_db
        self.toc, self.plan, self.jobs, self.phases = toc, plan, jobs, phases
        self.scheduler = _Scheduler(plan.steps)
        self.stop = threading.Event()

    def run(self) -> int:
        """Load; return over how many connections."""
        with contextlib.ExitStack() as stack:
            started = time.monotonic()
            first = self._session(stack)
            self._run_pre_data(first)
            self.phases["pre-data"] = round(time.monotonic() - started, 3)
            sessions = [first, *self._more_sessions(stack)]
            started = time.monotonic()
            self._run_steps(sessions)
            data_done = max(started, self.scheduler.data_done_at)
            self.phases["data"] = round(data_done - started, 3)
            self.phases["post-data"] = round(time.monotonic() - data_done, 3)
            return len(sessions)

    def _session(self, stack: contextlib.ExitStack) -> _Session:
        session = _Session(stack.enter_context(connect(self.settings, self.dbname, LOAD_APPLICATION_NAME)))
        session.conn.prepare_threshold = None  # the dump's statements are run once: never prepared
        self._execute(session, self.toc.preamble, None)
        session.conn.execute("SET synchronous_commit = off")  # a scratch database: the swap is durable
        return session

    def _more_sessions(self, stack: contextlib.ExitStack) -> list[_Session]:
        """Up to jobs - 1 more sessions; fewer, with a warning, if the server refuses more (a
        managed service's connection limit, say): the load goes on over those it has."""
        sessions: list[_Session] = []
        try:
            while len(sessions) < self.jobs - 1:
                sessions.append(self._session(stack))
        except BackupError as exc:
            logger.warning("loading over %d connection(s), not %d: %s", len(sessions) + 1, self.jobs, exc)
        return sessions

    def _run_pre_data(self, session: _Session) -> None:
        self._execute(session, b"BEGIN", None)
        try:
            for entry in self.plan.pre_data:
                self._run_entry(session, entry)
        except _Deadlock as deadlock:  # one session: not expected, but an error like any other
            raise self._failure(deadlock.error, deadlock.entry) from None
        self._execute(session, b"COMMIT", None)

    def _run_steps(self, sessions: list[_Session]) -> None:
        threads = [
            threading.Thread(target=self._work, args=(s,), name=f"restore-{n}")
            for n, s in enumerate(sessions)
        ]
        for thread in threads:
            thread.start()
        try:
            last = time.monotonic()
            while not self.scheduler.wait_finished(timeout=1.0):
                if self.scheduler.failed:  # the other steps stop now, not when they would end
                    self._cancel(sessions)
                elif time.monotonic() - last >= PROGRESS_EVERY:
                    last = time.monotonic()
                    logger.info("loading %s: %s", self.path.name, self.scheduler.progress())
        except BaseException:
            self.scheduler.fail(None)
            raise
        finally:
            if self.scheduler.failed:
                self._cancel(sessions)
            for thread in threads:
                thread.join()
        if self.scheduler.error is not None:
            raise self.scheduler.error

    def _cancel(self, sessions: list[_Session]) -> None:
        """Stop every step: COPYs at their next chunk, statements by a cancel request."""
        self.stop.set()
        for session in sessions:
            if session.busy:
                with contextlib.suppress(Exception):
                    session.conn.cancel_safe(timeout=5.0)

    def _work(self, session: _Session) -> None:
        while (index := self.scheduler.next()) is not None:
            session.busy, started, step = True, time.monotonic(), self.plan.steps[index]
            try:
                self._run_step(session, step)
            except BaseException as exc:
                self.scheduler.fail(exc, index)
                return
            finally:
                session.busy = False
            logger.debug("%s %s: %.3f s", step.kind, step.entries[0].name, time.monotonic() - started)
            self.scheduler.done(index)

    def _run_step(self, session: _Session, step: Step) -> None:
        """Run a step's entries; one rolled back whole by a deadlock (a step of one piece) runs again."""
        whole = len(step.entries) == 1 and len(step.entries[0].pieces()) == 1
        for attempt in range(1, DEADLOCK_RETRIES + 1):
            try:
                for entry in step.entries:
                    self._run_entry(session, entry)
                return
            except _Deadlock as deadlock:
                if not whole or attempt == DEADLOCK_RETRIES:
                    raise self._failure(deadlock.error, deadlock.entry) from None
                logger.info("%s %s: deadlock, run again", step.kind, step.entries[0].name)

    def _run_entry(self, session: _Session, entry: TocEntry) -> None:
        for setting, value in entry.state:
            if session.state.get(setting) != value:
                self._execute(session, b"SET " + setting + b" = " + value, entry)
        session.state = dict(entry.state)
        if entry.copy is not None:
            self._copy(session, entry)  # its SQL is the COPY alone: its last lines are not run
            return
        with open(self.path, "rb") as dump:
            for start, end in entry.pieces():
                dump.seek(start)
                self._execute(session, dump.read(end - start), entry)
        session.state = dict(entry.state_after)

    def _copy(self, session: _Session, entry: TocEntry) -> None:
        assert entry.copy is not None
        try:
            with session.conn.cursor().copy(entry.copy.statement) as copy, open(self.path, "rb") as dump:
                dump.seek(entry.copy.start)
                for offset in range(entry.copy.start, entry.copy.end, CHUNK):
                    if self.stop.is_set():
                        raise _Stopped
                    copy.write(dump.read(min(CHUNK, entry.copy.end - offset)))
        except psycopg.Error as exc:
            raise self._failure(exc, entry, copy_line=True) from None

    def _execute(self, session: _Session, query: bytes, entry: TocEntry | None) -> None:
        if self.stop.is_set():
            raise _Stopped
        try:
            session.conn.execute(_IN_A_BLOCK + query if entry is not None else query)
        except psycopg.errors.DeadlockDetected as exc:
            raise _Deadlock(exc, entry) from None
        except psycopg.Error as exc:
            raise self._failure(exc, entry) from None

    def _failure(self, exc: psycopg.Error, entry: TocEntry | None, copy_line: bool = False) -> Exception:
        """The error to raise: the dump's line and entry, the server's message; the missing roles."""
        if self.stop.is_set():
            return _Stopped()  # cancelled because another step failed
        where = f"{self.path.name}, its preamble"
        if entry is not None:
            line = line_number(self.path, entry.header) + 1  # its "-- Name:" line
            found = _COPY_LINE.search(exc.diag.context or "") if copy_line else None
            line += 3 + int(found.group(1)) if found else 0  # "--", "", the COPY line, then its rows
            where = f"{self.path.name} line {line} ({entry.kind} {entry.name})"
        error, missing = statement_failure(self.settings, exc, self.dbname, where)
        if missing:
            return missing_roles_error(self.settings, self.maintenance_db, self.path, missing)
        return error


class _Deadlock(Exception):
    """PostgreSQL chose this step to end a deadlock: it was rolled back and may run again."""

    def __init__(self, error: psycopg.Error, entry: TocEntry | None) -> None:
        super().__init__(str(error))
        self.error, self.entry = error, entry


class _Scheduler:
    """Hands out the steps whose prerequisites are done and whose tables are free, heaviest first."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.lock = threading.Condition(threading.RLock())
        self.pending = set(range(len(steps)))
        self.running: set[int] = set()
        self.finished: set[int] = set()
        self.done_prefix = 0  # steps[:done_prefix] are all done
        self.failed = False
        self.error: BaseException | None = None
        self.data_total = self.data_left = sum(1 for s in steps if s.is_data)
        self.data_done_at = time.monotonic()
        self._order = sorted(range(len(steps)), key=lambda n: -steps[n].weight)

    def next(self) -> int | None:
        """Block until a step may run; return it, or None when all are done or one failed."""
        with self.lock:
            while True:
                if self.failed or not self.pending:
                    self.lock.notify_all()
                    return None
                index = self.take()
                if index is not None:
                    return index
                self.lock.wait()

    def take(self) -> int | None:
        """The heaviest step that may run now, marked running; None if none may."""
        with self.lock:
            index = next((n for n in self._order if n in self.pending and self._may_run(n)), None)
            if index is not None:
                self.pending.discard(index)
                self.running.add(index)
            return index

    def done(self, index: int) -> None:
        with self.lock:
            self.running.discard(index)
            self.finished.add(index)
            while self.done_prefix in self.finished:
                self.done_prefix += 1
            if self.steps[index].is_data:
                self.data_left -= 1
                if not self.data_left:
                    self.data_done_at = time.monotonic()
            self.lock.notify_all()

    def fail(self, error: BaseException | None, index: int | None = None) -> None:
        """Stop handing out steps; keep the first real error; ``index`` is the step that failed."""
        with self.lock:
            if index is not None:
                self.running.discard(index)
            if self.error is None and error is not None and not isinstance(error, _Stopped):
                self.error = error
            self.failed = True
            self.lock.notify_all()

    def wait_finished(self, timeout: float) -> bool:
        with self.lock:
            if self._finished():
                return True
            self.lock.wait(timeout)
            return self._finished()

    def progress(self) -> str:
        with self.lock:
            done = len(self.finished)
            loaded = f"{self.data_total - self.data_left} of {self.data_total} data"
            return f"{done} of {len(self.steps)} steps done ({loaded}), {len(self.running)} running"

    def _finished(self) -> bool:
        return (self.failed and not self.running) or len(self.finished) == len(self.steps)

    def _may_run(self, index: int) -> bool:
        step = self.steps[index]
        if self.done_prefix < step.barrier or not step.after <= self.finished:
            return False
        for other in self.running:
            running = self.steps[other]
            if step.exclusive & (running.exclusive | running.shared) or step.shared & running.exclusive:
                return False
        return True
