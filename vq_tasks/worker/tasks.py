"""The tasks, by their public names. Each turns JSON arguments into calls of plain functions and
decides on retries: transient errors are retried with exponential backoff, permanent ones fail
at once. Arguments and results hold ids, names and redacted messages, never a secret."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import chord, group
from celery.exceptions import Ignore
from celery.utils.log import get_task_logger

from vq_tasks import coordination
from vq_tasks.audit import audit
from vq_tasks.backup import pipeline
from vq_tasks.crypto import signing
from vq_tasks.errors import PermanentError, TransientError, is_transient, redact, redacted_message
from vq_tasks.manifest import Component, Kind, parse_backup_id
from vq_tasks.monitoring.alerts import AlertEvent, deliver, retention_event
from vq_tasks.monitoring.suspicious import suspicious_event, verdict
from vq_tasks.retention.plan import policy
from vq_tasks.retention.policy import retention_start
from vq_tasks.retention.prune import prune_all
from vq_tasks.settings import Settings, get_settings
from vq_tasks.storage import open_storage
from vq_tasks.worker import authorization, leases, steps
from vq_tasks.worker.app import app
from vq_tasks.worker.schedule import SLOT_SEARCH, scheduled_slot

logger = get_task_logger(__name__)
MAX_BACKOFF = 600
SLOT_EARLY = timedelta(seconds=5)
SLOT_CLAIM_TTL = int((SLOT_SEARCH + timedelta(days=1)).total_seconds())


def _countdown(retries: int) -> float:
    base = get_settings().backup_retry_backoff
    return min(base * 2**retries, MAX_BACKOFF) * random.uniform(0.8, 1.2)


def _retry_if_transient(task: Any, settings: Settings, failure: BaseException, doing: str) -> None:
    """Given a task's failure, retry the task with exponential backoff when the failure may pass
    and BACKUP_RETRY_MAX allows another try; return otherwise. Call it outside the ``except``
    block: the retry carries only the redacted message, never the original exception."""
    if not is_transient(failure) or task.request.retries >= settings.backup_retry_max:
        return
    message = redacted_message(failure, settings.secret_values())
    logger.warning("%s failed, will retry: %s", doing, message)
    raise task.retry(countdown=_countdown(task.request.retries), exc=TransientError(message))


def origin_of(origin: str, requested_by: str | None = None) -> str:
    """Return the audit log's origin: ``beat``, ``cli:<user>`` or ``celery`` (a `celery call`)."""
    if origin == "cli":
        return f"cli:{requested_by or 'unknown'}"
    return origin if origin in ("beat", "celery") or origin.startswith("cli:") else "celery"


@app.task(name="vq_tasks.backup", bind=True, throws=(pipeline.BackupRefused,))
def backup(self, origin: str = "celery", requested_by: str | None = None) -> dict[str, Any]:
    """Take the run lock, name the backup and start the chord of dumps and finalize. ``origin``
    is "beat" for scheduled backups (which get the kinds daily, weekly, monthly), else manual."""
    settings = get_settings()
    who = origin_of(origin, requested_by)
    if origin == "beat":
        try:
            _claim_scheduled_slot(settings, self.request.id)
        except pipeline.BackupRefused as refused:
            audit(settings, "backup", "refused", task_id=self.request.id, origin=who, error=str(refused))
            raise
    try:
        start = pipeline.start_backup(settings, self.request.id, scheduled=origin == "beat")
        if not start.already_started:
            pipeline.report(settings, start.backup_id, origin=who, task_id=self.request.id)
            _start_chord(settings, start)
            logger.info("backup %s started (%s)", start.backup_id, who)
    except pipeline.BackupRefused:
        raise
    except Exception as exc:
        message = redacted_message(exc, settings.secret_values())
        audit(settings, "backup", "failed", task_id=self.request.id, origin=who, error=message)
        _count_start_failure(settings, self.request.id, exc)
        _alert(AlertEvent(condition="backup", failures={"backup": f"not started: {message}"}))
        raise PermanentError(message) from None
    return {"backup_id": start.backup_id, "kind": start.kind, "origin": who}


def _claim_scheduled_slot(settings, task_id: str) -> None:
    """Claim the scheduled time this beat-sent backup belongs to. Raise BackupRefused when another
    task has it: two beats by mistake, or a restarted beat sending its slot again."""
    now = datetime.now(UTC) + SLOT_EARLY  # this worker's clock may be a little behind beat's
    slot = scheduled_slot(settings.backup_schedule, now, settings.backup_timezone)
    if slot is None:
        return  # sent by beat, but no scheduled time matches: nothing to deduplicate against
    r = coordination.client(settings)
    first = coordination.claim_for(r, f"beat-slot:{slot.isoformat()}", task_id, ttl=SLOT_CLAIM_TTL)
    if first is not None:
        raise pipeline.BackupRefused(
            f"the backup scheduled for {slot:%Y-%m-%d %H:%M} UTC was started already by task {first} "
            "(is more than one beat running?)"
        )


def _checked_id(settings, backup_id: str) -> None:
    """Refuse a task argument that is not a backup id of this deployment (a path, another prefix)."""
    try:
        parse_backup_id(backup_id, settings.backup_name_prefix)
    except (TypeError, ValueError) as exc:
        raise PermanentError(str(exc)) from None


def _count_start_failure(settings, task_id: str, exc: BaseException) -> None:
    """Count a backup that failed before its chord started (no run record exists for it)."""
    reason = "transient" if is_transient(exc) else "permanent"
    try:
        r = coordination.client(settings)
        coordination.count_once(r, f"start:{task_id}", {"runs:failed": 1, f"failures:start:{reason}": 1})
    except Exception as count_error:  # Celery's Redis may be what failed
        logger.warning("could not count the failed start: %s", count_error)


def _alert(event: AlertEvent | None) -> None:
    """Enqueue ``event`` (None: nothing observed) for the alert task; a broker that refuses it is
    logged, not raised (the exporter's checks still see the problem)."""
    if event is None:
        return
    try:
        alert.delay(event.model_dump(mode="json"))
    except Exception as exc:
        logger.error("could not enqueue the %s alert: %s", event.condition, exc)


def _start_chord(settings, start: pipeline.BackupStart) -> None:
    header = group(
        dump_database.si(start.backup_id),
        dump_redis.si(start.backup_id),
        archive_config.si(start.backup_id),
        archive_logs.si(start.backup_id),
    )
    body = finalize_backup.s(
        backup_id=start.backup_id, kind=start.kind, started_at=start.started_at.isoformat()
    ).on_error(backup_failed.s(start.backup_id))
    pipeline.mark_chord_started(settings, start.backup_id)
    try:
        chord(header)(body)
    except Exception:
        pipeline.release(settings, start.backup_id)
        raise


def _dump(task, backup_id: str, component: Component) -> dict[str, Any]:
    settings = get_settings()
    try:
        with steps.step(settings, f"{backup_id}:{component}") as lease:
            part = pipeline.dump_component(settings, backup_id, component, fence=lease.check)
        return part.model_dump(mode="json")
    except pipeline.RunEnded as exc:
        logger.warning("%s", exc)
        raise Ignore() from None
    except leases.LeaseLost as lost:
        steps.give_back(lost)
    except Exception as exc:
        failure = exc
    _retry_if_transient(task, settings, failure, f"{component} of {backup_id}")
    pipeline.record_failure(settings, backup_id, component, failure)
    message = redacted_message(failure, settings.secret_values())
    raise TransientError(message) if is_transient(failure) else PermanentError(message)


@app.task(name="vq_tasks.dump_database", bind=True, max_retries=None)
def dump_database(self, backup_id: str) -> dict[str, Any]:
    """Stage a plain SQL dump of DB_NAME."""
    return _dump(self, backup_id, "database")


@app.task(name="vq_tasks.dump_redis", bind=True, max_retries=None)
def dump_redis(self, backup_id: str) -> dict[str, Any]:
    """Stage the RDB of the application's Redis, taken over the replication protocol."""
    return _dump(self, backup_id, "redis")


@app.task(name="vq_tasks.archive_config", bind=True, max_retries=None)
def archive_config(self, backup_id: str) -> dict[str, Any]:
    """Stage config.tar.gz of BACKUP_CONFIG_PATHS."""
    return _dump(self, backup_id, "config")


@app.task(name="vq_tasks.archive_logs", bind=True, max_retries=None)
def archive_logs(self, backup_id: str) -> dict[str, Any]:
    """Stage a tar of the logs under BACKUP_LOG_PATHS changed within BACKUP_LOGS_WINDOW_DAYS."""
    return _dump(self, backup_id, "logs")


@app.task(name="vq_tasks.finalize_backup", bind=True, max_retries=None)
def finalize_backup(self, records: list[dict], backup_id: str, kind: Kind, started_at: str) -> dict[str, Any]:
    """Store the bundle and logs archive, then the manifest; enqueue prune and the success alert."""
    settings = get_settings()
    try:
        with steps.step(settings, f"{backup_id}:finalize") as lease:
            manifest = pipeline.finalize(settings, backup_id, records, kind, started_at, fence=lease.check)
    except leases.LeaseLost as lost:
        steps.give_back(lost)
    except Exception as exc:
        failure = exc
    else:
        _after_manifest(settings, backup_id, manifest)
        return {"backup_id": backup_id, "files": [f.model_dump() for f in manifest.files]}
    _retry_if_transient(self, settings, failure, f"finalize of {backup_id}")
    raise PermanentError(pipeline.record_failure(settings, backup_id, "finalize", failure))


def _after_manifest(settings, backup_id: str, manifest) -> None:
    """The backup is complete: what follows is logged when it fails, never turned into a failure."""
    size = sum(f.size for f in manifest.files)
    logger.info("backup %s complete: %d bytes in %.1f s", backup_id, size, manifest.duration_seconds)
    summary = {
        "kind": manifest.kind,
        "size_bytes": str(size),
        "duration_seconds": str(manifest.duration_seconds),
        "anomalies": verdict(manifest),
    }
    try:
        _audit_run(settings, backup_id, "succeeded", kind=manifest.kind, size_bytes=size)
        pipeline.after_success(settings, backup_id)
        if settings.destination("offsite") is not None:
            copy_offsite.delay(backup_id)  # it prunes when done: not while its files lack a manifest
        else:
            prune.delay()
        _alert(AlertEvent(condition="backup", backup_id=backup_id, observed_at=manifest.finished_at))
        _alert(suspicious_event(manifest))
        _alert(AlertEvent(condition="success", backup_id=backup_id, summary=summary))
    except Exception as exc:
        logger.error("backup %s is complete, but cleaning up after it failed: %s", backup_id, exc)


def _audit_run(settings, backup_id: str, outcome: str, **fields: Any) -> None:
    """Write the audit line of a backup run that ended, with its origin, task and duration from
    the run record (a record that cannot be read leaves them out)."""
    try:
        r = coordination.client(settings)
        if not coordination.claim_once(r, f"audit:backup:{backup_id}"):
            return  # a redelivered task: its line was written
        run = coordination.read_record(r, backup_id)
    except Exception as exc:
        logger.warning("no run record of %s for the audit log: %s", backup_id, exc)
        run = {}
    started = run.get("started_at")
    took = (datetime.now(UTC) - datetime.fromisoformat(started)).total_seconds() if started else None
    duration = None if took is None else round(took, 3)
    origin, task_id = run.get("origin"), run.get("task_id")
    audit(settings, "backup", outcome, backup_id=backup_id, origin=origin, task_id=task_id,
          duration_seconds=duration, **fields)  # fmt: skip


@app.task(name="vq_tasks.backup_failed", bind=True)
def backup_failed(self, task_id: str, backup_id: str) -> dict[str, Any]:
    """Error callback of the chord (``task_id`` is finalize's): clean up, and alert with the failed
    components and their errors. A backup whose manifest exists is complete and is not alerted."""
    settings = get_settings()
    failures = pipeline.fail(settings, backup_id)
    if failures is None:
        logger.warning("backup %s is complete; a step after its manifest failed", backup_id)
        return {"backup_id": backup_id, "failures": {}}
    if not failures:
        cause = self.app.AsyncResult(task_id).result  # a ChordError names the task that failed
        failures = {"unknown": redact(str(cause), settings.secret_values())}
    logger.error("backup %s failed: %s", backup_id, failures)
    _audit_run(settings, backup_id, "failed", failures=failures)
    _alert(AlertEvent(condition="backup", backup_id=backup_id, failures=failures))
    return {"backup_id": backup_id, "failures": failures}


@app.task(name="vq_tasks.prune", bind=True)
def prune(self, dry_run: bool = False, origin: str = "celery") -> dict[str, Any]:
    """Apply the retention policy to the primary storage and the off-site copy; return, for each,
    what was (or would be) deleted and why. One destination failing does not spare the other; a
    failure, or backups past their retention left after a real prune, is a retention incident.
    A real prune needs an authorized message (vq_tasks.worker.authorization)."""
    settings = get_settings()
    if dry_run is not True:
        authorization.require(self, settings, _alert)

    def work() -> dict[str, Any]:
        who = origin_of(origin)
        report = prune_all(settings, dry_run=dry_run, origin=who, task_id=self.request.id, say=logger.info)
        if not dry_run:
            _alert(retention_event(report))
        if not report.ok:
            raise PermanentError("; ".join(report.failures()))
        return report.as_dict()

    return steps.run_once(settings, self, work)


@app.task(name="vq_tasks.copy_offsite", bind=True, max_retries=None)
def copy_offsite(self, backup_id: str) -> dict[str, Any]:
    """Copy ``backup_id``, and any other backup within retention the off-site copy lacks, from
    the primary storage to the off-site one, each file checked on the way and its manifest last.
    Transient failures are retried with backoff; a final failure alerts BACKUP_ALERT_EMAIL."""
    from vq_tasks.backup import offsite

    settings = get_settings()
    _checked_id(settings, backup_id)
    r = coordination.client(settings)
    try:
        with (
            steps.step(settings, f"{backup_id}:offsite"),
            coordination.offsite_copy_running(r, self.request.id, settings.backup_lock_ttl),
        ):
            source, target = open_storage(settings), open_storage(settings, "offsite")
            keys = signing.trusted_keys(settings)
            locks = policy(settings) if settings.backup_immutability else None  # the copies' locks
            size = offsite.copy_backup(source, target, backup_id, logger.info, keys, locks)
            since = retention_start(datetime.now(UTC), policy(settings))
            prefix = settings.backup_name_prefix
            caught_up = offsite.sync(source, target, prefix, since, logger.info, keys, locks)
    except leases.LeaseLost as lost:
        steps.give_back(lost)
    except Exception as exc:
        failure = exc
    else:
        logger.info("backup %s copied off-site to %s (%d bytes)", backup_id, target.describe(), size)
        for missed, message in caught_up.failed.items():
            _offsite_failed(settings, missed, message)
        if not caught_up.failed:
            _alert(AlertEvent(condition="offsite", backup_id=backup_id))
        prune.delay()
        result = {"backup_id": backup_id, "size": size, "caught_up": caught_up.copied}
        return {**result, "failed": caught_up.failed}
    _retry_if_transient(self, settings, failure, f"off-site copy of {backup_id}")
    message = redacted_message(failure, settings.secret_values())
    _offsite_failed(settings, backup_id, message)
    prune.delay()
    raise PermanentError(message)


def _offsite_failed(settings, backup_id: str, message: str) -> None:
    message = redact(message, settings.secret_values())
    logger.error("off-site copy of %s failed: %s", backup_id, message)
    _alert(AlertEvent(condition="offsite", backup_id=backup_id, failures={"offsite": message}))


@app.task(name="vq_tasks.alert", bind=True, max_retries=8)
def alert(self, event: dict[str, Any]) -> dict[str, Any]:
    """Send the mail ``event`` calls for: the opening, change or resolution of an incident (one
    mail each, however often the event is delivered or repeated), or a success summary."""
    settings = get_settings()
    parsed = AlertEvent.model_validate(event)

    def work() -> dict[str, Any]:
        try:
            outcome = deliver(settings, parsed, task_id=self.request.id)
        except TransientError as exc:
            raise self.retry(countdown=_countdown(self.request.retries), exc=exc) from None
        return {"condition": parsed.condition, "outcome": outcome}

    return steps.run_once(settings, self, work)


@app.task(name="vq_tasks.verify", bind=True, throws=(PermanentError,))
def verify(
    self, backup_id: str = "latest", destination: str = "primary", origin: str = "celery"
) -> dict[str, Any]:
    """Read every stored file of ``backup_id`` (or ``latest``) in the primary or ``offsite``
    storage once and check it against the manifest; return the report. A mismatch is in the
    report (``ok`` false), not a task failure."""
    from vq_tasks.monitoring import integrity
    from vq_tasks.verify.run import summary, verify_operation

    settings = get_settings()

    def work() -> dict[str, Any]:
        storage = open_storage(settings, destination)
        report = verify_operation(storage, settings, backup_id, origin_of(origin), task_id=self.request.id)
        integrity.observe_verify(settings, report, origin_of(origin), self.request.id)
        line, verified = summary(report)
        (logger.info if verified else logger.error)("verify: %s", line)
        return report.model_dump(mode="json")

    return steps.run_once(settings, self, work)


# acknowledged on receipt and never redelivered: a restore that ran hours ago must not run again
# by itself when its worker died; the operator decides (the same restore again is safe to ask for)
@app.task(
    name="vq_tasks.restore",
    bind=True,
    throws=(PermanentError, TransientError),
    acks_late=False,
    reject_on_worker_lost=False,
)
def restore(
    self,
    backup_id: str = "latest",
    components: list[str] | None = None,
    force: bool = False,
    destination: str = "primary",
    origin: str = "celery",
) -> dict[str, Any]:
    """Verify ``backup_id`` (or ``latest``) and return the plan of restoring ``components``
    (default database, redis, config; logs only when named); with ``force``, restore them and
    return the results and the integrity report. ``destination`` "offsite" restores from the
    off-site copy. Never retried: the operator decides. ``force`` needs an authorized message
    (vq_tasks.worker.authorization)."""
    from vq_tasks.restore.run import restore_backup

    settings = get_settings()
    if force is not False:
        authorization.require(self, settings, _alert)
    try:
        storage = open_storage(settings, destination)
        report = restore_backup(
            settings, storage, backup_id, components, force=force, say=logger.info,
            origin=origin_of(origin), task_id=self.request.id,
        )  # fmt: skip
    except Exception as exc:
        message = redacted_message(exc, settings.secret_values())
        failure = TransientError(message) if is_transient(exc) else PermanentError(message)
    else:
        verdict = "ok" if report.ok else "FAILED its integrity check"
        logger.info("restore of %s (%s): %s", report.backup_id, "forced" if force else "plan", verdict)
        return report.model_dump(mode="json")
    logger.error("restore of %s failed: %s", backup_id, failure)
    raise failure


@app.task(name="vq_tasks.restore_drill", bind=True)
def restore_drill(
    self, backup_id: str = "latest", origin: str = "celery", destination: str = "primary"
) -> dict[str, Any]:
    """Restore ``backup_id`` (or ``latest``) into a scratch database, Redis and folder, check them,
    remove them, record the outcome and return the report. A failed drill (``ok`` false) opens a
    drill incident (one mail to BACKUP_ALERT_EMAIL, also when the task is redelivered); a passing
    one resolves it. Never retried."""
    from vq_tasks.restore.drill import alert_event, run_drill

    settings = get_settings()
    who = origin_of(origin)

    def work() -> dict[str, Any]:
        storage = open_storage(settings, destination)
        report = run_drill(settings, storage, backup_id, run_id=self.request.id, say=logger.info, origin=who)
        took = report.duration_seconds
        if report.ok:
            logger.info("restore drill of %s (%s): ok in %.1f s", report.backup_id, who, took)
        else:
            logger.error("restore drill of %s (%s) FAILED: %s", report.backup_id, who, report.failures)
        _alert(alert_event(report))
        return report.model_dump(mode="json")

    return steps.run_once(settings, self, work)
