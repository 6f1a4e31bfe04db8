"""The backup run as plain functions, called by the thin tasks in ``worker/tasks.py``.

start_backup takes the run lock and names the backup; dump_component stages one part;
finalize writes the stored files and, last, the manifest; fail cleans up after a failed run.
Every step can run again after a redelivery without producing a second backup.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from redis.exceptions import RedisError

from vq_tasks import coordination
from vq_tasks.backup.bundle import copy_staged, write_bundle
from vq_tasks.backup.objects import commit_object, store_object
from vq_tasks.backup.roles import stage_globals, with_globals
from vq_tasks.backup.staging import Producer, StagingArea, check_staged_paths, parts_by_component, stage_part
from vq_tasks.catalog.anomalies import Thresholds, find_anomalies, good_window
from vq_tasks.catalog.listing import load_manifest, readable_manifests
from vq_tasks.crypto import encryption, signing
from vq_tasks.crypto.signing import detached_signature, load_signing_key, manifest_document
from vq_tasks.errors import is_transient, redacted_message
from vq_tasks.manifest import (
    BUNDLED,
    COMPONENTS,
    Component,
    ComponentEntry,
    Kind,
    LockInfo,
    Manifest,
    StagedPart,
    bundle_name,
    data_names,
    kind_for,
    manifest_name,
    member_name,
    new_backup_id,
    parse_backup_id,
    signature_name,
    stored_name,
)
from vq_tasks.retention.plan import policy
from vq_tasks.retention.policy import lock_dates
from vq_tasks.settings import Settings
from vq_tasks.sources.files import archive_config, archive_logs
from vq_tasks.sources.postgres import dump_database
from vq_tasks.sources.redis import dump_redis
from vq_tasks.storage import open_storage
from vq_tasks.storage.base import Storage
from vq_tasks.streams.compress import BlockStage, compression_stage
from vq_tasks.streams.stages import Writer

logger = logging.getLogger(__name__)


class BackupRefused(Exception):
    """A backup was asked for while another one runs."""


@dataclass(frozen=True)
class BackupStart:
    backup_id: str
    kind: Kind
    started_at: datetime
    already_started: bool


def tool_version() -> str:
    try:
        return version("vq-backup")
    except PackageNotFoundError:
        return "0+unknown"


def start_backup(
    settings: Settings, task_id: str, scheduled: bool, now: datetime | None = None
) -> BackupStart:
    """Bind the task to a backup id, take the run lock and work out the kind. Raise BackupRefused
    while another run holds the lock. A redelivered task gets its own run back, never a second."""
    r = coordination.client(settings)
    fresh_id = new_backup_id(settings.backup_name_prefix, now or datetime.now(UTC))
    bound_ttl = settings.backup_task_time_limit + 86400
    backup_id, redelivered = coordination.backup_of_task(r, task_id, fresh_id, bound_ttl)
    started = parse_backup_id(backup_id, settings.backup_name_prefix)
    run = coordination.read_record(r, backup_id) if redelivered else {}
    if run.get("chord_started"):
        return BackupStart(backup_id, run["kind"], started, True)
    if r.exists(coordination.RESTORE_LOCK_KEY):
        raise BackupRefused("a restore is running; the backup waits for the next schedule or a manual run")
    _, refusal = coordination.acquire_lock(r, backup_id, task_id, settings.backup_lock_ttl)
    if refusal:
        raise BackupRefused(f"a backup is already running: {refusal}")
    try:
        ended = not redelivered and coordination.read_record(r, backup_id).get("status") in (
            "succeeded",
            "failed",
        )
        storage = open_storage(settings)
        if ended or storage.stat(manifest_name(backup_id)) is not None:  # a run in this same second
            raise BackupRefused(f"backup {backup_id} exists already; try again in a second")
        manifests = readable_manifests(storage, settings.backup_name_prefix, signing.trusted_keys(settings))
        earlier = [m.started_at for m in manifests if m.kind != "manual" and m.started_at < started]
        kind = kind_for(started, scheduled, earlier)
        coordination.record(r, backup_id, status="running", kind=kind, started_at=started.isoformat())
    except BaseException:
        coordination.release_lock(r, backup_id)
        raise
    return BackupStart(backup_id, kind, started, False)


def mark_chord_started(settings: Settings, backup_id: str) -> None:
    """Note, before the chord is sent, that it is: a redelivered task must never send a second."""
    coordination.record(coordination.client(settings), backup_id, chord_started=True)


def release(settings: Settings, backup_id: str) -> None:
    """Give up the run lock of ``backup_id`` (when its chord could not be started)."""
    coordination.release_lock(coordination.client(settings), backup_id)


class RunEnded(Exception):
    """A message redelivered after its run succeeded or failed: there is nothing left to do."""


def dump_component(
    settings: Settings, backup_id: str, component: Component, fence: Callable[[], None] = lambda: None
) -> StagedPart:
    """Stage one component of ``backup_id`` and return its record; progress goes to the run record.
    Raise RunEnded if the run is over already; return the part an earlier execution staged, if
    any. ``fence`` is called before the part is put in place and recorded, and raises if this
    execution may no longer do so (its step was taken over)."""
    r = coordination.client(settings)
    run = coordination.read_record(r, backup_id)
    status = run.get("status")
    if status in ("succeeded", "failed"):
        raise RunEnded(f"backup {backup_id} has already {status}; {component} is not dumped again")
    staged = _staged_before(run, component)
    if staged is not None:
        logger.info("%s of %s was staged by an earlier execution; not dumped again", component, backup_id)
        return staged
    area = StagingArea(settings.backup_staging_dir, backup_id)
    report(settings, backup_id, **{f"state:{component}": "running"})
    member = member_name(component, backup_id, settings.compression)
    produce, level = _producer(settings, component)

    def progress(size: int) -> None:
        report(settings, backup_id, **{f"bytes:{component}": size})

    with coordination.heartbeat(r, backup_id, settings.backup_lock_ttl):
        part = stage_part(settings, area, component, member, produce, progress, level, fence)
        part = with_globals(part, *stage_globals(settings, area, fence)) if component == "database" else part
    fence()
    done = {f"state:{component}": "staged", f"part:{component}": part.model_dump(mode="json")}
    report(settings, backup_id, **done)
    return part


def _staged_before(run: dict, component: Component) -> StagedPart | None:
    """The part of ``component`` an earlier execution staged and recorded, if its file is still
    there: a message handed out again after its step was done has nothing left to do."""
    recorded = run.get(f"part:{component}")
    if not recorded:
        return None
    part = StagedPart.model_validate(recorded)
    return part if all(Path(p.path).is_file() for p in [part, *part.extras]) else None


def report(settings: Settings, backup_id: str, **fields: object) -> None:
    """Note progress in the run record; a failure to do so is logged, never fatal to the work."""
    try:
        coordination.record(coordination.client(settings), backup_id, **fields)
    except RedisError as exc:
        logger.warning("could not update the run record of %s: %s", backup_id, exc)


def _producer(settings: Settings, component: Component) -> tuple[Producer, int | None]:
    """Return what writes ``component``'s content, and the level of its wrapping members (frames)."""
    if component == "database":
        return (lambda out: dump_database(settings, out)), None
    if component == "redis":
        return (lambda out: dump_redis(settings, out)), None
    if component == "logs":
        return (
            lambda out: archive_logs(settings.backup_log_paths, out, settings.backup_logs_window_days)
        ), None
    if settings.compression == "none":
        return (lambda out: archive_config(settings.backup_config_paths, out)), None
    return _compressed_config(settings), 0


def _compressed_config(settings: Settings) -> Producer:
    """config.tar.gz (.zst): the tar is compressed here; the bundle's members around it only store it."""

    def produce(out: Writer):
        level, threads = settings.effective_compression_level, settings.compression_threads
        inner = compression_stage(out, settings.compression, level, threads)
        assert isinstance(inner, BlockStage)
        try:
            facts = archive_config(settings.backup_config_paths, inner)
            inner.close()
        except BaseException:
            inner.abort()
            raise
        return facts

    return produce


def record_failure(settings: Settings, backup_id: str, step: str, exc: BaseException) -> str:
    """Note in the run record that ``step`` failed; return the redacted message."""
    message = redacted_message(exc, settings.secret_values())
    reason = "transient" if is_transient(exc) else "permanent"
    report(
        settings,
        backup_id,
        **{f"failed:{step}": message, f"state:{step}": "failed", f"reason:{step}": reason},
    )
    return message


def finalize(
    settings: Settings,
    backup_id: str,
    records: list[dict],
    kind: Kind,
    started_at: str,
    fence: Callable[[], None] = lambda: None,
) -> Manifest:
    """Write the bundle and the logs archive, check them, then the manifest, last. Return it.
    A redelivered call after the manifest was written returns that manifest. ``fence`` is called
    before the manifest is written, and raises if this execution may no longer write it."""
    storage = open_storage(settings)
    if storage.stat(manifest_name(backup_id)) is not None:
        return load_manifest(storage, backup_id)
    parts = parts_by_component(records, settings.compression)
    check_staged_paths(parts, StagingArea(settings.backup_staging_dir, backup_id))
    started = datetime.fromisoformat(started_at)
    compression = settings.compression
    recipients = encryption.recipients_of(settings)  # None: stored as is
    locks = lock_dates(started, kind, policy(settings)) if settings.backup_immutability else None
    backup_lock, logs_lock = (locks.until, locks.logs_until) if locks else (None, None)
    # before the upload: a storage that cannot be read fails (and retries) finalize before it
    window = good_window(storage, settings, started) if settings.backup_anomaly_window else []
    with coordination.heartbeat(coordination.client(settings), backup_id, settings.backup_lock_ttl):
        bundle = store_object(
            storage,
            bundle_name(backup_id, compression, encrypted=bool(recipients)),
            lambda out: write_bundle(out, parts, compression, started),
            recipients,
            fence,
            backup_lock,
        )
        logs_stored_as = stored_name(parts["logs"].member, encrypted=bool(recipients))
        logs = store_object(
            storage,
            logs_stored_as,
            lambda out: copy_staged(parts["logs"], out),
            recipients,
            fence,
            logs_lock,
        )
    components = {
        c: ComponentEntry(
            member=parts[c].member,
            stored_in=bundle.name if c in BUNDLED else logs.name,
            content=parts[c].content,
            facts=parts[c].facts,
            stored_size=parts[c].staged_size,
            duration_seconds=parts[c].duration_seconds,
        )
        for c in COMPONENTS
    }
    anomalies = find_anomalies(components, window, Thresholds.of(settings))
    if anomalies:
        logger.warning("backup %s is suspicious: %s", backup_id, "; ".join(a.text for a in anomalies))
    finished = datetime.now(UTC)
    manifest = Manifest(
        backup_id=backup_id,
        kind=kind,
        started_at=started,
        finished_at=finished,
        duration_seconds=round((finished - started).total_seconds(), 3),
        tool_version=tool_version(),
        compression=compression,
        files=[bundle, logs],
        components=components,
        encryption=encryption.info_of(recipients),
        locks=None if locks is None else LockInfo(mode=settings.backup_immutability_mode, **asdict(locks)),
        anomalies=anomalies,
        compared_with=[m.backup_id for m in window],
    )
    document = manifest_document(manifest)
    signature = None
    if settings.backup_signing_key_file is not None:  # detached, over these bytes; written first
        signature = detached_signature(document, load_signing_key(settings.backup_signing_key_file))
        commit_object(storage, signature_name(backup_id), signature, fence, backup_lock)
    commit_object(storage, manifest_name(backup_id), document, fence, backup_lock)
    return manifest.as_stored(document, None if signature is None else signature.decode().strip())


def after_success(settings: Settings, backup_id: str) -> None:
    """Clean the staging area, mark the run done and release the lock."""
    StagingArea(settings.backup_staging_dir, backup_id).remove()
    report(settings, backup_id, status="succeeded")
    r = coordination.client(settings)
    coordination.count_once(r, f"run:{backup_id}", {"runs:succeeded": 1})
    coordination.release_lock(r, backup_id)


def fail(settings: Settings, backup_id: str) -> dict[str, str] | None:
    """Clean up after a failed run: staging, stored objects without a manifest, the lock. Return
    the failures recorded by the run's tasks (step -> message), or None when the backup is in
    fact complete (its manifest exists: only a step after it failed)."""
    r = coordination.client(settings)
    run = coordination.read_record(r, backup_id)
    StagingArea(settings.backup_staging_dir, backup_id).remove()
    try:
        complete = _remove_incomplete(open_storage(settings), backup_id)
    except Exception as exc:  # the storage may be what failed: the alert must still go out
        logger.warning("could not clean the storage after %s (prune will): %s", backup_id, exc)
        complete = False
    coordination.record(r, backup_id, status="succeeded" if complete else "failed")
    coordination.release_lock(r, backup_id)
    if complete:
        return None
    failures = {key.split(":", 1)[1]: value for key, value in run.items() if key.startswith("failed:")}
    reasons = {
        f"failures:{step}:{run.get(f'reason:{step}', 'unknown')}": 1 for step in failures or ["unknown"]
    }
    coordination.count_once(r, f"run:{backup_id}", {"runs:failed": 1, **reasons})
    return failures


def _remove_incomplete(storage: Storage, backup_id: str) -> bool:
    """Delete the stored files of ``backup_id`` unless its manifest exists; return whether it does."""
    if storage.stat(manifest_name(backup_id)) is not None:
        return True
    for name in data_names(backup_id):
        storage.delete(name)
    return False
