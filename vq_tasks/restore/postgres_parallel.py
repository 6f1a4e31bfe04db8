"""Load a plain SQL dump over several connections, split by its TOC entries, as pg_restore -j does.

What: read the dump's TOC (clients/sql_toc.py) and plan the order (postgres_plan.py) as the load
goes: the pre-data in one transaction on one connection, then the steps over BACKUP_RESTORE_JOBS
connections, each as soon as what it needs is done and no running step holds its tables, while
this thread reads the rest of the TOC (about 1 s a GiB, the load about 10). Each connection first
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

import bisect
import contextlib
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from vq_tasks.clients.pg_connect import connect, db_where
from vq_tasks.clients.sql_toc import CHUNK, TocEntry, TocError, TocReader, line_number
from vq_tasks.errors import BackupError, PermanentError
from vq_tasks.restore.postgres_connect import statement_failure
from vq_tasks.restore.postgres_load import run_psql
from vq_tasks.restore.postgres_plan import Planner, Step, ends_pre_data
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
    settings: Settings,
    path: Path,
    dbname: str,
    maintenance_db: str,
    encoding: str | None = None,
    reset: Callable[[], None] | None = None,
) -> LoadReport:
    """Load the plain dump at ``path`` into the (new, empty) database ``dbname`` over
    settings.restore_jobs connections, or with one psql session if its TOC cannot be read with
    certainty; the TOC is read as the load goes, and should that find it unreadable after some of
    it was loaded, ``reset`` makes ``dbname`` new and empty again first. Return how, and the
    seconds of each phase. Raise PermanentError or TransientError on the first failing entry (the
    database is then half loaded: drop it)."""
    started = time.monotonic()
    try:
        return _Load(settings, path, dbname, maintenance_db).run()
    except _Unreadable as exc:
        logger.warning("%s cannot be split by its TOC (%s): loading it with one psql session", path.name, exc)
        if exc.loaded:
            if reset is None:
                raise PermanentError(
                    f"{path.name} cannot be split by its TOC ({exc}) and was half loaded"
                ) from None
            reset()
        run_psql(settings, path, dbname, maintenance_db, encoding)
        return LoadReport(1, False, {"psql": round(time.monotonic() - started, 3)})


@dataclass
class _Session:
    """One connection of the load, with the session settings it is in."""

    conn: psycopg.Connection
    state: dict[bytes, bytes] = field(default_factory=dict)
    busy: bool = False


class _Stopped(Exception):
    """Another step failed: this one stops where it is."""


class _Unreadable(Exception):
    """The TOC cannot be read with certainty (TocError's message); ``loaded``: SQL ran before it was found."""

    def __init__(self, reason: TocError, loaded: bool) -> None:
        super().__init__(str(reason))
        self.loaded = loaded


class _Load:
    def __init__(self, settings: Settings, path: Path, dbname: str, maintenance_db: str) -> None:
        self.settings, self.path, self.dbname, self.maintenance_db = settings, path, dbname, maintenance_db
        self.jobs = settings.restore_jobs
        self.phases: dict[str, float] = {}
        self.scheduler = _Scheduler()
        self.stop = threading.Event()
        self.preamble = b""
        self.entries = 0

    def run(self) -> LoadReport:
        """Load while the TOC is read; return over how many connections, and the phases' seconds."""
        started = time.monotonic()
        with open(self.path, "rb") as stream, contextlib.ExitStack() as stack:
            reader = TocReader(stream)
            entries = iter(reader)
            pre_data, first = self._read_pre_data(entries)
            self.preamble = reader.preamble
            session = self._session(stack)
            self._run_pre_data(session, pre_data)
            self.phases["pre-data"] = round(time.monotonic() - started, 3)
            planner = Planner(self.path, pre_data)
            sessions = [session, *self._more_sessions(stack)]
            logger.info(
                "loading %s into %s over %d connection(s), its TOC read as it goes",
                self.path.name, db_where(self.settings, self.dbname), len(sessions),
            )  # fmt: skip
            steps_started = time.monotonic()
            self._run_steps(sessions, itertools.chain([first] if first else [], entries), planner)
            data_done = max(steps_started, self.scheduler.data_done_at)
            self.phases["data"] = round(data_done - steps_started, 3)
            self.phases["post-data"] = round(time.monotonic() - data_done, 3)
            self.phases["toc"] = round(self.scheduler.toc_done_at - started, 3)
            logger.info("%s: %d TOC entries, %d steps after the pre-data", self.path.name, self.entries,
                        len(self.scheduler.steps))  # fmt: skip
            return LoadReport(len(sessions), True, self.phases)

    def _read_pre_data(self, entries: Iterator[TocEntry]) -> tuple[list[TocEntry], TocEntry | None]:
        """The pre-data's entries, and the first entry after it (None: the dump has no more)."""
        pre_data: list[TocEntry] = []
        try:
            for entry in entries:
                self.entries += 1
                if ends_pre_data(entry):
                    return pre_data, entry
                pre_data.append(entry)
        except TocError as exc:
            raise _Unreadable(exc, loaded=False) from None
        return pre_data, None

    def _session(self, stack: contextlib.ExitStack) -> _Session:
        session = _Session(stack.enter_context(connect(self.settings, self.dbname, LOAD_APPLICATION_NAME)))
        session.conn.prepare_threshold = None  # the dump's statements are run once: never prepared
        self._execute(session, self.preamble, None)
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

    def _run_pre_data(self, session: _Session, pre_data: list[TocEntry]) -> None:
        self._execute(session, b"BEGIN", None)
        for entry in pre_data:
            self._run_entry(session, entry)
        self._execute(session, b"COMMIT", None)

    def _run_steps(self, sessions: list[_Session], entries: Iterator[TocEntry], planner: Planner) -> None:
        """Run the steps over the sessions' threads while this one reads the rest of the TOC."""
        threads = [
            threading.Thread(target=self._work, args=(s,), name=f"restore-{n}")
            for n, s in enumerate(sessions)
        ]
        for thread in threads:
            thread.start()
        unreadable: TocError | None = None
        try:
            try:
                for entry in entries:
                    self.entries += 1
                    if (step := planner.add(entry)) is not None:
                        self.scheduler.add(step)
                    if self.scheduler.failed:
                        break
                self.scheduler.complete()
            except TocError as exc:
                unreadable = exc
                self.scheduler.fail(None)
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
        if unreadable is not None:
            raise _Unreadable(unreadable, loaded=True)
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
            session.busy, started, step = True, time.monotonic(), self.scheduler.steps[index]
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
        session.state = dict(entry.state)

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
    """Hands out the steps whose prerequisites are done and whose tables are free, heaviest first.
    Steps come as the TOC is read (add); the last one is held back until another comes or the TOC
    ends (complete), since the entry after it may still join it."""

    def __init__(self, steps: list[Step] | None = None) -> None:
        self.steps: list[Step] = []
        self.lock = threading.Condition(threading.RLock())
        self.pending: set[int] = set()
        self.running: set[int] = set()
        self.finished: set[int] = set()
        self.done_prefix = 0  # steps[:done_prefix] are all done
        self.complete_ = False
        self.failed = False
        self.error: BaseException | None = None
        self.data_left = 0
        self.data_done_at = self.toc_done_at = time.monotonic()
        self._order: list[tuple[int, int]] = []  # (-weight, index) of the pending steps, sorted
        for step in steps or []:
            self.add(step)
        if steps is not None:
            self.complete()

    def add(self, step: Step) -> None:
        with self.lock:
            index = len(self.steps)
            self.steps.append(step)
            self.pending.add(index)
            bisect.insort(self._order, (-step.weight, index))
            self.data_left += step.is_data
            self.lock.notify_all()

    def complete(self) -> None:
        """No more steps will come."""
        with self.lock:
            self.complete_ = True
            self.toc_done_at = time.monotonic()
            self.lock.notify_all()

    def next(self) -> int | None:
        """Block until a step may run; return it, or None when all are done or one failed."""
        with self.lock:
            while True:
                if self.failed or (self.complete_ and not self.pending):
                    self.lock.notify_all()
                    return None
                index = self.take()
                if index is not None:
                    return index
                self.lock.wait()

    def take(self) -> int | None:
        """The heaviest step that may run now, marked running; None if none may."""
        with self.lock:
            found = next((n for n, item in enumerate(self._order) if self._may_run(item[1])), None)
            if found is None:
                return None
            index = self._order.pop(found)[1]
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
            data = sum(1 for s in self.steps if s.is_data)
            loaded = f"{data - self.data_left} of {data} data"
            done = f"{len(self.finished)} of {len(self.steps)} steps done"
            return f"{done} ({loaded}), {len(self.running)} running"

    def _finished(self) -> bool:
        return (self.failed and not self.running) or (
            self.complete_ and len(self.finished) == len(self.steps)
        )

    def _may_run(self, index: int) -> bool:
        step = self.steps[index]
        if index == len(self.steps) - 1 and not self.complete_:
            return False  # the next entry may still join it
        if self.done_prefix < step.barrier or not step.after <= self.finished:
            return False
        for other in self.running:
            running = self.steps[other]
            if step.exclusive & (running.exclusive | running.shared) or step.shared & running.exclusive:
                return False
        return True
