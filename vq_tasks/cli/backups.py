"""``vq-backup list``, ``show``, ``prune`` and ``verify``: what storage holds, one manifest, the
retention policy applied now, and a backup read end to end against its manifest."""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import UTC, datetime

from vq_tasks.cli.common import (
    EXIT_FAILED,
    add_destination_flag,
    human_age,
    human_size,
    print_table,
    storage_of,
)
from vq_tasks.settings import Settings


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from vq_tasks.catalog.listing import backup_sets, load_manifest

    storage = storage_of(args, settings)
    objects = storage.list()
    sizes = {o.name: o.size for o in objects}
    now = datetime.now(UTC)
    rows = []
    for entry in backup_sets(objects, settings.backup_name_prefix):
        kind = load_manifest(storage, entry.backup_id).kind if entry.complete else "-"
        status = "complete" if entry.complete else "incomplete"
        size = sum(sizes[name] for names in entry.roles.values() for name in names)
        age = human_age((now - entry.started).total_seconds())
        rows.append((entry.backup_id, kind, human_size(size), age, status))
    if not rows:
        print(f"no backups in {storage.describe()}")
        return 0
    print_table(("ID", "KIND", "SIZE", "AGE", "STATUS"), rows)
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
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
    return 0


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
