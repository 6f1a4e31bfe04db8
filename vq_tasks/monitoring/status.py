"""The state of the backups, read into one immutable snapshot: what each destination holds (its
listing and the manifests in it), the runs, lifetime counters, prunes and drill recorded in Celery's
Redis, and whether the broker answers. The exporter serves it as metrics and ``/healthz``; alerting
reads it too. Everything comes from storage and Redis, so a snapshot is the same in any process,
after any restart. A source that fails is reported in the snapshot (redacted), never raised."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast, get_args

import redis

from vq_tasks import coordination
from vq_tasks.catalog.anomalies import is_good
from vq_tasks.catalog.backup_set import BackupSet
from vq_tasks.catalog.listing import backup_sets, load_manifest
from vq_tasks.crypto.signing import trusted_keys
from vq_tasks.errors import BackupError, redacted_message
from vq_tasks.manifest import Kind, Manifest, parse_backup_id
from vq_tasks.retention.plan import plan, suspicious_ids
from vq_tasks.settings import Settings
from vq_tasks.storage import ROLES, open_storage
from vq_tasks.storage.base import Storage, StoredObject

KINDS: tuple[str, ...] = get_args(Kind)
FINISHED = ("succeeded", "failed")
SOURCE_TIMEOUT = 5.0  # seconds for the broker and Redis to answer; a reading must not hang
GIB = 1 << 30
Space = tuple[int | None, int | None]  # (free, capacity) bytes, each None when unknown
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DestinationStatus:
    """One destination (``primary`` or ``offsite``) as listed; ``error`` (redacted) when it could
    not be read, and then no other field is known. ``backups`` counts complete ones by kind."""

    role: str
    description: str
    error: str | None
    backups: dict[str, int]
    incomplete: int
    expired: int
    newest_success: datetime | None
    used_bytes: int | None
    free_bytes: int | None
    capacity_bytes: int | None

    @property
    def free_percent(self) -> float | None:
        """Free space as a share of the capacity, in percent; None when unknown."""
        if self.free_bytes is None or not self.capacity_bytes:
            return None
        return 100.0 * self.free_bytes / self.capacity_bytes


@dataclass(frozen=True)
class RunStatus:
    """One backup run: ``status`` running, succeeded or failed; ``failures`` step -> message."""

    backup_id: str
    status: str
    started_at: datetime | None
    failures: dict[str, str]


LatestRuns = tuple[RunStatus | None, RunStatus | None]  # the most recent run, and finished run


@dataclass(frozen=True)
class Status:
    """The state of the backups at ``taken_at``. ``last_run`` is the most recent run, any outcome;
    ``last_finished`` the most recent one that succeeded or failed. ``broker_error`` and
    ``coordination_error`` (Celery's Redis, where run records live) are None when they answered.
    ``last_accepted``: whether the newest complete backup's anomalies were accepted (None: its
    acceptance could not be read)."""

    taken_at: datetime
    destinations: dict[str, DestinationStatus]
    last_manifest: Manifest | None
    last_run: RunStatus | None
    last_finished: RunStatus | None
    running: bool
    counters: dict[str, int]
    prunes: dict[str, dict]
    drill: dict
    broker_error: str | None
    coordination_error: str | None
    last_accepted: bool | None = False  # its anomalies accepted as intended; None: unknown

    @property
    def last_suspicious(self) -> bool | None:
        """Whether the newest complete backup is suspicious: it has anomalies and no acceptance
        that counts. None when unknown (no complete backup, or its acceptance could not be read)."""
        if self.last_manifest is None or self.last_accepted is None:
            return None
        return bool(self.last_manifest.anomalies) and not self.last_accepted

    def health(self, settings: Settings) -> dict[str, str | None]:
        """Return each check (broker, storage, offsite_storage when configured, last_backup) ->
        None when it is as it should be, else why not."""
        checks = {"broker": self._broker_problem(), "storage": self._storage_problem("primary")}
        if "offsite" in self.destinations:
            checks["offsite_storage"] = self._storage_problem("offsite")
        checks["last_backup"] = self._last_backup_problem(settings.backup_stale_after_hours)
        return checks

    def _broker_problem(self) -> str | None:
        problems = []
        if self.broker_error:
            problems.append(f"the broker does not answer: {self.broker_error}")
        if self.coordination_error:
            problems.append(f"Celery's Redis (run records) does not answer: {self.coordination_error}")
        return "; ".join(problems) or None

    def _storage_problem(self, role: str) -> str | None:
        found = self.destinations.get(role)
        if found is None:
            return f"the {role} storage was not read"
        return f"{found.description}: {found.error}" if found.error else None

    def _last_backup_problem(self, stale_after_hours: float) -> str | None:
        primary = self.destinations.get("primary")
        if self.last_manifest is None:
            if primary is None or primary.error:
                return "unknown: the primary storage could not be read"
            return f"no complete backup in {primary.description}"
        age = self.taken_at - self.last_manifest.finished_at
        if age <= timedelta(hours=stale_after_hours):
            return None
        return (
            f"the newest complete backup, {self.last_manifest.backup_id}, finished "
            f"{age.total_seconds() / 3600:.1f} h ago: "
            f"more than BACKUP_STALE_AFTER_HOURS={stale_after_hours:g}"
        )


class StatusReader:
    """Read snapshots of one deployment. Manifests never change once written, so they are cached
    by backup id and each reading loads only the manifests that are new since the last one."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._secrets = settings.secret_values()
        self._manifests: dict[str, dict[str, Manifest]] = {role: {} for role in ROLES}
        self._unreadable: set[tuple[str, str]] = set()
        self._storages: dict[str, Storage] = {}
        self._acceptances: dict[str, set[str]] = {}  # role -> the ids whose listing shows one
        self._redis = redis.Redis.from_url(
            settings.result_backend_url,
            decode_responses=True,
            socket_timeout=SOURCE_TIMEOUT,
            socket_connect_timeout=SOURCE_TIMEOUT,
        )

    def read(self, now: datetime | None = None) -> Status:
        """Return the state now: every source read once; a failing one is reported, not raised."""
        now = now or datetime.now(UTC)
        roles = [role for role in ROLES if self.settings.destination(role) is not None]
        destinations = {role: self._destination(role, now) for role in roles}
        primary = destinations["primary"]
        last_manifest = None if primary.error else self._newest_manifest("primary")
        records, coordination_error = self._records(roles, last_manifest)
        accepted = self._accepted("primary", last_manifest) if last_manifest else False
        return Status(
            taken_at=now,
            destinations=destinations,
            last_manifest=last_manifest,
            last_run=records.get("last_run"),
            last_finished=records.get("last_finished"),
            running=records.get("running", False),
            counters=records.get("counters", {}),
            prunes=records.get("prunes", {}),
            drill=records.get("drill", {}),
            broker_error=self._broker_error(),
            coordination_error=coordination_error,
            last_accepted=accepted,
        )

    def _destination(self, role: str, now: datetime) -> DestinationStatus:
        destination = self.settings.destination(role)
        assert destination is not None  # read() passes only the roles it found configured
        description = f"{destination.location.provider}:{destination.location.path}"
        try:
            storage = open_storage(self.settings, role)
            description = storage.describe()
            objects = storage.list()
            sets = backup_sets(objects, self.settings.backup_name_prefix)
            self._storages[role] = storage
            self._acceptances[role] = {entry.backup_id for entry in sets if "acceptance" in entry.roles}
            manifests = self._load_manifests(role, storage, sets)
            kinds = {backup_id: m.kind for backup_id, m in manifests.items()}
            suspicious = suspicious_ids(storage, sets, manifests, trusted_keys(self.settings))
            expired = plan(storage, self.settings, now, kinds, suspicious=suspicious).expired
            space = storage_space(self.settings, role, storage, sum(o.size for o in objects))
        except Exception as exc:  # any failure of a provider or its SDK: reported, not raised
            return failed_destination(role, description, self._redact(exc))
        return counted_destination(role, description, objects, sets, manifests, len(expired), space)

    def _load_manifests(self, role: str, storage: Storage, sets: list[BackupSet]) -> dict[str, Manifest]:
        """Return the manifests of the complete backups in ``sets`` by id, reading only new ones;
        drop those no longer listed from the cache. One that cannot be read is left out."""
        cache = self._manifests[role]
        complete = [entry.backup_id for entry in sets if entry.complete]
        for backup_id in set(cache) - set(complete):
            del cache[backup_id]
        for backup_id in complete:
            if backup_id not in cache:
                try:
                    cache[backup_id] = load_manifest(storage, backup_id)
                except BackupError as exc:  # a damaged manifest: the others still count
                    if (role, backup_id) not in self._unreadable:
                        logger.warning("%s", self._redact(exc))
                    self._unreadable.add((role, backup_id))
        return {backup_id: cache[backup_id] for backup_id in complete if backup_id in cache}

    def _newest_manifest(self, role: str) -> Manifest | None:
        manifests = self._manifests[role].values()
        return max(manifests, key=lambda m: m.started_at, default=None)

    def _accepted(self, role: str, manifest: Manifest) -> bool | None:
        """Return whether ``manifest``'s anomalies were accepted: its acceptance is read only when
        it has some and the listing shows one. None when it could not be read (logged)."""
        if not manifest.anomalies:
            return False
        listed = manifest.backup_id in self._acceptances.get(role, set())
        try:
            return is_good(self._storages[role], manifest, trusted_keys(self.settings), listed)
        except Exception as exc:  # a provider's or a key file's error: unknown, not suspicious
            logger.warning(
                "the acceptance of %s could not be read: %s", manifest.backup_id, self._redact(exc)
            )
            return None

    def _records(self, roles: list[str], last_manifest: Manifest | None) -> tuple[dict[str, Any], str | None]:
        """Return what Celery's Redis records (runs, counters, prunes, drill), or the error."""
        r = self._redis
        try:
            runs = read_runs(r, self.settings.backup_name_prefix)
            records: dict[str, Any] = {
                "running": bool(r.exists(coordination.LOCK_KEY)),
                "counters": coordination.read_counters(r),
                "prunes": {role: coordination.read_prune(r, role) for role in roles},
                "drill": coordination.read_drill(r),
            }
        except Exception as exc:  # unreachable, refused, or a record that does not parse
            return {}, self._redact(exc)
        last_run, last_finished = latest_runs(runs, last_manifest)
        return {**records, "last_run": last_run, "last_finished": last_finished}, None

    def _broker_error(self) -> str | None:
        try:
            check_broker(self.settings.celery_broker_url.get_secret_value(), SOURCE_TIMEOUT)
        except Exception as exc:
            return self._redact(exc)
        return None

    def _redact(self, exc: BaseException) -> str:
        return redacted_message(exc, self._secrets)


def failed_destination(role: str, description: str, error: str) -> DestinationStatus:
    """Return the status of a destination that could not be read."""
    return DestinationStatus(role, description, error, {}, 0, 0, None, None, None, None)


def counted_destination(
    role: str,
    description: str,
    objects: list[StoredObject],
    sets: list[BackupSet],
    manifests: dict[str, Manifest],
    expired: int,
    space: Space,
) -> DestinationStatus:
    """Return the status of a destination from its listing, its (readable) manifests, the
    number of expired backups and its (free, capacity) bytes."""
    backups = dict.fromkeys(KINDS, 0)
    for manifest in manifests.values():
        backups[manifest.kind] = backups.get(manifest.kind, 0) + 1
    newest = max(manifests.values(), key=lambda m: m.started_at, default=None)
    return DestinationStatus(
        role=role,
        description=description,
        error=None,
        backups=backups,
        incomplete=sum(not entry.complete for entry in sets),
        expired=expired,
        newest_success=newest.finished_at if newest else None,
        used_bytes=sum(o.size for o in objects),
        free_bytes=space[0],
        capacity_bytes=space[1],
    )


def read_runs(r: redis.Redis, prefix: str) -> list[RunStatus]:
    """Return every backup run recorded in Celery's Redis (records expire after RUN_RECORD_TTL);
    the drill's and the prunes' records under the same key prefix are left out."""
    head = coordination.RUN_KEY.format("")
    ids = []
    for key in r.scan_iter(coordination.RUN_KEY.format("*"), count=500):
        backup_id = key[len(head) :]
        if key != coordination.DRILL_KEY and not backup_id.startswith("prune:"):
            ids.append(backup_id)
    pipe = r.pipeline(transaction=False)
    for backup_id in ids:
        pipe.hgetall(coordination.RUN_KEY.format(backup_id))
    found = [run_status(b, raw, prefix) for b, raw in zip(ids, pipe.execute(), strict=True)]
    return [run for run in found if run is not None]


def run_status(backup_id: str, raw: dict[str, str], prefix: str) -> RunStatus | None:
    """Return the run that a raw record describes; None for a key that is not a backup's."""
    try:
        started = parse_backup_id(backup_id, prefix)
    except ValueError:
        return None
    fields = {name: _json(value) for name, value in raw.items()}
    if isinstance(fields.get("started_at"), str):
        started = parse_time(fields["started_at"]) or started
    failures = {k.split(":", 1)[1]: str(v) for k, v in fields.items() if k.startswith("failed:")}
    return RunStatus(backup_id, str(fields.get("status", "unknown")), started, failures)


def latest_runs(runs: list[RunStatus], manifest: Manifest | None) -> LatestRuns:
    """Return the most recent run and the most recent finished one. The newest complete backup
    counts as a succeeded run when its record has expired (or Redis lost it)."""
    if manifest is not None and all(run.backup_id != manifest.backup_id for run in runs):
        runs = [*runs, RunStatus(manifest.backup_id, "succeeded", manifest.started_at, {})]
    dated = [run for run in runs if run.started_at is not None]
    finished = [run for run in dated if run.status in FINISHED]
    newest = max(dated, key=_started_at, default=None)
    return newest, max(finished, key=_started_at, default=None)


def _started_at(run: RunStatus) -> datetime:
    """The sort key of a run known to be dated (``started_at`` not None)."""
    return cast(datetime, run.started_at)


def check_broker(url: str, timeout: float) -> None:
    """Connect to the broker once, the way Celery does. Raise the connection's error if it fails."""
    from kombu import Connection

    options = {}
    if url.startswith(("redis://", "rediss://")):
        options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    with Connection(url, connect_timeout=timeout, transport_options=options) as conn:
        conn.ensure_connection(max_retries=0, timeout=timeout)


def parse_time(value: object) -> datetime | None:
    """Return a recorded time (ISO 8601 text or epoch seconds) as an aware datetime, else None."""
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            found = datetime.fromisoformat(value)
            return found if found.tzinfo else found.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        pass
    return None


def _json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def storage_space(settings: Settings, role: str, storage: Storage, used: int) -> Space:
    """Return (free, capacity) bytes of a destination: a Local one's file system; a cloud one's
    BACKUP_STORAGE_QUOTA_GB (BACKUP_OFFSITE_STORAGE_QUOTA_GB) minus ``used``; (None, None) unknown."""
    space = storage.disk_space()
    if space is not None:
        return space
    quota = (
        settings.backup_offsite_storage_quota_gb if role == "offsite" else settings.backup_storage_quota_gb
    )
    if quota is None:
        return None, None
    capacity = int(quota * GIB)
    return max(0, capacity - used), capacity
