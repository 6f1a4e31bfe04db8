"""The tasks, by their public names. Each turns JSON arguments into calls of plain functions and
decides on retries: transient errors are retried with exponential backoff, permanent ones fail
at once. Arguments and results hold ids, names and redacted messages, never a secret."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

from celery import chord, group
from celery.utils.log import get_task_logger

from vq_tasks import coordination, pipeline
from vq_tasks.alerts import AlertEvent, compose, recipients, send
from vq_tasks.app import app
from vq_tasks.catalog import prune as prune_storage
from vq_tasks.errors import PermanentError, TransientError, is_transient, redact
from vq_tasks.retention import IN_PROGRESS_GRACE
from vq_tasks.settings import get_settings
from vq_tasks.staging import remove_stale
from vq_tasks.storage import open_storage

logger = get_task_logger(__name__)
MAX_BACKOFF = 600


def _countdown(retries: int) -> float:
    base = get_settings().backup_retry_backoff
    return min(base * 2**retries, MAX_BACKOFF) * random.uniform(0.8, 1.2)


@app.task(name="vq_tasks.backup", bind=True, throws=(pipeline.BackupRefused,))
def backup(self, origin: str = "manual", requested_by: str | None = None) -> dict[str, Any]:
    """Take the run lock, name the backup and start the chord of dumps and finalize."""
    settings = get_settings()
    start = pipeline.start_backup(settings, self.request.id, scheduled=origin == "beat")
    if not start.already_started:
        header = group(
            dump_database.si(start.backup_id),
            dump_redis.si(start.backup_id),
            archive_config.si(start.backup_id),
            archive_logs.si(start.backup_id),
        )
        body = finalize_backup.s(
            backup_id=start.backup_id, kind=start.kind, started_at=start.started_at.isoformat()
        ).on_error(backup_failed.s(start.backup_id))
        try:
            result = chord(header)(body)
        except Exception:
            pipeline.release(settings, start.backup_id)
            raise
        pipeline.mark_chord_started(settings, start.backup_id, result.id)
        logger.info("backup %s started (%s, by %s)", start.backup_id, origin, requested_by or origin)
    return {"backup_id": start.backup_id, "kind": start.kind, "origin": origin}


def _dump(task, backup_id: str, component: str) -> dict[str, Any]:
    settings = get_settings()
    try:
        return pipeline.dump_component(settings, backup_id, component).model_dump(mode="json")
    except Exception as exc:
        message = redact(str(exc) or type(exc).__name__, settings.secret_values())
        if is_transient(exc) and task.request.retries < settings.backup_retry_max:
            logger.warning("%s of %s failed, will retry: %s", component, backup_id, message)
            raise task.retry(
                countdown=_countdown(task.request.retries), exc=TransientError(message)
            ) from None
        pipeline.record_failure(settings, backup_id, component, exc)
        error = TransientError(message) if is_transient(exc) else PermanentError(message)
        raise error from None


@app.task(name="vq_tasks.dump_database", bind=True)
def dump_database(self, backup_id: str) -> dict[str, Any]:
    """Stage a plain SQL dump of DB_NAME."""
    return _dump(self, backup_id, "database")


@app.task(name="vq_tasks.dump_redis", bind=True)
def dump_redis(self, backup_id: str) -> dict[str, Any]:
    """Stage the RDB of the application's Redis, taken over the replication protocol."""
    return _dump(self, backup_id, "redis")


@app.task(name="vq_tasks.archive_config", bind=True)
def archive_config(self, backup_id: str) -> dict[str, Any]:
    """Stage config.tar.gz of BACKUP_CONFIG_PATHS."""
    return _dump(self, backup_id, "config")


@app.task(name="vq_tasks.archive_logs", bind=True)
def archive_logs(self, backup_id: str) -> dict[str, Any]:
    """Stage a tar of the logs under BACKUP_LOG_PATHS changed within BACKUP_LOGS_WINDOW_DAYS."""
    return _dump(self, backup_id, "logs")


@app.task(name="vq_tasks.finalize_backup", bind=True)
def finalize_backup(self, records: list[dict], backup_id: str, kind: str, started_at: str) -> dict[str, Any]:
    """Store the bundle and logs archive, then the manifest; enqueue prune and the success alert."""
    settings = get_settings()
    try:
        manifest = pipeline.finalize(settings, backup_id, records, kind, started_at)
    except Exception as exc:
        if is_transient(exc) and self.request.retries < settings.backup_retry_max:
            raise self.retry(countdown=_countdown(self.request.retries)) from None
        message = pipeline.record_failure(settings, backup_id, "finalize", exc)
        raise PermanentError(message) from None
    pipeline.after_success(settings, backup_id)
    prune.delay()
    size = sum(f.size for f in manifest.files)
    summary = {
        "kind": manifest.kind,
        "size_bytes": str(size),
        "duration_seconds": str(manifest.duration_seconds),
    }
    alert.delay(AlertEvent(event="backup_succeeded", backup_id=backup_id, summary=summary).model_dump())
    logger.info("backup %s complete: %d bytes in %.1f s", backup_id, size, manifest.duration_seconds)
    return {"backup_id": backup_id, "files": [f.model_dump() for f in manifest.files]}


@app.task(name="vq_tasks.backup_failed", bind=True)
def backup_failed(self, failed_task_id: str, backup_id: str) -> dict[str, Any]:
    """Error callback of the chord: clean up, and alert with the failed components and errors."""
    failures = pipeline.fail(get_settings(), backup_id)
    if not failures:
        failures = {"unknown": f"task {failed_task_id} failed; see it in Flower or the worker log"}
    logger.error("backup %s failed: %s", backup_id, failures)
    alert.delay(AlertEvent(event="backup_failed", backup_id=backup_id, failures=failures).model_dump())
    return {"backup_id": backup_id, "failures": failures}


@app.task(name="vq_tasks.prune", bind=True)
def prune(self, dry_run: bool = False) -> dict[str, Any]:
    """Delete what the retention policy lets go; return what was (or would be) deleted and why."""
    settings = get_settings()
    now = datetime.now(UTC)
    deletions = prune_storage(open_storage(settings), settings, now, dry_run=dry_run)
    for d in deletions:
        logger.info("%s %s: %s", "would delete" if dry_run else "deleted", d.name, d.reason)
    stale = (
        []
        if dry_run
        else remove_stale(settings.backup_staging_dir, settings.backup_name_prefix, now, IN_PROGRESS_GRACE)
    )
    for name in stale:
        logger.info("removed the staging folder of %s, left by a run that did not end", name)
    return {
        "dry_run": dry_run,
        "deleted": [{"name": d.name, "reason": d.reason} for d in deletions],
        "stale_staging": stale,
    }


@app.task(name="vq_tasks.alert", bind=True, max_retries=8)
def alert(self, event: dict[str, Any]) -> dict[str, Any]:
    """Send the email for ``event`` once: a redelivered or repeated alert is not sent twice."""
    settings = get_settings()
    parsed = AlertEvent.model_validate(event)
    to = recipients(settings, parsed)
    if not to:
        return {"sent": False, "reason": "no recipient configured for this event"}
    r = coordination.client(settings)
    if not coordination.claim_once(r, parsed.claim_name):
        return {"sent": False, "reason": "already sent"}
    try:
        send(settings, compose(settings, parsed, to))
    except TransientError as exc:
        coordination.release_claim(r, parsed.claim_name)
        raise self.retry(countdown=_countdown(self.request.retries), exc=exc) from None
    return {"sent": True, "to": to}
