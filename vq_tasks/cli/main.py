"""``vq-backup``: the operators' command line.

vq-backup run [--wait]     enqueue a backup; with --wait follow it and exit non-zero on failure
vq-backup list             the backups in storage, read from their manifests
vq-backup show ID          one backup's manifest, readable (--json for the document itself)
vq-backup prune [--dry-run]  apply the retention policy now
vq-backup accept ID --reason TEXT  mark a suspicious backup as intended (cli/accept.py)
vq-backup verify ID|latest  read every file of a backup once and check it against the manifest
vq-backup restore ID|latest  print the plan of a restore; --force restores (in this process)
vq-backup extract ID COMPONENT -o PATH  write one component of a backup to PATH, checked
vq-backup drill [ID|latest]  restore into a scratch database and Redis, check, drop (cli/drill.py)
vq-backup storage-check    check that each destination is reachable, readable and writable
vq-backup exporter         serve Prometheus /metrics and /healthz on port 8080 (cli/exporter.py)
vq-backup audit            the recent operations from the audit log (cli/audit.py)
vq-backup signing-key -o PATH  make the Ed25519 key pair that signs manifests (cli/keys.py)
vq-backup demo             the quick start: embedded PostgreSQL and Redis, a real worker, a backup

list, show, verify, restore, extract and drill take --offsite to work on the off-site copy.
"""

from __future__ import annotations

import argparse
import sys

from vq_tasks.cli.accept import add_accept_command
from vq_tasks.cli.audit import add_audit_command
from vq_tasks.cli.backups import add_backup_commands
from vq_tasks.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
)
from vq_tasks.cli.drill import add_drill_command
from vq_tasks.cli.exporter import add_exporter_command
from vq_tasks.cli.keys import add_signing_key_command
from vq_tasks.cli.restore import add_restore_commands
from vq_tasks.cli.run import add_run_command
from vq_tasks.cli.storage import add_storage_check_command
from vq_tasks.settings import ConfigError, Settings, get_settings


def add_demo_command(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="back up an embedded PostgreSQL and Redis, end to end")
    demo.add_argument("--keep", action="store_true", help="keep the demo's folder afterwards")
    demo.set_defaults(handler=cmd_demo, needs_settings=False)


def cmd_demo(args: argparse.Namespace, settings: Settings | None) -> int:
    from vq_tasks.cli.demo import run_demo  # it loads psycopg and redis: only when the demo runs

    return run_demo(keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vq-backup", description="VQ Backup operator commands")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_run_command,
        add_backup_commands,
        add_accept_command,
        add_restore_commands,
        add_drill_command,
        add_storage_check_command,
        add_exporter_command,
        add_audit_command,
        add_signing_key_command,
        add_demo_command,
    ):
        add(commands)
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
