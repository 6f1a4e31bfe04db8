"""Plan or apply a restore's components from their extracted files, and check what was restored:
the part of restore_backup (run.py) that touches the live systems. The database and Redis are
restored at the same time, then config and logs; then rows, keys, files and APP_HEALTHCHECK_URL
are checked against the manifest.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from vq_tasks.errors import BackupError, PermanentError, TransientError, is_transient
from vq_tasks.logs import Say
from vq_tasks.manifest import Component, DatabaseFacts, Facts, FilesFacts, Manifest, RedisFacts
from vq_tasks.restore.extract import globals_file
from vq_tasks.restore.files import (
    FilesRestoreResult,
    changed_files,
    check_logs_target,
    read_members,
    refusals,
    restore_files,
)
from vq_tasks.restore.integrity import (
    IntegrityCheck,
    IntegrityReport,
    files_check,
    guarded,
    health_check,
    keys_checks,
    rows_check,
)
from vq_tasks.restore.postgres import (
    DatabaseRestorePlan,
    DatabaseRestoreResult,
    database_row_counts,
    plan_database_restore,
    restore_database,
)
from vq_tasks.restore.redis import (
    RedisPlan,
    RedisRestoreResult,
    plan_redis_restore,
    redis_key_counts,
    restore_redis,
)
from vq_tasks.settings import Settings

logger = logging.getLogger(__name__)

F = TypeVar("F", DatabaseFacts, RedisFacts, FilesFacts)
PROGRESS_INTERVAL = 5.0


class FilesPlan(BaseModel):
    target: str
    files: int
    changed: list[str]  # regular files whose copy under target is missing or differs
    refused: list[str]  # entries the restore would refuse (it then writes nothing)


class RestorePlan(BaseModel):
    database: DatabaseRestorePlan | None = None
    redis: RedisPlan | None = None
    config: FilesPlan | None = None
    logs: FilesPlan | None = None


class RestoreResults(BaseModel):
    database: DatabaseRestoreResult | None = None
    redis: RedisRestoreResult | None = None
    config: FilesRestoreResult | None = None
    logs: FilesRestoreResult | None = None


def config_target(settings: Settings) -> Path:
    """Where config files are restored: BACKUP_RESTORE_CONFIG_DIR, else their own paths."""
    return settings.backup_restore_config_dir or Path("/")


def facts_of(manifest: Manifest, component: Component, kind: type[F]) -> F:
    """Return a component's facts. Raise PermanentError if they are not of ``kind``."""
    facts: Facts = manifest.components[component].facts
    if not isinstance(facts, kind):
        raise PermanentError(f"the manifest's {component} facts are not {kind.__name__}")
    return facts


def roles_file(manifest: Manifest, sql_path: Path) -> Path | None:
    """Return the globals.sql extracted beside the database's ``sql_path``, or None when the backup
    has none (older backups)."""
    facts = facts_of(manifest, "database", DatabaseFacts)
    return globals_file(sql_path) if facts.globals else None


def _server_binary(settings: Settings) -> str | None:
    return str(settings.redis_server_bin) if settings.redis_server_bin else None


def trusted_roots(settings: Settings, manifest: Manifest, component: Component) -> list[str]:
    """Return the backup's roots of ``component`` that this worker's settings also name (the
    manifest is no safer than the archive it describes, so it alone cannot widen where files go).
    Raise PermanentError when none is left."""
    configured = settings.backup_config_paths if component == "config" else settings.backup_log_paths
    allowed = {os.path.normpath(path) for path in configured}
    recorded = facts_of(manifest, component, FilesFacts).roots
    kept = [root for root in recorded if os.path.normpath(root) in allowed]
    if not kept:
        variable = "BACKUP_CONFIG_PATHS" if component == "config" else "BACKUP_LOG_PATHS"
        raise PermanentError(
            f"the backup's {component} roots ({', '.join(recorded)}) are not in {variable} "
            f"({', '.join(configured)}): nothing of {component} is restored"
        )
    return kept


def files_plan(archive: Path, roots: list[str], target: Path) -> FilesPlan:
    """Return what restoring ``archive`` under ``target`` would change or refuse."""
    members = read_members(archive)
    return FilesPlan(
        target=str(target),
        files=sum(m.isfile() for m in members),
        changed=changed_files(archive, target),
        refused=refusals(members, roots, target),
    )


def check_archives(settings: Settings, manifest: Manifest, files: dict[Component, Path]) -> None:
    """Raise PermanentError, before any component is restored, if the config or logs archive among
    ``files`` has an entry its restore would refuse, or the logs target overlaps the live logs."""
    refused = []
    archives: tuple[Component, ...] = ("config", "logs")
    for component in archives:
        if component not in files:
            continue
        if component == "logs":
            check_logs_target(settings.backup_restore_logs_dir, settings.backup_log_paths)
        target = config_target(settings) if component == "config" else settings.backup_restore_logs_dir
        roots = trusted_roots(settings, manifest, component)
        found = refusals(read_members(files[component]), roots, target)
        refused += [f"{component} {reason}" for reason in found]
    if refused:
        raise PermanentError(
            f"refusing to restore {manifest.backup_id}, nothing was restored: " + "; ".join(refused)
        )


def plan_restore(
    settings: Settings, manifest: Manifest, files: dict[Component, Path], say: Say
) -> RestorePlan:
    """Return what restoring ``files`` (by component) would replace. Change nothing."""
    plan = RestorePlan()
    if "database" in files:
        say("planning database")
        tables = facts_of(manifest, "database", DatabaseFacts).tables
        plan.database = plan_database_restore(
            settings,
            tables,
            maintenance_db=settings.db_maintenance_db,
            globals_path=roles_file(manifest, files["database"]),
        )
    if "redis" in files:
        say("planning redis (loading the RDB into a throwaway redis-server)")
        plan.redis = plan_redis_restore(settings, files["redis"], server_binary=_server_binary(settings))
    if "config" in files:
        plan.config = files_plan(
            files["config"], trusted_roots(settings, manifest, "config"), config_target(settings)
        )
    if "logs" in files:
        check_logs_target(settings.backup_restore_logs_dir, settings.backup_log_paths)
        roots = trusted_roots(settings, manifest, "logs")
        plan.logs = files_plan(files["logs"], roots, settings.backup_restore_logs_dir)
    return plan


def apply_restore(
    settings: Settings, manifest: Manifest, files: dict[Component, Path], say: Say
) -> RestoreResults:
    """Restore ``files`` (by component): the database and Redis at the same time (psql's load keeps
    PostgreSQL busy, the key copy this process: on two cores they overlap), then config and logs
    in turn; return the results. Raise the first failure, its message naming the components
    restored (the other of the pair is still waited for, never abandoned half way)."""
    results = RestoreResults()
    pair: tuple[Component, ...] = ("database", "redis")
    together = [c for c in pair if c in files]
    steps = [together] + [[c] for c in files if c not in together]
    for step in steps:
        with ThreadPoolExecutor(max_workers=max(1, len(step))) as pool:
            futures = {c: pool.submit(_restore_step, settings, manifest, c, files[c], say) for c in step}
        failed = None
        for component, future in futures.items():
            try:
                setattr(results, component, future.result())
            except Exception as exc:  # any: the other component's outcome must still be told
                if not isinstance(exc, BackupError | OSError):
                    logger.error("%s restore failed unexpectedly", component, exc_info=exc)
                failed = failed or (component, exc)
        if failed:
            raise _restore_failed(*failed, files, results)
    return results


def _restore_step(
    settings: Settings, manifest: Manifest, component: Component, path: Path, say: Say
) -> DatabaseRestoreResult | RedisRestoreResult | FilesRestoreResult:
    say(f"restoring {component}")
    result = _restore_one(settings, manifest, component, path, say)
    say(f"{component} restored")
    return result


def _restore_failed(
    component: Component, exc: BaseException, files: dict[Component, Path], results: RestoreResults
) -> BackupError:
    """Return the error for ``component`` failing, naming the components restored."""
    done = [c for c in files if getattr(results, c) is not None]
    restored = f"; restored: {', '.join(done)}" if done else "; nothing else was restored"
    if results.database is not None and results.database.previous_name:
        restored += f" (the replaced database is kept as {results.database.previous_name})"
    error = TransientError if is_transient(exc) else PermanentError
    return error(f"{component} restore failed: {exc}{restored}")


def _restore_one(
    settings: Settings, manifest: Manifest, component: Component, path: Path, say: Say
) -> DatabaseRestoreResult | RedisRestoreResult | FilesRestoreResult:
    if component == "database":
        tables = facts_of(manifest, "database", DatabaseFacts).tables
        return restore_database(
            settings,
            path,
            tables,
            maintenance_db=settings.db_maintenance_db,
            globals_path=roles_file(manifest, path),
        )
    if component == "redis":
        return restore_redis(
            settings, path, server_binary=_server_binary(settings), progress=redis_progress(say)
        )
    roots = trusted_roots(settings, manifest, component)
    if component == "config":
        return restore_files(path, roots, config_target(settings))
    check_logs_target(settings.backup_restore_logs_dir, settings.backup_log_paths)
    return restore_files(path, roots, settings.backup_restore_logs_dir)


def redis_progress(say: Say, interval: float = PROGRESS_INTERVAL) -> Callable[[str, str, int], None]:
    """Return a progress callback for restore_redis that says at most one line per ``interval``."""
    last = [0.0]

    def progress(stage: str, db: str, count: int) -> None:
        now = time.monotonic()
        if stage == "applying":
            say(f"  redis: applying the restore ({count} commands) in one transaction")
        elif now - last[0] >= interval:
            last[0] = now
            say(
                f"  redis: loading {count}%"
                if stage == "loading"
                else f"  redis: db {db}: {count} keys {stage}"
            )

    return progress


def check_integrity(
    settings: Settings, manifest: Manifest, results: RestoreResults, files: dict[Component, Path], say: Say
) -> IntegrityReport:
    """Check what was restored; a check that cannot run is a failed check, never an exception."""
    say("checking integrity")
    checks: list[IntegrityCheck] = []
    if results.database is not None:
        expected = facts_of(manifest, "database", DatabaseFacts).tables
        checks += guarded("database rows", lambda: [rows_check(expected, database_row_counts(settings))])
    if results.redis is not None:
        backup_keys = facts_of(manifest, "redis", RedisFacts).keys
        restored = results.redis
        checks += guarded(
            "redis keys", lambda: keys_checks(restored, backup_keys, redis_key_counts(settings))
        )
    if results.config is not None:
        checks += guarded(
            "config files", lambda: [files_check("config files", files["config"], config_target(settings))]
        )
    if results.logs is not None:
        target = settings.backup_restore_logs_dir
        checks += guarded("log files", lambda: [files_check("log files", files["logs"], target)])
    if settings.app_healthcheck_url:
        checks.append(health_check(settings.app_healthcheck_url))
    return IntegrityReport(checks=checks)
