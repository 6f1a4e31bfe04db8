"""``vq-backup``: the operators' command line.

vq-backup run [--wait]     enqueue a backup; with --wait follow it and exit non-zero on failure
vq-backup list             the backups in storage, read from their manifests
vq-backup show ID          one backup's manifest, readable (--json for the document itself)
vq-backup prune [--dry-run]  apply the retention policy now
vq-backup verify ID|latest  read every file of a backup once and check it against the manifest
vq-backup restore ID|latest  print the plan of a restore; --force restores (in this process)
vq-backup extract ID COMPONENT -o PATH  write one component of a backup to PATH, checked
vq-backup drill [ID|latest]  restore into a scratch database and Redis, check, drop (cli_drill.py)
vq-backup storage-check    check that each destination is reachable, readable and writable
vq-backup exporter         serve Prometheus /metrics and /healthz on port 8080 (cli_exporter.py)
vq-backup audit            the recent operations from the audit log (cli_audit.py)
vq-backup signing-key -o PATH  make the Ed25519 key pair that signs manifests (cli_keys.py)
vq-backup demo             the quick start: embedded PostgreSQL and Redis, a real worker, a backup

list, show, verify, restore, extract and drill take --offsite to work on the off-site copy.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from datetime import UTC, datetime

from vq_tasks.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    add_destination_flag,
    human_age,
    human_size,
    print_table,
    storage_of,
)
from vq_tasks.settings import ConfigError, Settings, get_settings

POLL_SECONDS = 0.25  # how often `run --wait` reads the run record: a few small reads a second


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    started = start_backup(args.timeout_start)
    if isinstance(started, str):
        print(started, file=sys.stderr)
        return EXIT_FAILED
    backup_id = started["backup_id"]
    print(f"backup {backup_id} started ({started['kind']})")
    if not args.wait:
        return 0
    return follow(settings, backup_id, args.timeout)


def start_backup(timeout: float) -> dict | str:
    """Send vq_tasks.backup and wait for a worker to start it; return its result, or why not.
    The result objects die here, while the interpreter can still unsubscribe them cleanly."""
    from vq_tasks.worker.app import app

    result = app.send_task("vq_tasks.backup", kwargs={"origin": "cli", "requested_by": getpass.getuser()})
    deadline = time.monotonic() + timeout
    while not result.ready():
        if time.monotonic() > deadline:
            unsubscribe(result)
            return f"no worker started the backup within {timeout:.0f} s"
        time.sleep(0.2)
    outcome = result.result
    unsubscribe(result)
    if isinstance(outcome, BaseException):
        return f"backup refused or failed to start: {outcome}"
    return dict(outcome)


def unsubscribe(result: object) -> None:
    """Drop the result backend's subscriptions of ``result`` and of the tasks it started (the
    chord's), which otherwise try to unsubscribe during interpreter shutdown, noisily. Children
    come as results, result sets, or plain lists of them."""
    from celery.result import AsyncResult

    if isinstance(result, list | tuple):
        nested = list(result)
    else:
        nested = [*(getattr(result, "children", None) or []), *(getattr(result, "results", None) or [])]
    for child in nested:
        unsubscribe(child)
    if isinstance(result, AsyncResult):
        result.backend.remove_pending_result(result)


def follow(settings: Settings, backup_id: str, timeout: float) -> int:
    """Show the run's progress until it succeeds or fails; return the exit code."""
    from redis.exceptions import RedisError

    from vq_tasks import coordination

    r = coordination.client(settings)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            run = coordination.read_record(r, backup_id)
        except RedisError as exc:  # Celery's Redis restarting: the run goes on, so does following it
            line = f"lost contact with Celery's Redis ({type(exc).__name__}); trying again"
            if line != last:
                print(line, file=sys.stderr, flush=True)
                last = line
            time.sleep(POLL_SECONDS)
            continue
        line = progress_line(run)
        if line != last:
            print(line, flush=True)
            last = line
        if run.get("status") == "succeeded":
            print(backup_id)
            return 0
        if run.get("status") == "failed":
            for key, message in sorted(run.items()):
                if key.startswith("failed:"):
                    print(f"FAILED {key[7:]}: {message}", file=sys.stderr)
            return EXIT_FAILED
        time.sleep(POLL_SECONDS)
    print(f"gave up waiting for {backup_id} after {timeout:.0f} s", file=sys.stderr)
    return EXIT_FAILED


def progress_line(run: dict) -> str:
    """Return one line describing each component's state and bytes so far."""
    from vq_tasks.manifest import COMPONENTS

    parts = []
    for component in COMPONENTS:
        state = run.get(f"state:{component}", "queued")
        size = run.get(f"bytes:{component}")
        parts.append(f"{component} {state}" + (f" {human_size(size)}" if size else ""))
    return "  ".join(parts) + f"  [{run.get('status', 'queued')}]"


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
    from vq_tasks.verify.run import report_rows, summary, verify_operation

    storage = storage_of(args, settings)
    report = verify_operation(storage, settings, args.backup_id, origin=f"cli:{getpass.getuser()}")
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0 if report.ok else EXIT_FAILED
    print_table(("FILE / COMPONENT", "CHECK", "EXPECTED", "ACTUAL", "RESULT"), report_rows(report))
    line, verified = summary(report)
    print(f"\n{line}")
    return 0 if verified else EXIT_FAILED


def cmd_demo(args: argparse.Namespace, settings: Settings | None) -> int:
    from vq_tasks.cli.demo import run_demo

    return run_demo(keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vq-backup", description="VQ Backup operator commands")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="enqueue a backup now")
    run.add_argument("--wait", action="store_true", help="follow the backup until it ends")
    run.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait with --wait")
    run.add_argument(
        "--timeout-start", type=float, default=60, help="seconds to wait for a worker to start it"
    )
    run.set_defaults(handler=cmd_run)
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
    from vq_tasks.cli.restore import add_restore_commands

    add_restore_commands(commands)
    from vq_tasks.cli.drill import add_drill_command

    add_drill_command(commands)
    from vq_tasks.cli.storage import add_storage_check_command

    add_storage_check_command(commands)
    from vq_tasks.cli.exporter import add_exporter_command

    add_exporter_command(commands)
    from vq_tasks.cli.audit import add_audit_command

    add_audit_command(commands)
    from vq_tasks.cli.keys import add_signing_key_command

    add_signing_key_command(commands)
    demo = commands.add_parser("demo", help="back up an embedded PostgreSQL and Redis, end to end")
    demo.add_argument("--keep", action="store_true", help="keep the demo's folder afterwards")
    demo.set_defaults(handler=cmd_demo, needs_settings=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings() if getattr(args, "needs_settings", True) else None
        return args.handler(args, settings)
    except ConfigError as exc:
        print(f"vq-backup: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vq-backup: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # an operator sees the message, not a traceback
        from vq_tasks.errors import BackupError

        if not isinstance(exc, BackupError):
            raise
        print(f"vq-backup: {exc}", file=sys.stderr)
        return EXIT_FAILED
