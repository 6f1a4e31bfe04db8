"""Restore a stored backup: verify it, take out what is needed, then plan or restore each component
and check the result. The vq_tasks.restore task and ``vq-backup restore`` both call restore_backup.

Without ``force`` nothing changes: the result is the plan (what each component would replace).
With it, the restore lock is taken (one restore at a time, none while a backup runs), and the
components are restored and checked (apply.py). Every file is checked against the manifest as it
is read, once; a backup that fails a check is never restored. The work folder (under
BACKUP_STAGING_DIR) is always removed.

The manifest may be forged: it must name only its own backup's files (catalog/trust.py). Before the
first component is restored, the dump and the RDB must be what it says and no archive entry may be
refused (restore/files.py): otherwise nothing is restored.
"""

from __future__ import annotations

import contextlib
import difflib
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import cast

import redis
from pydantic import BaseModel, computed_field

from vq_tasks import coordination
from vq_tasks.audit import audit
from vq_tasks.catalog.latest import resolve_backup_id
from vq_tasks.catalog.listing import load_manifest
from vq_tasks.catalog.trust import check_manifest
from vq_tasks.crypto import signing
from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.logs import Say
from vq_tasks.manifest import COMPONENTS, Component, Manifest
from vq_tasks.restore.apply import (
    RestorePlan,
    RestoreResults,
    apply_restore,
    check_archives,
    check_integrity,
    plan_restore,
)
from vq_tasks.restore.contents import check_contents
from vq_tasks.restore.extract import extract_to, local_name
from vq_tasks.restore.integrity import IntegrityReport
from vq_tasks.restore.leftovers import owned_folder
from vq_tasks.settings import Settings
from vq_tasks.storage.base import Storage
from vq_tasks.verify.run import report_rows, verify_backup

DEFAULT_COMPONENTS: tuple[Component, ...] = ("database", "redis", "config")
FOLDER_PREFIX = ".restore-"  # the work folder of a restore, under BACKUP_STAGING_DIR


def _quiet(line: str) -> None:
    """Say nothing."""


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


def choose_components(requested: Iterable[str] | str | None) -> list[Component]:
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
    backup_id = resolve_backup_id(storage, settings, backup_id, restorable=True)
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
        components=list(chosen),  # a list[str] field: pydantic copies the list anyway
        forced=force,
        verify_ok=True,
        plan=plan,
        results=results,
        integrity=integrity,
        duration_seconds=round(time.monotonic() - started, 3),
    )


def trusted_manifest(
    storage: Storage, settings: Settings, backup_id: str, chosen: list[Component]
) -> Manifest:
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
    storage: Storage, settings: Settings, backup_id: str, chosen: list[Component], say: Say
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


def running_backup(r: redis.Redis) -> str | None:
    """Return the id of the backup that holds the run lock, or None (also when its run has just
    ended and only the release is pending)."""
    holder = cast("str | None", r.get(coordination.LOCK_KEY))  # the coordination client decodes replies
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
