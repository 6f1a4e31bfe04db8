"""The backup run as plain functions, called by the thin tasks in ``worker/tasks.py``.

start_backup takes the run lock and names the backup; dump_component stages one part;
finalize writes the stored files and, last, the manifest; fail cleans up after a failed run.
Every step can run again after a redelivery without producing a second backup.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from redis.exceptions import RedisError

from vq_tasks import coordination
from vq_tasks.backup.bundle import BundleWriter, copy_staged
from vq_tasks.backup.roles import stage_globals, with_globals
from vq_tasks.backup.staging import Producer, StagingArea, stage_part
from vq_tasks.catalog.anomalies import Thresholds, find_anomalies, good_window
from vq_tasks.catalog.listing import load_manifest, readable_manifests
from vq_tasks.crypto import encryption, signing
from vq_tasks.crypto.age import X25519Recipient
from vq_tasks.crypto.signing import detached_signature, load_signing_key, manifest_document
from vq_tasks.errors import PermanentError, is_transient, redacted_message
from vq_tasks.manifest import (
    BUNDLED,
    COMPONENTS,
    Component,
    ComponentEntry,
    Kind,
    LockInfo,
    Manifest,
    StagedMember,
    StagedPart,
    StoredFile,
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
from vq_tasks.storage.base import Storage, StorageError
from vq_tasks.streams.compress import BlockStage, compression_stage
from vq_tasks.streams.stages import HashStage, Writer

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
    parts = _parts_by_component(records, settings.compression)
    _check_staged_paths(parts, StagingArea(settings.backup_staging_dir, backup_id))
    started = datetime.fromisoformat(started_at)
    compression = settings.compression
    recipients = encryption.recipients_of(settings)  # None: stored as is
    locks = lock_dates(started, kind, policy(settings)) if settings.backup_immutability else None
    backup_lock, logs_lock = (locks.until, locks.logs_until) if locks else (None, None)
    # before the upload: a storage that cannot be read fails (and retries) finalize before it
    window = good_window(storage, settings, started) if settings.backup_anomaly_window else []
    with coordination.heartbeat(coordination.client(settings), backup_id, settings.backup_lock_ttl):
        bundle = _store(
            storage,
            bundle_name(backup_id, compression, encrypted=bool(recipients)),
            lambda out: _write_bundle(out, parts, compression, started),
            recipients,
            fence,
            backup_lock,
        )
        logs_stored_as = stored_name(parts["logs"].member, encrypted=bool(recipients))
        logs = _store(
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
        _commit(storage, signature_name(backup_id), signature, fence, backup_lock)
    _commit(storage, manifest_name(backup_id), document, fence, backup_lock)
    return manifest.as_stored(document, None if signature is None else signature.decode().strip())


def _commit(
    storage: Storage, name: str, data: bytes, fence: Callable[[], None], retain_until: datetime | None = None
) -> None:
    """Store the small object ``name`` (locked until ``retain_until`` if given); ``fence`` is
    called before it is committed."""
    with storage.open_write(name, retain_until) as out:
        out.write(data)
        fence()


def _parts_by_component(records: list[dict], compression: str) -> dict[Component, StagedPart]:
    """Return the staged parts by component. Raise PermanentError if one is missing or was
    staged with another compression than this worker's (workers must agree)."""
    parts = {p.component: p for p in (StagedPart.model_validate(r) for r in records)}
    missing = [c for c in COMPONENTS if c not in parts]
    if missing:
        raise PermanentError(f"finalize got no record for {', '.join(missing)}")
    mixed = [f"{p.component} ({p.compression})" for p in parts.values() if p.compression != compression]
    if mixed:
        raise PermanentError(
            f"{', '.join(mixed)} staged with another compression than this worker's ({compression}): "
            "every worker must have the same COMPRESSION_ENABLED and COMPRESSION_ALGORITHM"
        )
    return parts


def _check_staged_paths(parts: dict[Component, StagedPart], area: StagingArea) -> None:
    """Refuse records whose staged path is not this backup's staging folder: finalize copies the
    file a record names into the backup, so a forged record must not name /etc/shadow."""
    folder = area.folder.resolve()
    files = [(p, m) for p in parts.values() for m in [p, *p.extras]]
    outside = [m.member for p, m in files if Path(m.path).resolve().parent != folder]
    if outside:
        raise PermanentError(f"staged part(s) {', '.join(outside)} are not in {area.folder}: refused")
    unseen = [f"{m.member} (staged by {p.worker})" for p, m in files if not _seen(m)]
    if unseen:
        raise PermanentError(
            f"staged part(s) {', '.join(unseen)} are not in {area.folder} on {socket.gethostname()}: "
            "BACKUP_STAGING_DIR must be one folder that every worker shares (a shared volume or NFS)"
        )


def _seen(part: StagedMember) -> bool:
    """Whether this worker sees the staged file of ``part``, at the size it was staged with."""
    try:
        return os.stat(part.path).st_size == part.staged_size
    except OSError:
        return False


def _write_bundle(
    out: Writer, parts: dict[Component, StagedPart], compression: str, started: datetime
) -> None:
    bundle = BundleWriter(out, compression, started)
    for component in BUNDLED:
        for member in [parts[component], *parts[component].extras]:
            bundle.add(member)
    bundle.close()


def _store(
    storage: Storage,
    name: str,
    write: Callable[[Writer], object],
    recipients: list[X25519Recipient] | None = None,
    fence: Callable[[], None] = lambda: None,
    retain_until: datetime | None = None,
) -> StoredFile:
    """Write one object through a hash stage, encrypted to ``recipients`` on the way if any (the
    checksums are then those of the encrypted bytes, as stored), and check that storage holds
    exactly that size. ``fence`` is called before the object is committed; it is locked until
    ``retain_until`` if given."""
    with storage.open_write(name, retain_until) as out:
        hashed = HashStage(out)  # in this thread: a background one would hold its chunks in flight
        if recipients:
            sealed = encryption.encrypting(hashed, recipients)
            write(sealed)
            sealed.close()
        else:
            write(hashed)
        fence()
    checks = hashed.checksums()
    stored = storage.stat(name)
    if stored is None or stored.size != checks.size:
        found = "nothing" if stored is None else f"{stored.size} bytes"
        raise StorageError(f"{storage.describe()}/{name}: wrote {checks.size} bytes, storage has {found}")
    return StoredFile(name=name, size=checks.size, md5=checks.md5, sha256=checks.sha256)


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
