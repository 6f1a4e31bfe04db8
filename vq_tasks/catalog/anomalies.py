"""A complete backup that is wrong: its facts compared with the good complete backups before it.

Why: a backup of an emptied database (a bad migration, a DROP, a truncating bug) or a flushed Redis
is complete, checksummed and signed, and retention would rotate the good backups out beneath it.
So each backup's rows per table and in all, its tables, its Redis keys per database and in all, its
config files and the size of its database, Redis and config components are compared with the
last BACKUP_ANOMALY_WINDOW good complete backups (not suspicious, or accepted): a count with the
window's median (one odd backup in a window of three or more does not move it), what is gone with
the newest of them; an accepted backup ends the window (what came before it is no longer the
norm). Only a drop beyond its threshold counts; growth never does. Counts below
BACKUP_ANOMALY_MIN_* in the window are not compared (a table of 12 rows going to 3 says nothing);
a table or config file gone is, whatever its size.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TypeGuard, TypeVar

from vq_tasks.catalog.acceptance import read_acceptance
from vq_tasks.catalog.listing import backup_sets, load_manifest
from vq_tasks.crypto import signing
from vq_tasks.errors import BackupError
from vq_tasks.logs import human_size
from vq_tasks.manifest import (
    Anomaly,
    AnomalyKind,
    Component,
    ComponentEntry,
    DatabaseFacts,
    FilesFacts,
    Manifest,
    RedisFacts,
)
from vq_tasks.settings import Settings
from vq_tasks.storage.base import Storage

logger = logging.getLogger(__name__)
SIZED: tuple[Component, ...] = ("database", "redis", "config")  # logs come and go with rotation
F = TypeVar("F", DatabaseFacts, RedisFacts, FilesFacts)


@dataclass(frozen=True)
class Thresholds:
    """How far a count may fall (percent) before it is an anomaly, and below what it is not compared."""

    table_drop: int = 50
    rows_drop: int = 50
    keys_drop: int = 50
    size_drop: int = 50
    table_gone: bool = True
    config_gone: bool = True
    min_rows: int = 1000
    min_keys: int = 1000
    min_bytes: int = 1 << 20

    @classmethod
    def of(cls, settings: Settings) -> Thresholds:
        return cls(
            table_drop=settings.backup_anomaly_table_drop_percent,
            rows_drop=settings.backup_anomaly_rows_drop_percent,
            keys_drop=settings.backup_anomaly_keys_drop_percent,
            size_drop=settings.backup_anomaly_size_drop_percent,
            table_gone=settings.backup_anomaly_table_gone,
            config_gone=settings.backup_anomaly_config_gone,
            min_rows=settings.backup_anomaly_min_rows,
            min_keys=settings.backup_anomaly_min_keys,
            min_bytes=settings.backup_anomaly_min_bytes,
        )


def good_window(storage: Storage, settings: Settings, before: datetime) -> list[Manifest]:
    """Return the newest BACKUP_ANOMALY_WINDOW good complete backups started before ``before``,
    newest first: trusted (BACKUP_SIGNING_PUBLIC_KEYS), and not suspicious or accepted. An accepted
    backup ends the window: it marks a change that was intended (a big cleanup), so the backups
    before it no longer tell what is normal. Only as many manifests are read as it takes."""
    keys = signing.trusted_keys(settings)
    found: list[Manifest] = []
    sets = [s for s in backup_sets(storage.list(), settings.backup_name_prefix) if s.complete]
    for entry in sorted(sets, key=lambda s: s.started, reverse=True):
        if len(found) >= settings.backup_anomaly_window:
            break
        if entry.started >= before:
            continue
        manifest = _trusted(storage, entry.backup_id, keys)
        if manifest is not None and is_good(storage, manifest, keys, "acceptance" in entry.roles):
            found.append(manifest)
            if manifest.anomalies:  # accepted: the new normal starts here
                break
    return found


def is_good(storage: Storage, manifest: Manifest, keys: signing.PublicKeys, has_acceptance: bool) -> bool:
    """Whether a complete backup counts as good: not suspicious, or accepted (read only when
    ``has_acceptance``: the listing shows its object)."""
    if not manifest.anomalies:
        return True
    return has_acceptance and read_acceptance(storage, manifest, keys) is not None


def _trusted(storage: Storage, backup_id: str, keys: signing.PublicKeys) -> Manifest | None:
    try:
        manifest = load_manifest(storage, backup_id)
    except BackupError as exc:
        logger.warning("%s; not compared with", exc)
        return None
    problem = signing.distrust(manifest, keys)
    if problem:
        logger.warning("%s: manifest signature %s; not compared with", backup_id, problem)
        return None
    return manifest


def find_anomalies(
    components: Mapping[Component, ComponentEntry], window: list[Manifest], limits: Thresholds
) -> list[Anomaly]:
    """Given a backup's components and the good backups before it (newest first), return its drops
    beyond ``limits``: tables gone or shrunk, rows in all, Redis keys, config files gone,
    component sizes. None without a window (the first backups)."""
    if not window:
        return []
    found = _database(components, window, limits)
    found += _redis(components, window, limits)
    found += _config(components, window, limits)
    found += _sizes(components, window, limits)
    return found


def _database(components, window: list[Manifest], limits: Thresholds) -> list[Anomaly]:
    now = component_facts(components, "database", DatabaseFacts)
    before = [f for m in window if (f := component_facts(m.components, "database", DatabaseFacts))]
    if now is None or not before:
        return []
    found = []
    if limits.table_gone:
        gone = [(t, n) for t, n in before[0].tables.items() if t not in now.tables]
        found += [_gone("table_gone", t, n, f"table {t}: gone (had {n:,} rows)") for t, n in gone]
    for table, rows in now.tables.items():
        median = median_of(f.tables.get(table) for f in before)
        if _dropped(median, rows, limits.table_drop, limits.min_rows):
            found.append(_drop("table_rows", table, median, rows, f"table {table}", " rows"))
    total, median = sum(now.tables.values()), median_of(sum(f.tables.values()) for f in before)
    if _dropped(median, total, limits.rows_drop, limits.min_rows):
        found.append(_drop("total_rows", "all tables", median, total, "rows in all tables"))
    return found


def _redis(components, window: list[Manifest], limits: Thresholds) -> list[Anomaly]:
    now = component_facts(components, "redis", RedisFacts)
    before = [f for m in window if (f := component_facts(m.components, "redis", RedisFacts))]
    if now is None or not before:
        return []
    found = []
    for db in sorted({db for f in before for db in f.keys}, key=int):
        keys, median = now.keys.get(db, 0), median_of(f.keys.get(db, 0) for f in before)
        if _dropped(median, keys, limits.keys_drop, limits.min_keys):
            found.append(_drop("redis_keys", f"db{db}", median, keys, f"redis db{db}", " keys"))
    total, median = sum(now.keys.values()), median_of(sum(f.keys.values()) for f in before)
    if _dropped(median, total, limits.keys_drop, limits.min_keys):
        found.append(_drop("total_keys", "redis", median, total, "redis keys in all databases"))
    return found


def _config(components, window: list[Manifest], limits: Thresholds) -> list[Anomaly]:
    now = component_facts(components, "config", FilesFacts)
    last = component_facts(window[0].components, "config", FilesFacts)
    if not limits.config_gone or now is None or last is None:
        return []
    present = set(now.files)
    return [_gone("config_gone", f, None, f"config file {f}: gone") for f in last.files if f not in present]


def _sizes(components, window: list[Manifest], limits: Thresholds) -> list[Anomaly]:
    found = []
    for component in SIZED:
        entry = components.get(component)
        if entry is None:
            continue
        sizes = [m.components[component].content.size for m in window if component in m.components]
        median = median_of(sizes)
        size = entry.content.size
        if _dropped(median, size, limits.size_drop, limits.min_bytes):
            text = f"{entry.member}: {human_size(median)} → {human_size(size)}"
            found.append(_anomaly("component_size", component, median, size, text))
    return found


def component_facts(
    components: Mapping[Component, ComponentEntry], component: Component, kind: type[F]
) -> F | None:
    """The facts of ``component`` if there are such of ``kind``, else None."""
    entry = components.get(component)
    return entry.facts if entry is not None and isinstance(entry.facts, kind) else None


def median_of(values: Iterable[int | None]) -> int | None:
    """The median of the values given (None: none), rounded down; of two, their mean."""
    present = [v for v in values if v is not None]
    return int(statistics.median(present)) if present else None


def _dropped(before: int | None, after: int, percent: int, minimum: int) -> TypeGuard[int]:
    """Whether ``after`` fell more than ``percent`` below ``before`` (at least ``minimum``)."""
    return before is not None and before >= max(minimum, 1) and after * 100 < before * (100 - percent)


def _drop(kind: AnomalyKind, subject: str, before: int, after: int, label: str, unit: str = "") -> Anomaly:
    """The anomaly of a count that fell: "table public.queues: 1,204,331 → 12 rows"."""
    return _anomaly(kind, subject, before, after, f"{label}: {before:,} → {after:,}{unit}")


def _gone(kind: AnomalyKind, subject: str, before: int | None, text: str) -> Anomaly:
    return _anomaly(kind, subject, before, None, text)


def _anomaly(kind: AnomalyKind, subject: str, before: int | None, after: int | None, text: str) -> Anomaly:
    return Anomaly(kind=kind, subject=subject, before=before, after=after, text=text)
