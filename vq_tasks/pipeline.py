"""The backup run as plain functions, called by the thin tasks in ``tasks.py``.

start_backup takes the run lock and names the backup; dump_component stages one part;
finalize writes the stored files and, last, the manifest; fail cleans up after a failed run.
Every step can run again after a redelivery without producing a second backup.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from vq_tasks import coordination
from vq_tasks.bundle import BundleWriter, copy_staged
from vq_tasks.catalog import complete_manifests, load_manifest
from vq_tasks.errors import PermanentError, redact
from vq_tasks.manifest import (
    BUNDLED,
    COMPONENTS,
    Component,
    ComponentEntry,
    Kind,
    Manifest,
    StagedPart,
    StoredFile,
    bundle_name,
    kind_for,
    manifest_name,
    member_name,
    new_backup_id,
)
from vq_tasks.settings import Settings
from vq_tasks.sources.files import archive_config, archive_logs
from vq_tasks.sources.postgres import dump_database
from vq_tasks.sources.redis import dump_redis
from vq_tasks.staging import Producer, StagingArea, stage_part
from vq_tasks.storage import open_storage
from vq_tasks.storage.base import Storage, StorageError
from vq_tasks.streams import GzipStage, HashStage, Writer


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
    """Take the run lock and name the backup. Raise BackupRefused while another run holds the lock."""
    now = now or datetime.now(UTC)
    r = coordination.client(settings)
    wanted = new_backup_id(settings.backup_name_prefix, now)
    backup_id, refusal = coordination.acquire_lock(r, wanted, task_id, settings.backup_lock_ttl)
    if refusal:
        raise BackupRefused(f"a backup is already running: {refusal}")
    run = coordination.read_record(r, backup_id)
    if run.get("chord_started"):
        return BackupStart(backup_id, run["kind"], datetime.fromisoformat(run["started_at"]), True)
    storage = open_storage(settings)
    if storage.stat(manifest_name(backup_id)) is not None:
        coordination.release_lock(r, backup_id)
        raise BackupRefused(f"backup {backup_id} exists already; try again in a second")
    earlier = [
        m.started_at for m in complete_manifests(storage, settings.backup_name_prefix) if m.kind != "manual"
    ]
    kind = kind_for(now, scheduled, earlier)
    coordination.record(r, backup_id, status="running", kind=kind, started_at=now.isoformat())
    return BackupStart(backup_id, kind, now, False)


def mark_chord_started(settings: Settings, backup_id: str, finalize_task_id: str) -> None:
    coordination.record(
        coordination.client(settings), backup_id, chord_started=True, finalize_task_id=finalize_task_id
    )


def release(settings: Settings, backup_id: str) -> None:
    """Give up the run lock of ``backup_id`` (when its chord could not be started)."""
    coordination.release_lock(coordination.client(settings), backup_id)


def dump_component(settings: Settings, backup_id: str, component: Component) -> StagedPart:
    """Stage one component of ``backup_id`` and return its record; progress goes to the run record."""
    r = coordination.client(settings)
    status = coordination.read_record(r, backup_id).get("status")
    if status in ("succeeded", "failed"):  # a message redelivered after its run ended
        raise PermanentError(f"backup {backup_id} has already {status}; {component} is not dumped again")
    area = StagingArea(settings.backup_staging_dir, backup_id)
    coordination.refresh_lock(r, backup_id, settings.backup_lock_ttl)
    coordination.record(r, backup_id, **{f"state:{component}": "running"})

    def progress(size: int) -> None:
        coordination.record(r, backup_id, **{f"bytes:{component}": size})
        coordination.refresh_lock(r, backup_id, settings.backup_lock_ttl)

    member = member_name(component, backup_id, settings.compression_enabled)
    produce, level = _producer(settings, component)
    part = stage_part(settings, area, component, member, produce, progress, level)
    coordination.record(r, backup_id, **{f"state:{component}": "staged"})
    return part


def _producer(settings: Settings, component: Component) -> tuple[Producer, int | None]:
    """Return what writes ``component``'s content, and the gzip level of its wrapping members."""
    if component == "database":
        return (lambda out: dump_database(settings, out)), None
    if component == "redis":
        return (lambda out: dump_redis(settings, out)), None
    if component == "logs":
        return (
            lambda out: archive_logs(settings.backup_log_paths, out, settings.backup_logs_window_days)
        ), None
    if not settings.compression_enabled:
        return (lambda out: archive_config(settings.backup_config_paths, out)), None
    return _compressed_config(settings), 0


def _compressed_config(settings: Settings) -> Producer:
    """config.tar.gz: the tar is compressed here; the bundle's members around it only store it."""

    def produce(out: Writer):
        inner = GzipStage(out, settings.compression_level, settings.compression_threads)
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
    message = redact(str(exc) or type(exc).__name__, settings.secret_values())
    coordination.record(
        coordination.client(settings), backup_id, **{f"failed:{step}": message, f"state:{step}": "failed"}
    )
    return message


def finalize(
    settings: Settings, backup_id: str, records: list[dict], kind: Kind, started_at: str
) -> Manifest:
    """Write the bundle and the logs archive, check them, then the manifest, last. Return it.
    A redelivered call after the manifest was written returns that manifest."""
    storage = open_storage(settings)
    if storage.stat(manifest_name(backup_id)) is not None:
        return load_manifest(storage, backup_id)
    parts = _parts_by_component(records)
    started = datetime.fromisoformat(started_at)
    compressed = settings.compression_enabled
    files = [
        _store(
            storage,
            bundle_name(backup_id, compressed),
            lambda out: _write_bundle(out, parts, compressed, started),
        ),
        _store(storage, parts["logs"].member, lambda out: copy_staged(parts["logs"], out)),
    ]
    finished = datetime.now(UTC)
    manifest = Manifest(
        backup_id=backup_id,
        kind=kind,
        started_at=started,
        finished_at=finished,
        duration_seconds=round((finished - started).total_seconds(), 3),
        tool_version=tool_version(),
        compression="gzip" if compressed else "none",
        files=files,
        components={
            c: ComponentEntry(
                member=parts[c].member,
                stored_in=files[0].name if c in BUNDLED else files[1].name,
                content=parts[c].content,
                facts=parts[c].facts,
            )
            for c in COMPONENTS
        },
    )
    with storage.open_write(manifest_name(backup_id)) as out:
        out.write(manifest.model_dump_json(indent=2).encode() + b"\n")
    return manifest


def _parts_by_component(records: list[dict]) -> dict[str, StagedPart]:
    parts = {p.component: p for p in (StagedPart.model_validate(r) for r in records)}
    missing = [c for c in COMPONENTS if c not in parts]
    if missing:
        raise PermanentError(f"finalize got no record for {', '.join(missing)}")
    return parts


def _write_bundle(out: Writer, parts: dict[str, StagedPart], compressed: bool, started: datetime) -> None:
    bundle = BundleWriter(out, compressed, started)
    for component in BUNDLED:
        bundle.add(parts[component])
    bundle.close()


def _store(storage: Storage, name: str, write) -> StoredFile:
    """Write one object through a hash stage, then check that storage holds exactly that size."""
    with storage.open_write(name) as out:
        hashed = HashStage(out)
        write(hashed)
    checks = hashed.checksums()
    stored = storage.stat(name)
    if stored is None or stored.size != checks.size:
        found = "nothing" if stored is None else f"{stored.size} bytes"
        raise StorageError(f"{storage.describe()}/{name}: wrote {checks.size} bytes, storage has {found}")
    return StoredFile(name=name, size=checks.size, md5=checks.md5, sha256=checks.sha256)


def after_success(settings: Settings, backup_id: str) -> None:
    """Clean the staging area, mark the run done and release the lock."""
    StagingArea(settings.backup_staging_dir, backup_id).remove()
    r = coordination.client(settings)
    coordination.record(r, backup_id, status="succeeded")
    coordination.release_lock(r, backup_id)


def fail(settings: Settings, backup_id: str) -> dict[str, str]:
    """Clean up after a failed run: staging, stored objects without a manifest, the lock.
    Return the failures recorded by the run's tasks (component -> message)."""
    r = coordination.client(settings)
    run = coordination.read_record(r, backup_id)
    StagingArea(settings.backup_staging_dir, backup_id).remove()
    storage = open_storage(settings)
    if storage.stat(manifest_name(backup_id)) is None:
        for name in (
            bundle_name(backup_id, True),
            bundle_name(backup_id, False),
            member_name("logs", backup_id, True),
            member_name("logs", backup_id, False),
        ):
            storage.delete(name)
    coordination.record(r, backup_id, status="failed")
    coordination.release_lock(r, backup_id)
    return {key.split(":", 1)[1]: value for key, value in run.items() if key.startswith("failed:")}
