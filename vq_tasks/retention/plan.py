"""The retention plan of one storage (``plan``) and its application (``prune``): what the policy
deletes from the backups listed there, and the staging folders that runs of dead workers left.

Each complete backup's manifest is read once for its kind and whether it is suspicious; its
acceptance only when the manifest has anomalies and the listing shows an acceptance object. Each
destination is judged from its own listing (`vq-backup accept` writes the acceptance to the
off-site copy too, and copy_offsite takes it along).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import groupby
from operator import attrgetter
from pathlib import Path

from vq_tasks.catalog.anomalies import is_good
from vq_tasks.catalog.backup_set import ROLE_ORDER, BackupSet
from vq_tasks.catalog.listing import backup_sets, load_manifest
from vq_tasks.crypto import signing
from vq_tasks.errors import BackupError
from vq_tasks.manifest import Manifest, parse_backup_id
from vq_tasks.retention.policy import IN_PROGRESS_GRACE, Deletion, Kept, Policy, decide, kept
from vq_tasks.settings import Settings
from vq_tasks.storage.base import ObjectLocked, Storage

logger = logging.getLogger(__name__)


def in_progress_grace(settings: Settings) -> timedelta:
    """How long a backup without a manifest may still be running: a day, or two task time limits."""
    return max(IN_PROGRESS_GRACE, timedelta(seconds=2 * settings.backup_task_time_limit))


def shortest_retention(settings: Settings) -> timedelta:
    """The shortest time retention keeps any stored object: a store must lock none longer."""
    return timedelta(days=min(settings.backup_retention_days, settings.backup_logs_retention_days))


def policy(settings: Settings) -> Policy:
    """Given settings, return the retention policy they set (grandfather-father-son, see retention.policy)."""
    return Policy(
        retention_days=settings.backup_retention_days,
        logs_retention_days=settings.backup_logs_retention_days,
        weekly_weeks=settings.backup_weekly_retention_weeks,
        monthly_months=settings.backup_monthly_retention_months,
        in_progress_grace=in_progress_grace(settings),
        keep_good=settings.backup_anomaly_keep_good,
    )


@dataclass(frozen=True)
class Plan:
    """The stored backups (with their kinds) and what the retention policy deletes of them; the
    ones it keeps past their retention (``kept``), and the suspicious ones that make it so."""

    sets: list[BackupSet]
    deletions: list[Deletion]
    kept: list[Kept] = field(default_factory=list)
    suspicious: frozenset[str] = frozenset()

    @property
    def expired(self) -> list[str]:
        """The ids of the complete backups the plan deletes whole (their manifest goes), oldest first."""
        gone = {d.backup_id for d in self.deletions if d.order == ROLE_ORDER["manifest"]}
        return [b.backup_id for b in self.sets if b.complete and b.backup_id in gone]


@dataclass(frozen=True)
class Listing:
    """The backups of one storage with their kinds, and the ids of the suspicious, unaccepted ones."""

    sets: list[BackupSet]
    suspicious: frozenset[str] = frozenset()


def with_kinds(
    storage: Storage,
    sets: list[BackupSet],
    kinds: Mapping[str, str] | None = None,
    keys: signing.PublicKeys | None = None,
) -> list[BackupSet]:
    """Given backup sets, return them with the kind of each complete one (see ``read_listing``)."""
    return read_listing(storage, sets, kinds, keys).sets


def read_listing(
    storage: Storage,
    sets: list[BackupSet],
    kinds: Mapping[str, str] | None = None,
    keys: signing.PublicKeys | None = None,
) -> Listing:
    """Given backup sets, return them with the kind of each complete one: from ``kinds`` (id ->
    kind, recorded by our own runs) when given, else from its manifest in ``storage``, which also
    tells whether it is suspicious. A kind that cannot be known stays None (retention then keeps
    the backup as if monthly); an unreadable manifest is logged. One whose signature fails
    ``keys`` is kept as if monthly and marked untrusted, so that it cannot count as the newest
    backup; its anomalies are not believed either."""
    found, suspicious = [], set()
    for entry in sets:
        if entry.complete and kinds is not None:
            entry = replace(entry, kind=kinds.get(entry.backup_id), trusted=True)
        elif entry.complete:
            entry, manifest = _read_one(storage, entry, keys or {})
            if manifest is not None and _suspicious(storage, entry, manifest, keys or {}):
                suspicious.add(entry.backup_id)
        else:
            entry = replace(entry, kind=None, trusted=True)
        found.append(entry)
    return Listing(found, frozenset(suspicious))


def _read_one(
    storage: Storage, entry: BackupSet, keys: signing.PublicKeys
) -> tuple[BackupSet, Manifest | None]:
    """Return ``entry`` with its manifest's kind, and the manifest if it is trusted."""
    try:
        manifest = load_manifest(storage, entry.backup_id)
    except BackupError as exc:
        logger.warning("%s; kept as a monthly backup", exc)
        return replace(entry, kind=None, trusted=True), None
    problem = signing.distrust(manifest, keys)
    if problem:
        logger.warning("%s: manifest signature %s; kept as monthly", entry.backup_id, problem)
        return replace(entry, kind=None, trusted=False), None
    return replace(entry, kind=manifest.kind, trusted=True), manifest


def _suspicious(storage: Storage, entry: BackupSet, manifest: Manifest, keys: signing.PublicKeys) -> bool:
    """Whether a trusted manifest has anomalies and no acceptance that counts. An acceptance that
    cannot be read now counts as none: retention then keeps more, never less."""
    try:
        return not is_good(storage, manifest, keys, "acceptance" in entry.roles)
    except BackupError as exc:
        logger.warning("%s: its acceptance could not be read (%s); taken as suspicious", entry.backup_id, exc)
        return True


def suspicious_ids(
    storage: Storage, sets: list[BackupSet], manifests: Mapping[str, Manifest], keys: signing.PublicKeys
) -> frozenset[str]:
    """Given backup sets and the manifests a caller read of them (by id), return the ids of the
    suspicious, unaccepted ones, as ``read_listing`` finds them: for ``plan``'s ``suspicious``
    when the caller passes ``kinds``. Only the acceptances of suspicious manifests are read."""
    found = set()
    for entry in sets:
        manifest = manifests.get(entry.backup_id)
        if manifest is None or not manifest.anomalies or signing.distrust(manifest, keys):
            continue
        if _suspicious(storage, entry, manifest, keys):
            found.add(entry.backup_id)
    return frozenset(found)


def _listing(storage: Storage, settings: Settings, kinds: Mapping[str, str] | None) -> Listing:
    sets = backup_sets(storage.list(), settings.backup_name_prefix)
    return read_listing(storage, sets, kinds, signing.trusted_keys(settings))


def plan(
    storage: Storage,
    settings: Settings,
    now: datetime,
    kinds: Mapping[str, str] | None = None,
    ended: frozenset[str] = frozenset(),
    suspicious: frozenset[str] = frozenset(),
) -> Plan:
    """Given a storage and settings, return what the retention policy deletes there at ``now``.
    ``kinds`` (backup id -> kind) spares reading the manifests when the caller has them, then with
    ``suspicious`` (the ids of the suspicious, unaccepted backups it knows of); ``ended`` holds
    the ids of runs known to have failed (their debris goes at once)."""
    listing = _listing(storage, settings, kinds)
    found = listing.suspicious if kinds is None else suspicious
    return _plan(listing.sets, now, policy(settings), ended, found)


def _plan(
    sets: list[BackupSet], now: datetime, rules: Policy, ended: frozenset[str], suspicious: frozenset[str]
) -> Plan:
    """Return what ``rules`` delete of ``sets`` and what they keep past retention, and why."""
    return Plan(
        sets, decide(sets, now, rules, ended, suspicious), kept(sets, now, rules, suspicious), suspicious
    )


def prune(
    storage: Storage,
    settings: Settings,
    now: datetime,
    dry_run: bool = False,
    clean_staging: bool = True,
    failed_runs: Callable[[list[str]], set[str]] | None = None,
    kinds: Mapping[str, str] | None = None,
    on_deleted: Callable[[list[Deletion]], object] | None = None,
) -> PruneResult:
    """Delete what the retention policy lets go, uploads that never completed, and (with
    ``clean_staging``) the staging folders of runs that died; nothing with ``dry_run``. Given
    ``failed_runs`` (ids -> those whose run is known to have failed), the debris of a failed run
    goes at once instead of after the grace; ``kinds`` as for ``plan``. ``on_deleted`` is called
    with the deletions of each backup once done (also those done before a failure). Return what
    was (or would be) deleted and why, and what was kept past its retention and why. Raise what a
    storage raises."""
    listing = _listing(storage, settings, kinds)
    sets = listing.sets
    incomplete = [b.backup_id for b in sets if not b.complete]
    ended = frozenset(failed_runs(incomplete)) if failed_runs and incomplete else frozenset()
    planned = _plan(sets, now, policy(settings), ended, listing.suspicious)
    deletions = planned.deletions
    if dry_run:
        return PruneResult(deletions, [], [], sets, kept=planned.kept, suspicious=planned.suspicious)
    grace = in_progress_grace(settings)
    stale = (
        remove_stale(settings.backup_staging_dir, settings.backup_name_prefix, now, grace)
        if clean_staging
        else []
    )
    locked = apply(storage, deletions, on_deleted)
    try:
        aborted = storage.abort_stale_uploads(now - grace)
    except BackupError as exc:  # e.g. no s3:ListBucketMultipartUploads: the rest of prune still counts
        logger.warning("could not abort stale uploads in %s: %s", storage.describe(), exc)
        aborted = []
    return PruneResult(deletions, stale, aborted, sets, locked, planned.kept, planned.suspicious)


def apply(
    storage: Storage, deletions: list[Deletion], on_deleted: Callable[[list[Deletion]], object] | None = None
) -> list[Locked]:
    """Delete ``deletions``, sorted by backup as ``decide`` returns them; after each backup's (or
    a failure in it), call ``on_deleted`` with those of its deletions that were done. A backup
    whose deletion fails keeps its remaining files and does not spare the others: the first
    failure is raised once every backup was tried. A file still under a retention lock is no
    failure: its backup keeps it and its remaining files until a prune after the lock's end;
    return those files, with the lock's end where the store tells it."""
    failures: list[Exception] = []
    locked: list[Locked] = []
    for _, group in groupby(deletions, key=attrgetter("backup_id")):
        done: list[Deletion] = []
        try:
            for deletion in group:
                storage.delete(deletion.name)
                done.append(deletion)
        except ObjectLocked as exc:
            locked.append(Locked(deletion, exc.until))
        except Exception as exc:
            logger.warning("could not delete %s from %s: %s", deletion.name, storage.describe(), exc)
            failures.append(exc)
        if done and on_deleted is not None:
            on_deleted(done)
    if failures:
        raise failures[0]
    return locked


@dataclass(frozen=True)
class Locked:
    """A deletion the store refused because the file is locked ``until`` then (None: not told)."""

    deletion: Deletion
    until: datetime | None


@dataclass(frozen=True)
class PruneResult:
    deletions: list[Deletion]
    stale_staging: list[str]
    aborted_uploads: list[str] = field(default_factory=list)
    sets: list[BackupSet] = field(default_factory=list)  # as listed before the prune, with kinds
    locked: list[Locked] = field(default_factory=list)  # not yet deletable: retention locks
    kept: list[Kept] = field(default_factory=list)  # past retention, kept: newer ones are suspicious
    suspicious: frozenset[str] = frozenset()  # the suspicious, unaccepted backups listed


def remove_stale(root: Path, prefix: str, now: datetime, older_than: timedelta) -> list[str]:
    """Remove the staging folders of backups started more than ``older_than`` before ``now``
    (left by runs whose workers died); return their names. Folders not named by a backup id stay."""
    removed = []
    for folder in root.iterdir() if root.is_dir() else []:
        try:
            started = parse_backup_id(folder.name, prefix)
        except ValueError:
            continue
        if now - started > older_than:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed
