"""Restore a stored backup: verify it, take out what is needed, then plan or restore each component
and check the result. The vq_tasks.restore task and ``vq-backup restore`` both call restore_backup.

Without ``force`` nothing changes: the result is the plan (what each component would replace).
With it, the restore lock is taken (one restore at a time, none while a backup runs), each
component is restored in turn (database, redis, config, logs) and then checked: rows per table
against the manifest, Redis keys per database against what the restore put there, files and
modes against the archive, and APP_HEALTHCHECK_URL. A backup that fails verification is never
restored. The work folder (under BACKUP_STAGING_DIR) is always removed.

The manifest may be forged: it must name only its own backup's files (vq_tasks.safety). Before the
first component is restored, the dump and the RDB must be what it says and no archive entry may be
refused (restore/files.py): otherwise nothing is restored.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import redis
from pydantic import BaseModel, computed_field

from vq_tasks import coordination, signing
from vq_tasks.audit import audit
from vq_tasks.catalog import load_manifest
from vq_tasks.errors import BackupError, PermanentError, TransientError, is_transient
from vq_tasks.leftovers import owned_folder
from vq_tasks.manifest import COMPONENTS, DatabaseFacts, Facts, FilesFacts, Manifest, RedisFacts
from vq_tasks.restore.extract import extract_to, local_name
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
from vq_tasks.safety import check_contents, check_manifest
from vq_tasks.settings import Settings
from vq_tasks.storage.base import Storage
from vq_tasks.verify import report_rows, resolve_backup_id, verify_backup

Say = Callable[[str], object]
F = TypeVar("F", DatabaseFacts, RedisFacts, FilesFacts)
DEFAULT_COMPONENTS = ("database", "redis", "config")
PROGRESS_INTERVAL = 5.0
FOLDER_PREFIX = ".restore-"  # the work folder of a restore, under BACKUP_STAGING_DIR


def _quiet(line: str) -> None:
    """Say nothing."""


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


class RestoreReport(BaseModel):
    backup_id: str
    components: list[str]
    forced: bool
    verify_ok: bool
    plan: RestorePlan | None = None
    results: RestoreResults | None = None
    integrity: IntegrityReport | None = None
    duration_seconds: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        return self.verify_ok and (self.integrity is None or self.integrity.ok)


def choose_components(requested: Iterable[str] | str | None) -> list[str]:
    """Given the components asked for (None: database, redis and config), return them in restore
    order without repeats. Raise PermanentError for an unknown name, an empty list, or anything
    but names (a task's arguments are JSON)."""
    if requested is None:
        return list(DEFAULT_COMPONENTS)
    names = [requested] if isinstance(requested, str) else requested
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise PermanentError(f"components must be a list of names: choose from {', '.join(COMPONENTS)}")
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        shown = ", ".join(_with_hint(n) for n in unknown)
        raise PermanentError(f"unknown component {shown}: choose from {', '.join(COMPONENTS)}")
    if not names:
        raise PermanentError(f"no component named: choose from {', '.join(COMPONENTS)}")
    return [c for c in COMPONENTS if c in names]


def _with_hint(name: str) -> str:
    close = difflib.get_close_matches(name, COMPONENTS, n=1)
    return f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def config_target(settings: Settings) -> Path:
    """Where config files are restored: BACKUP_RESTORE_CONFIG_DIR, else their own paths."""
    return settings.backup_restore_config_dir or Path("/")


def restore_backup(
    settings: Settings,
    storage: Storage,
    backup_id: str,
    components: Iterable[str] | str | None = None,
    force: bool = False,
    say: Say = _quiet,
    origin: str | None = None,
    task_id: str | None = None,
) -> RestoreReport:
    """Given a backup id or ``latest`` and components, verify the backup, take its components out
    and return the plan (nothing changed) or, with ``force``, restore them and return the results
    and the integrity report. Raise PermanentError for a bad id or component, a backup that fails
    verification, another restore or a backup running; a component that fails stops the restore
    (the message names those restored)."""
    started = time.monotonic()
    try:
        report = _restore(settings, storage, backup_id, components, force, say, started)
    except Exception as exc:
        if force:
            audit(
                settings,
                "restore",
                "failed",
                backup_id=backup_id,
                origin=origin,
                task_id=task_id,
                error=str(exc),
                duration_seconds=round(time.monotonic() - started, 3),
            )
        raise
    if force:
        audit(
            settings,
            "restore",
            "succeeded" if report.ok else "integrity check failed",
            backup_id=report.backup_id,
            origin=origin,
            task_id=task_id,
            components=report.components,
            integrity=report.integrity.model_dump(mode="json") if report.integrity else None,
            duration_seconds=report.duration_seconds,
        )
    return report


def _restore(
    settings: Settings, storage: Storage, backup_id: str, components, force: bool, say: Say, started: float
) -> RestoreReport:
    chosen = choose_components(components)
    if not isinstance(backup_id, str) or not isinstance(force, bool):  # a task's arguments are JSON
        raise PermanentError("backup_id must be a backup id or 'latest', and force true or false")
    backup_id = resolve_backup_id(storage, settings.backup_name_prefix, backup_id)
    plan = results = integrity = None
    with restore_lock(settings, backup_id) if force else contextlib.nullcontext():
        manifest = trusted_manifest(storage, settings, backup_id, chosen)
        with owned_folder(settings.backup_staging_dir, FOLDER_PREFIX) as folder:
            files = {c: folder / local_name(c, manifest.components[c]) for c in chosen}
            say(f"verifying {backup_id} as its files are read (each once)")
            try:
                extract_to(storage, manifest, files, say, settings=settings)
                check_contents(manifest, files)
            except PermanentError as exc:
                raise PermanentError(
                    f"backup {backup_id} failed verification, nothing was restored: {exc}"
                ) from None
            say(f"{backup_id} verified")
            if force:
                check_archives(settings, manifest, files)
                results = apply_restore(settings, manifest, files, say)
                integrity = check_integrity(settings, manifest, results, files, say)
            else:
                plan = plan_restore(settings, manifest, files, say)
    return RestoreReport(
        backup_id=backup_id,
        components=chosen,
        forced=force,
        verify_ok=True,
        plan=plan,
        results=results,
        integrity=integrity,
        duration_seconds=round(time.monotonic() - started, 3),
    )


def trusted_manifest(storage: Storage, settings: Settings, backup_id: str, chosen: list[str]) -> Manifest:
    """Return the backup's manifest, once it names only its own backup's files, its signature
    holds (BACKUP_SIGNING_PUBLIC_KEYS) and it has every chosen component; nothing else is read.
    A restore then checks every file it reads against it (extract_to): one read, not two. Raise
    PermanentError otherwise."""
    manifest = check_manifest(load_manifest(storage, backup_id), backup_id, settings.backup_name_prefix)
    signed = signing.check(manifest, signing.trusted_keys(settings))
    if not signed.ok:
        raise PermanentError(
            f"backup {backup_id} failed verification, nothing was restored: manifest signature"
            f" {signed.actual} (expected {signed.expected})"
        )
    missing = [c for c in chosen if c not in manifest.components]
    if missing:
        raise PermanentError(f"backup {backup_id} has no {', '.join(missing)} component")
    return manifest


def verified_manifest(
    storage: Storage, settings: Settings, backup_id: str, chosen: list[str], say: Say
) -> Manifest:
    """Verify the whole backup (every stored file, as `vq-backup verify` does) and return its
    manifest: the drill's first step. Raise PermanentError naming the failed checks, or a chosen
    component the backup does not have."""
    manifest = check_manifest(load_manifest(storage, backup_id), backup_id, settings.backup_name_prefix)
    say(f"verifying {backup_id} (every stored file is read once)")
    report = verify_backup(storage, settings, backup_id, manifest=manifest)  # the copy used below
    failed = [f"{row[0]} {row[1]} ({row[3]})" for row in report_rows(report) if row[-1] == "MISMATCH"]
    if failed:
        raise PermanentError(
            f"backup {backup_id} failed verification, nothing was restored: {'; '.join(failed)}"
        )
    say(f"{backup_id} verified")
    missing = [c for c in chosen if c not in manifest.components]
    if missing:
        raise PermanentError(f"backup {backup_id} has no {', '.join(missing)} component")
    return manifest


def facts_of(manifest: Manifest, component: str, kind: type[F]) -> F:
    """Return a component's facts. Raise PermanentError if they are not of ``kind``."""
    facts: Facts = manifest.components[component].facts
    if not isinstance(facts, kind):
        raise PermanentError(f"the manifest's {component} facts are not {kind.__name__}")
    return facts


def _server_binary(settings: Settings) -> str | None:
    return str(settings.redis_server_bin) if settings.redis_server_bin else None


def trusted_roots(settings: Settings, manifest: Manifest, component: str) -> list[str]:
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


def check_archives(settings: Settings, manifest: Manifest, files: dict[str, Path]) -> None:
    """Raise PermanentError, before any component is restored, if the config or logs archive among
    ``files`` has an entry its restore would refuse, or the logs target overlaps the live logs."""
    refused = []
    for component in ("config", "logs"):
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


def plan_restore(settings: Settings, manifest: Manifest, files: dict[str, Path], say: Say) -> RestorePlan:
    """Return what restoring ``files`` (by component) would replace. Change nothing."""
    plan = RestorePlan()
    if "database" in files:
        say("planning database")
        tables = facts_of(manifest, "database", DatabaseFacts).tables
        plan.database = plan_database_restore(settings, tables, maintenance_db=settings.db_maintenance_db)
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


def apply_restore(settings: Settings, manifest: Manifest, files: dict[str, Path], say: Say) -> RestoreResults:
    """Restore ``files`` (by component): the database and Redis at the same time (psql's load keeps
    PostgreSQL busy, the key copy this process: on two cores they overlap), then config and logs
    in turn; return the results. Raise the first failure, its message naming the components
    restored (the other of the pair is still waited for, never abandoned half way)."""
    results = RestoreResults()
    together = [c for c in ("database", "redis") if c in files]
    steps = [together] + [[c] for c in files if c not in together]
    for step in steps:
        with ThreadPoolExecutor(max_workers=max(1, len(step))) as pool:
            futures = {c: pool.submit(_restore_step, settings, manifest, c, files[c], say) for c in step}
        failed = None
        for component, future in futures.items():
            try:
                setattr(results, component, future.result())
            except (BackupError, OSError) as exc:
                failed = failed or (component, exc)
        if failed:
            raise _restore_failed(*failed, files, results)
    return results


def _restore_step(
    settings: Settings, manifest: Manifest, component: str, path: Path, say: Say
) -> DatabaseRestoreResult | RedisRestoreResult | FilesRestoreResult:
    say(f"restoring {component}")
    result = _restore_one(settings, manifest, component, path, say)
    say(f"{component} restored")
    return result


def _restore_failed(
    component: str, exc: BaseException, files: dict[str, Path], results: RestoreResults
) -> BackupError:
    """Return the error for ``component`` failing, naming the components restored."""
    done = [c for c in files if getattr(results, c) is not None]
    restored = f"; restored: {', '.join(done)}" if done else "; nothing else was restored"
    if results.database is not None and results.database.previous_name:
        restored += f" (the replaced database is kept as {results.database.previous_name})"
    error = TransientError if is_transient(exc) else PermanentError
    return error(f"{component} restore failed: {exc}{restored}")


def _restore_one(
    settings: Settings, manifest: Manifest, component: str, path: Path, say: Say
) -> DatabaseRestoreResult | RedisRestoreResult | FilesRestoreResult:
    if component == "database":
        tables = facts_of(manifest, "database", DatabaseFacts).tables
        return restore_database(settings, path, tables, maintenance_db=settings.db_maintenance_db)
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
    settings: Settings, manifest: Manifest, results: RestoreResults, files: dict[str, Path], say: Say
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


def running_backup(r: redis.Redis) -> str | None:
    """Return the id of the backup that holds the run lock, or None (also when its run has just
    ended and only the release is pending)."""
    holder = r.get(coordination.LOCK_KEY)
    if not holder:
        return None
    held_id = holder.split(" ")[0]
    status = coordination.read_record(r, held_id).get("status")
    return None if status in ("succeeded", "failed") else held_id


@contextlib.contextmanager
def restore_lock(settings: Settings, backup_id: str) -> Iterator[None]:
    """Hold the restore lock while the block runs, refreshed from a background thread. Raise
    PermanentError if another restore holds it or a backup is running."""
    r = coordination.client(settings)
    ttl = settings.backup_lock_ttl
    holder = f"restore-{uuid.uuid4().hex[:12]}"
    try:
        running = running_backup(r)
        held = None if running else coordination.acquire_restore_lock(r, holder, backup_id, ttl)
    except redis.RedisError as exc:
        raise TransientError(f"Celery's Redis (which holds the restore lock) did not answer: {exc}") from None
    if running or held:
        what = f"backup {running} is running" if running else f"{held} is running"
        raise PermanentError(f"refusing to restore {backup_id}: {what}; try again once it has ended")
    try:
        with coordination.heartbeat(r, holder, ttl, key=coordination.RESTORE_LOCK_KEY):
            yield
    finally:
        with contextlib.suppress(redis.RedisError):
            coordination.release_restore_lock(r, holder)
