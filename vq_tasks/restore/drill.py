"""A restore drill: prove that a backup restores, without touching anything live.

The vq_tasks.restore_drill task (beat runs it on BACKUP_DRILL_SCHEDULE) and ``vq-backup drill`` both
call run_drill. Under the restore lock (no drill during a restore or a backup), it verifies the
backup like a restore does, takes its database, redis and config components out into a private
folder under BACKUP_STAGING_DIR, and restores each into a scratch copy: the SQL dump into a new
database ``<DB_NAME>_drill_<YYYYMMDDHHMMSS>`` (restore_database without swap), the RDB into an
empty redis-server started for the drill (REDIS_SERVER_BIN, on 127.0.0.1, a random password), the
config files into the folder. Then the integrity checks run against those copies: rows per table
against the manifest, keys per database against what was restored, files and modes against the
archive. Whatever happens, the scratch database is dropped, the scratch Redis stopped and the
folder removed. The outcome and the time it took are recorded in Celery's Redis (``read_drill``);
a failed drill is reported, never raised, so that the caller can alert.

The live database and Redis are never written: the scratch database has a name of its own (and a
restore without swap refuses an existing database), and the Redis restore's target is the scratch
server, whose address is checked not to be the live one's. Nor are the server's roles: a drill does
not create the roles of the backup's globals.sql (a restore does), so on a server that lacks them
its load fails, naming them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis
from psycopg import sql
from pydantic import BaseModel, computed_field

from vq_tasks import coordination
from vq_tasks.audit import audit
from vq_tasks.catalog.acceptance import read_acceptance
from vq_tasks.catalog.latest import resolve_backup_id
from vq_tasks.clients.pg_connect import connect
from vq_tasks.clients.redis_connect import plain_settings
from vq_tasks.crypto.signing import trusted_keys
from vq_tasks.errors import BackupError, PermanentError, redact, redacted_message
from vq_tasks.logs import Say
from vq_tasks.manifest import Component, DatabaseFacts, FilesFacts, Manifest, RedisFacts
from vq_tasks.monitoring.alerts import AlertEvent, deliver
from vq_tasks.monitoring.suspicious import verdict
from vq_tasks.restore.apply import facts_of, redis_progress
from vq_tasks.restore.contents import check_contents
from vq_tasks.restore.extract import extract_to, local_name
from vq_tasks.restore.files import restore_files
from vq_tasks.restore.integrity import (
    IntegrityCheck,
    IntegrityReport,
    files_check,
    guarded,
    keys_checks,
    rows_check,
)
from vq_tasks.restore.leftovers import owned_folder
from vq_tasks.restore.postgres import database_row_counts, restore_database
from vq_tasks.restore.postgres_swap import derived_name, scratch_databases
from vq_tasks.restore.redis import redis_key_counts, restore_redis
from vq_tasks.restore.redis_server import HOST, Throwaway, server_binary_path, server_binary_version
from vq_tasks.restore.run import restore_lock, verified_manifest
from vq_tasks.settings import LOOPBACK_NAMES, Settings
from vq_tasks.storage.base import Storage

DROP_ATTEMPTS = 3
logger = logging.getLogger(__name__)
DRILL_COMPONENTS: tuple[Component, ...] = ("database", "redis", "config")
FOLDER_PREFIX = ".drill-"


def _quiet(line: str) -> None:
    """Say nothing."""


class DrillReport(BaseModel):
    run_id: str
    requested: str
    backup_id: str
    started_at: datetime
    scratch_database: str
    scratch_redis: str | None = None
    integrity: IntegrityReport
    failures: dict[str, str]  # what failed (a step, or a check) -> why
    cleanup: list[str]  # what was removed afterwards
    warnings: list[str]
    duration_seconds: float
    anomaly_verdict: str | None = None  # the backup's (monitoring.suspicious); None: not read

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        return not self.failures and self.integrity.ok


def scratch_database_name(db_name: str, stamp: str) -> str:
    """Given DB_NAME and a stamp (YYYYMMDDHHMMSS), return the drill's scratch database,
    ``<DB_NAME>_drill_<stamp>`` (DB_NAME shortened to fit PostgreSQL's 63 bytes)."""
    name = derived_name(db_name, "drill", stamp)
    if name == db_name:  # cannot happen (the suffix is never empty), but this is the line never to cross
        raise PermanentError(f"the drill's scratch database would be the live {db_name}")
    return name


def scratch_settings(settings: Settings, port: int, password: str) -> Settings:
    """Given the settings and the scratch redis-server's port and password, return settings whose
    Redis is the scratch server (the default user, no TLS, as it is started; the live Redis's
    REDIS_USERNAME and REDIS_TLS* are not its). Raise PermanentError if that would be the live
    Redis."""
    live_local = settings.redis_host in LOOPBACK_NAMES or settings.redis_host == HOST
    if live_local and settings.redis_port == port:
        raise PermanentError(f"the drill's scratch Redis would be the live one ({HOST}:{port})")
    return plain_settings(settings, HOST, port, password)


class _Drill:
    """One drill run: its scratch names, the checks and failures so far, and what was cleaned up."""

    def __init__(self, settings: Settings, say: Say, at: datetime):
        self.settings, self.say, self.at = settings, say, at
        self.database_name = scratch_database_name(settings.db_name, at.strftime("%Y%m%d%H%M%S"))
        self.redis_where: str | None = None
        self.stage = "backup"
        self.failures: dict[str, str] = {}
        self.checks: list[IntegrityCheck] = []
        self.cleanup: list[str] = []
        self.warnings: list[str] = []
        self.verdict: str | None = None

    def fail(self, what: str, exc: BaseException) -> str:
        """Note that ``what`` failed with ``exc``; return its message, redacted."""
        if not isinstance(exc, BackupError | OSError | redis.RedisError):
            logger.exception("restore drill: %s failed unexpectedly", what)
        message = redacted_message(exc, self.settings.secret_values())
        self.failures[what] = message
        self.say(f"FAILED {what}: {message}")
        return message

    def run(self, storage: Storage, backup_id: str) -> None:
        """Verify the backup, take its components out and drill each; the folder is always removed."""
        self.stage = "verify"
        manifest = verified_manifest(storage, self.settings, backup_id, list(DRILL_COMPONENTS), self.say)
        self.verdict = anomaly_verdict(storage, self.settings, manifest)
        self._drop_stale_databases()
        self.stage = "extract"
        folder: Path | None = None
        try:
            with owned_folder(self.settings.backup_staging_dir, FOLDER_PREFIX) as folder:
                files = {c: folder / local_name(c, manifest.components[c]) for c in DRILL_COMPONENTS}
                extract_to(storage, manifest, files, self.say, settings=self.settings)
                check_contents(manifest, files)  # the dump's and the RDB's versions, as a restore does
                self.stage = "drill"
                self.attempt("database", lambda: self.database(manifest, files["database"]))
                self.attempt("redis", lambda: self.redis(manifest, files["redis"]))
                scratch_config = folder / "config"
                self.attempt("config", lambda: self.config(manifest, files["config"], scratch_config))
        finally:
            if folder is not None and folder.exists():
                self.cleanup_failed(f"the scratch folder {folder} could not be removed: remove it by hand")
            elif folder is not None:
                self.cleanup.append(f"removed the scratch folder {folder}")

    def cleanup_failed(self, problem: str) -> None:
        """Note that a scratch copy was left behind: the drill fails, the alert says what to remove."""
        earlier = self.failures.get("cleanup")
        self.failures["cleanup"] = f"{earlier}; {problem}" if earlier else problem
        self.say(f"FAILED cleanup: {problem}")

    def attempt(self, component: str, drill: Callable[[], list[IntegrityCheck]]) -> None:
        """Drill one component; a failure becomes a failed check of it, and the drill goes on."""
        self.say(f"drilling {component}")
        try:
            self.checks += drill()
        except Exception as exc:
            message = self.fail(f"{component} restore", exc)
            expected = "restores into a scratch copy"
            self.checks.append(
                IntegrityCheck(check=f"{component} restore", expected=expected, actual=message, ok=False)
            )

    def database(self, manifest: Manifest, sql_path: Path) -> list[IntegrityCheck]:
        """Load the dump into the scratch database and count its rows; always drop it."""
        expected = facts_of(manifest, "database", DatabaseFacts).tables
        name, settings = self.database_name, self.settings
        try:
            restore_database(
                settings, sql_path, expected, target_db=name, swap=False,
                maintenance_db=settings.db_maintenance_db, now=self.at,
            )  # fmt: skip
            self.say(f"  database: loaded into the scratch database {name}")
            return guarded(
                "database rows", lambda: [rows_check(expected, database_row_counts(settings, name))]
            )
        finally:
            problem = self._drop_database(name)
            if problem:
                self.cleanup_failed(f"the scratch database {problem}")
            else:
                self.cleanup.append(f"dropped the scratch database {name}")

    def redis(self, manifest: Manifest, rdb: Path) -> list[IntegrityCheck]:
        """Restore the RDB into an empty redis-server of the drill's own and count its keys; always
        stop it."""
        configured = str(self.settings.redis_server_bin) if self.settings.redis_server_bin else None
        binary = server_binary_path(configured)
        server_binary_version(binary)  # a clear error for a wrong REDIS_SERVER_BIN, before anything starts
        scratch = Throwaway(binary, None, self.settings.redis_timeout)
        try:
            scratch.start()
            self.redis_where = f"{HOST}:{scratch.port} ({binary})"
            self.say(f"  redis: a scratch redis-server on {self.redis_where}")
            target = scratch_settings(self.settings, scratch.port, scratch.password)
            result = restore_redis(target, rdb, server_binary=binary, progress=redis_progress(self.say))
            backup_keys = facts_of(manifest, "redis", RedisFacts).keys
            return guarded("redis keys", lambda: keys_checks(result, backup_keys, redis_key_counts(target)))
        finally:
            scratch.close()
            if scratch.process is not None:
                self.cleanup.append(f"stopped the scratch redis-server on {HOST}:{scratch.port}")

    def config(self, manifest: Manifest, archive: Path, target: Path) -> list[IntegrityCheck]:
        """Restore the config files under ``target`` (in the scratch folder) and compare them."""
        roots = facts_of(manifest, "config", FilesFacts).roots
        restore_files(archive, roots, target)
        self.say(f"  config: restored under {target}")
        return [files_check("config files", archive, target)]

    def _drop_database(self, name: str) -> str | None:
        """Drop the database ``name`` if it exists; return why it could not be, or None."""
        if name == self.settings.db_name:
            return f"{name} is the live database: never dropped"
        statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        for attempt in range(DROP_ATTEMPTS):  # a lost connection is tried again on a new one
            try:
                with connect(self.settings, self.settings.db_maintenance_db) as admin:
                    admin.execute(statement)
                return None
            except BackupError as exc:
                if not exc.transient or attempt == DROP_ATTEMPTS - 1:
                    return f"{name} could not be dropped ({exc}): drop it by hand"
                time.sleep(1 + attempt)
        return None

    def _drop_stale_databases(self) -> None:
        """Drop scratch databases that drills whose worker died left (none runs now: the lock)."""
        try:
            with connect(self.settings, self.settings.db_maintenance_db) as admin:
                names = scratch_databases(admin, self.settings.db_name, "drill")
        except BackupError as exc:
            self.warnings.append(f"could not look for scratch databases of earlier drills: {exc}")
            return
        for name in names:
            problem = self._drop_database(name)
            if problem:
                self.warnings.append(f"a scratch database of an earlier drill: {problem}")
            else:
                self.cleanup.append(f"dropped {name}, left by a drill that did not end")
                self.say(f"dropped {name}, left by a drill that did not end")

    def report(self, run_id: str, requested: str, backup_id: str, started: float) -> DrillReport:
        """Return the report; every failed check is also among the failures."""
        failures = dict(self.failures)
        for check in self.checks:
            if not check.ok:
                failures.setdefault(check.check, f"{check.actual} (expected: {check.expected})")
        return DrillReport(
            run_id=run_id,
            requested=requested,
            backup_id=backup_id,
            started_at=self.at,
            scratch_database=self.database_name,
            scratch_redis=self.redis_where,
            integrity=IntegrityReport(checks=self.checks),
            failures=failures,
            cleanup=self.cleanup,
            warnings=self.warnings,
            duration_seconds=round(time.monotonic() - started, 3),
            anomaly_verdict=self.verdict,
        )


def anomaly_verdict(storage: Storage, settings: Settings, manifest: Manifest) -> str:
    """Return the backup's anomaly verdict, its acceptance read when it has anomalies. It never
    fails the drill: a suspicious backup is an incident of its own (the suspicious alert)."""
    if not manifest.anomalies:
        return verdict(manifest)
    try:
        accepted = read_acceptance(storage, manifest, trusted_keys(settings)) is not None
    except (BackupError, OSError, ValueError) as exc:
        why = redacted_message(exc, settings.secret_values())
        return f"{verdict(manifest)} (its acceptance could not be read: {why})"
    return verdict(manifest, accepted)


def run_drill(
    settings: Settings,
    storage: Storage,
    backup_id: str = "latest",
    run_id: str | None = None,
    say: Say = _quiet,
    now: datetime | None = None,
    origin: str = "celery",
) -> DrillReport:
    """Given a backup id or ``latest``, restore it into a scratch database, Redis and folder, check
    them, remove them and return the report, also recorded in Celery's Redis. Never raise for a
    failed drill (a refused lock, a backup that fails verification, a failed restore or check):
    the report says what failed, ``ok`` is false."""
    started = time.monotonic()
    drill = _Drill(settings, say, (now or datetime.now(UTC)).replace(microsecond=0))
    run_id = run_id or f"drill-{uuid.uuid4().hex[:12]}"
    resolved = backup_id
    try:
        resolved = resolve_backup_id(storage, settings, backup_id)
        drill.stage = "lock"
        with restore_lock(settings, resolved):
            say(f"restore drill {run_id} of {resolved}: scratch database {drill.database_name}")
            drill.run(storage, resolved)
    except Exception as exc:
        drill.fail(drill.stage, exc)
    report = drill.report(run_id, backup_id, resolved, started)
    report.warnings += record_outcome(settings, report)
    audit(
        settings,
        "drill",
        "succeeded" if report.ok else "failed",
        backup_id=report.backup_id,
        run_id=run_id,
        task_id=run_id if origin != "cli" and not origin.startswith("cli:") else None,
        origin=origin,
        failures=report.failures or None,
        duration_seconds=report.duration_seconds,
        integrity=report.integrity.model_dump(mode="json"),
    )
    return report


def record_outcome(settings: Settings, report: DrillReport) -> list[str]:
    """Record the drill's outcome in Celery's Redis (coordination.read_drill reads it); return a
    warning if it could not be."""
    fields = {
        "last_drill_at": report.started_at.isoformat(),
        "last_drill_ok": report.ok,
        "last_drill_seconds": report.duration_seconds,
        "last_drill_backup_id": report.backup_id,
        "last_drill_run_id": report.run_id,
        "last_drill_failures": report.failures,
    }
    if report.ok:
        fields["last_drill_ok_at"] = report.started_at.isoformat()
    try:
        coordination.record_drill(coordination.client(settings), **fields)
    except redis.RedisError as exc:
        logger.warning("could not record the restore drill's outcome: %s", exc)
        return [f"the outcome could not be recorded in Celery's Redis: {exc}"]
    return []


def alert_event(report: DrillReport) -> AlertEvent:
    """Return the drill's observation: a drill incident naming what failed, or (passed) its end."""
    removed = "some could not be removed: see cleanup" if "cleanup" in report.failures else "removed"
    summary = {
        "drill run": report.run_id,
        "started": report.started_at.isoformat(),
        "duration_seconds": str(report.duration_seconds),
        "scratch database": report.scratch_database,
        "scratch copies": removed,
    }
    return AlertEvent(
        condition="drill", backup_id=report.backup_id, failures=report.failures, summary=summary,
        observed_at=report.started_at,
    )  # fmt: skip


def send_alert_now(settings: Settings, report: DrillReport, origin: str = "cli") -> str:
    """Report the drill's outcome to the alerting from this process (a failure opens or changes
    the drill incident, a pass resolves it); return what happened, as a line to show."""
    try:
        return deliver(settings, alert_event(report), origin=origin)
    except (BackupError, redis.RedisError) as exc:
        return f"the alert could not be sent: {redact(str(exc), settings.secret_values())}"
