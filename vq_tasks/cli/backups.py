"""``vq-backup list``, ``show``, ``prune`` and ``verify``: what storage holds, one manifest, the
retention policy applied now, and a backup read end to end against its manifest.

A complete backup with anomalies (catalog.anomalies) is ``suspicious`` in ``list`` unless an
acceptance counts (``accepted``); ``show`` prints its verdict, each anomaly and its counts beside
those of the good backups it was compared with."""

from __future__ import annotations

import argparse
import functools
import getpass
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from vq_tasks.catalog.anomalies import SIZED, component_facts, median_of
from vq_tasks.cli.common import (
    EXIT_FAILED,
    add_destination_flag,
    human_age,
    print_table,
    storage_of,
)
from vq_tasks.errors import BackupError
from vq_tasks.logs import human_size
from vq_tasks.manifest import (
    DatabaseFacts,
    FilesFacts,
    Manifest,
    RedisFacts,
    manifest_name,
    parse_backup_id,
)
from vq_tasks.settings import Settings

F = TypeVar("F", DatabaseFacts, RedisFacts, FilesFacts)
WINDOW_COLUMNS = 7  # window backups shown as columns of the comparison (all count in the median)
MAX_COMPARED = 100  # compared_with ids read at most: BACKUP_ANOMALY_WINDOW's maximum
MAX_TABLES = 20  # tables shown in the comparison: those with an anomaly, then the largest
Counts = list[int | None]  # one value per backup: this one, then the window's, newest first

if TYPE_CHECKING:
    from vq_tasks.catalog.backup_set import BackupSet
    from vq_tasks.crypto.signing import PublicKeys
    from vq_tasks.manifest import Anomaly
    from vq_tasks.storage.base import Storage


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    """Print every backup id in storage: kind, size, age and status (complete, suspicious,
    accepted or incomplete); name the suspicious ones' next steps."""
    from vq_tasks.catalog.listing import backup_sets

    storage = storage_of(args, settings)
    objects = storage.list()
    sizes = {o.name: o.size for o in objects}
    keys = functools.cache(lambda: signing_keys(settings))
    now = datetime.now(UTC)
    sets = backup_sets(objects, settings.backup_name_prefix)
    rows = [list_row(storage, entry, sizes, keys, now) for entry in sets]
    if not rows:
        print(f"no backups in {storage.describe()}")
        return 0
    print_table(("ID", "KIND", "SIZE", "AGE", "STATUS"), rows)
    suspicious = [row[0] for row in rows if row[4] == "suspicious"]
    if suspicious:
        print(
            f"\n{len(suspicious)} suspicious (much smaller than the good backups before): "
            "`vq-backup show ID` says why; `vq-backup accept ID --reason TEXT` if it was intended"
        )
    return 0


def signing_keys(settings: Settings) -> PublicKeys:
    from vq_tasks.crypto.signing import trusted_keys

    return trusted_keys(settings)


def list_row(
    storage: Storage,
    entry: BackupSet,
    sizes: dict[str, int],
    keys: Callable[[], PublicKeys],
    now: datetime,
) -> tuple[str, ...]:
    """Return the ``list`` row of one backup id; its manifest is read when it is complete."""
    from vq_tasks.catalog.listing import load_manifest

    kind, status = "-", "incomplete"
    if entry.complete:
        manifest = load_manifest(storage, entry.backup_id)
        kind, status = manifest.kind, backup_status(storage, manifest, keys, "acceptance" in entry.roles)
    size = sum(sizes[name] for names in entry.roles.values() for name in names)
    age = human_age((now - entry.started).total_seconds())
    return (entry.backup_id, kind, human_size(size), age, status)


def backup_status(
    storage: Storage, manifest: Manifest, keys: Callable[[], PublicKeys], has_acceptance: bool
) -> str:
    """Return a complete backup's status: ``complete`` without anomalies, ``accepted`` when an
    acceptance counts (read only when ``has_acceptance``: the listing shows one), else
    ``suspicious``."""
    from vq_tasks.catalog.anomalies import is_good

    if not manifest.anomalies:
        return "complete"
    try:
        return "accepted" if has_acceptance and is_good(storage, manifest, keys(), True) else "suspicious"
    except BackupError:  # its acceptance could not be read now: as retention does, not accepted
        return "suspicious?"


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    """Print one backup's manifest: its files, components, anomaly verdict and the comparison
    with the good backups before it (``--json``: the manifest document itself)."""
    from vq_tasks.catalog.latest import resolve_backup_id
    from vq_tasks.catalog.listing import load_manifest

    storage = storage_of(args, settings)
    manifest = load_manifest(storage, resolve_backup_id(storage, settings, args.backup_id))
    if args.json:
        print(manifest.model_dump_json(indent=2))
        return 0
    print(f"{manifest.backup_id}  {manifest.kind}  {manifest.status}  compression={manifest.compression}")
    print(
        f"started {manifest.started_at:%Y-%m-%d %H:%M:%S} UTC, took {manifest.duration_seconds:.1f} s, "
        f"vq-backup {manifest.tool_version}"
    )
    print("\nfiles:")
    print_table(("NAME", "SIZE", "SHA-256"), [(f.name, human_size(f.size), f.sha256) for f in manifest.files])
    print("\ncomponents:")
    for name, entry in manifest.components.items():
        print(
            f"  {name}: {entry.member} in {entry.stored_in}, {human_size(entry.content.size)}, "
            f"sha256 {entry.content.sha256[:16]}…"
        )
        for line in describe_facts(entry.facts.model_dump()):
            print(f"      {line}")
    print_anomalies(storage, settings, manifest)
    return 0


def print_anomalies(storage: Storage, settings: Settings, manifest: Manifest) -> None:
    """Print the ``anomalies`` section of ``show``: the verdict, who accepted it, each anomaly,
    then the comparison with the backups of ``compared_with``."""
    from vq_tasks.catalog.acceptance import read_acceptance
    from vq_tasks.monitoring.suspicious import verdict

    accepted = None
    if manifest.anomalies:
        try:
            accepted = read_acceptance(storage, manifest, signing_keys(settings))
        except BackupError as exc:
            print(f"\n(its acceptance, if any, could not be read: {exc})")
    print("\nanomalies:")
    print(f"  {verdict(manifest, accepted is not None)}")
    if accepted is not None:
        when = f"{accepted.accepted_at:%Y-%m-%d %H:%M:%S}"
        print(f"  accepted by {accepted.by} at {when}: {accepted.reason}")
    for anomaly in manifest.anomalies:
        print(f"  - {anomaly.text}")
    if manifest.compared_with:
        print_comparison(storage, settings.backup_name_prefix, manifest)


def print_comparison(storage: Storage, prefix: str, manifest: Manifest) -> None:
    """Print the counts of ``manifest`` beside the median of the backups it was compared with and
    each of them (the newest WINDOW_COLUMNS); name the ones storage no longer holds."""
    window, missing = read_window(storage, prefix, manifest.compared_with)
    print(f"\ncompared with {len(manifest.compared_with)} good backups before it, newest first:")
    for line in missing:
        print(f"  {line}")
    if not window:
        return
    shown = window[:WINDOW_COLUMNS]
    header = ("", "WHAT", "THIS", "MEDIAN", *(f"{m.started_at:%m-%d %H:%M}" for m in shown))
    flagged = {anomaly_row(a) for a in manifest.anomalies}
    rows = []
    for label, values in comparison_rows(manifest, window, flagged):
        shown_values = [values[0], median_of(values[1:]), *values[1 : 1 + len(shown)]]
        cells = [
            human_size(v) if v is not None and label.startswith("size ") else count(v) for v in shown_values
        ]
        rows.append(("!" if label in flagged else "", label, *cells))
    print_table(header, rows)
    older = f", {len(window) - len(shown)} older than those shown" if len(window) > len(shown) else ""
    print(f"(! an anomaly; MEDIAN: of the {len(window)} backups still stored{older})")


def read_window(storage: Storage, prefix: str, ids: Sequence[str]) -> tuple[list[Manifest], list[str]]:
    """Given the ids a manifest was compared with, return the manifests storage still holds, in
    order, and a line for each other one: gone, unreadable, or not a backup id (a manifest may be
    forged: such an id is never read)."""
    from vq_tasks.catalog.listing import load_manifest
    from vq_tasks.errors import BackupError

    found, missing = [], []
    for backup_id in ids[:MAX_COMPARED]:
        try:
            parse_backup_id(backup_id, prefix)
        except ValueError:
            missing.append(f"{backup_id[:80]!r}: not a backup id, not read")
            continue
        try:
            found.append(load_manifest(storage, backup_id))
        except BackupError as exc:
            gone = storage.stat(manifest_name(backup_id)) is None
            missing.append(f"{backup_id}: gone from storage" if gone else f"{backup_id}: {exc}")
    return found, missing


def comparison_rows(
    manifest: Manifest, window: list[Manifest], flagged: set[str]
) -> list[tuple[str, Counts]]:
    """Return (label, values of ``manifest`` then of each window backup) for what the anomaly
    check compares: rows per table (those in ``flagged``, then the largest, MAX_TABLES in all)
    and in all, Redis keys per database and in all, config files, component sizes."""
    every = [manifest, *window]
    dbs = [component_facts(m.components, "database", DatabaseFacts) for m in every]
    found = table_rows(dbs, flagged)
    found.append(("rows, all tables", [sum(f.tables.values()) if f else None for f in dbs]))
    redis = [component_facts(m.components, "redis", RedisFacts) for m in every]
    numbers = sorted({db for f in redis if f for db in f.keys}, key=lambda db: (len(db), db))
    found += [(f"keys db{db}", [f.keys.get(db, 0) if f else None for f in redis]) for db in numbers]
    found.append(("keys, all databases", [sum(f.keys.values()) if f else None for f in redis]))
    config = [component_facts(m.components, "config", FilesFacts) for m in every]
    found.append(("config files", [len(f.files) if f else None for f in config]))
    for component in SIZED:
        sizes = [m.components[component].content.size if component in m.components else None for m in every]
        found.append((f"size {component}", sizes))
    return found


def table_rows(dbs: list[DatabaseFacts | None], flagged: set[str]) -> list[tuple[str, Counts]]:
    """Return the rows per table, the flagged tables first, then by the window's median."""
    names = {t for f in dbs if f for t in f.tables}
    rows = {t: [f.tables.get(t) if f else None for f in dbs] for t in names}

    def order(table: str) -> tuple[bool, int, str]:
        return f"rows {table}" not in flagged, -(median_of(rows[table][1:]) or 0), table

    return [(f"rows {t}", rows[t]) for t in sorted(names, key=order)[:MAX_TABLES]]


def anomaly_row(anomaly: Anomaly) -> str:
    """Return the label of the comparison row an anomaly is about."""
    if anomaly.kind in ("table_rows", "table_gone"):
        return f"rows {anomaly.subject}"
    labels = {
        "total_rows": "rows, all tables",
        "redis_keys": f"keys {anomaly.subject}",
        "total_keys": "keys, all databases",
        "config_gone": "config files",
    }
    return labels.get(anomaly.kind, f"size {anomaly.subject}")


def count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def describe_facts(facts: dict) -> list[str]:
    """Return readable lines for a component's facts."""
    lines = []
    for key, value in facts.items():
        if isinstance(value, dict):
            shown = ", ".join(f"{k}={v}" for k, v in list(value.items())[:20])
            more = f" (+{len(value) - 20} more)" if len(value) > 20 else ""
            lines.append(f"{key}: {shown or '-'}{more}")
        elif isinstance(value, list):
            shown = ", ".join(map(str, value[:10]))
            more = f" (+{len(value) - 10} more)" if len(value) > 10 else ""
            lines.append(f"{key}: {len(value)}: {shown}{more}" if value else f"{key}: none")
        else:
            lines.append(f"{key}: {value}")
    return lines


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    """Prune the primary storage and, when configured, the off-site copy; print each file that
    goes (or would) and why. Exit 1 when a destination failed or kept a backup past retention."""
    from vq_tasks.retention.prune import prune_all

    report = prune_all(settings, args.dry_run, origin=f"cli:{getpass.getuser()}", say=print)
    for failure in report.failures():
        print(f"vq-backup: prune: {failure}", file=sys.stderr)
    return 0 if report.ok else EXIT_FAILED


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from vq_tasks.monitoring import integrity
    from vq_tasks.verify.run import report_rows, summary, verify_operation

    storage = storage_of(args, settings)
    origin = f"cli:{getpass.getuser()}"
    report = verify_operation(storage, settings, args.backup_id, origin=origin)
    integrity.observe_verify(settings, report, origin)
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0 if report.ok else EXIT_FAILED
    print_table(("FILE / COMPONENT", "CHECK", "EXPECTED", "ACTUAL", "RESULT"), report_rows(report))
    line, verified = summary(report)
    print(f"\n{line}")
    return 0 if verified else EXIT_FAILED


def add_backup_commands(commands: argparse._SubParsersAction) -> None:
    listing = commands.add_parser("list", help="list the backups in storage")
    add_destination_flag(listing)
    listing.set_defaults(handler=cmd_list)
    show = commands.add_parser("show", help="show one backup's manifest")
    add_destination_flag(show)
    show.add_argument("backup_id")
    show.add_argument("--json", action="store_true", help="print the manifest document itself")
    show.set_defaults(handler=cmd_show)
    prune = commands.add_parser("prune", help="apply the retention policy now")
    prune.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    prune.set_defaults(handler=cmd_prune)
    verify = commands.add_parser("verify", help="check a backup's files against its manifest")
    verify.add_argument("backup_id", help="a backup id, or 'latest'")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    add_destination_flag(verify)
    verify.set_defaults(handler=cmd_verify)
