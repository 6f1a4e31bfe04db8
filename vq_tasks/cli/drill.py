"""``vq-backup drill``: the restore drill in this process (vq_tasks.restore.drill), as beat runs it.

vq-backup drill [ID|latest] [--json]  restore a backup into a scratch database, Redis and folder,
                                      check them, remove them; print the integrity report, exit 1
                                      on failure (and alert BACKUP_ALERT_EMAIL, as the task does)
vq-backup drill --last                the outcome of the last drill, as recorded in Celery's Redis
"""

from __future__ import annotations

import argparse
import getpass
import sys
import uuid
from typing import Any

from vq_tasks.cli.common import EXIT_FAILED, add_destination_flag, print_table, storage_of
from vq_tasks.settings import Settings


def add_drill_command(commands: argparse._SubParsersAction) -> None:
    """Add the ``drill`` subcommand."""
    drill = commands.add_parser(
        "drill", help="restore a backup into a scratch database and Redis, check it, drop it"
    )
    drill.add_argument("backup_id", nargs="?", default="latest", help="a backup id, or 'latest' (default)")
    drill.add_argument("--json", action="store_true", help="print the report as JSON")
    drill.add_argument("--last", action="store_true", help="show the last drill's recorded outcome")
    add_destination_flag(drill)
    drill.set_defaults(handler=cmd_drill)


def cmd_drill(args: argparse.Namespace, settings: Settings) -> int:
    """Run a drill here and print its integrity report; return 0 if it passed, else 1."""
    from vq_tasks.restore.drill import run_drill, send_alert_now

    if args.last:
        return show_last(settings, args.json)
    out = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    run_id = f"cli-{uuid.uuid4().hex[:12]}"
    origin = f"cli:{getpass.getuser()}"
    report = run_drill(
        settings, storage_of(args, settings), args.backup_id, run_id=run_id, say=say, origin=origin
    )
    say(send_alert_now(settings, report, origin=origin))
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print_drill_report(report)
    return 0 if report.ok else EXIT_FAILED


def print_drill_report(report: Any) -> None:
    """Print a drill's integrity report with the backup's anomaly verdict, its cleanup and its
    outcome (a DrillReport)."""
    rows = [(c.check, c.expected, c.actual, "OK" if c.ok else "FAILED") for c in report.integrity.checks]
    if rows:
        print()
        print_table(("CHECK", "EXPECTED", "ACTUAL", "RESULT"), rows)
    if report.anomaly_verdict is not None:  # beside the checks; it does not decide the drill
        print(f"anomalies: {report.anomaly_verdict}")
    print()
    for line in report.cleanup:
        print(f"cleanup: {line}")
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    took = f"{report.duration_seconds:.1f} s"
    if report.ok:
        print(
            f"{report.backup_id}: restore drill OK in {took} (the live database and Redis were not touched)"
        )
        return
    for what, why in report.failures.items():
        print(f"FAILED {what}: {why}", file=sys.stderr)
    print(f"{report.backup_id}: restore drill FAILED in {took}: {', '.join(report.failures)}")


def show_last(settings: Settings, as_json: bool) -> int:
    """Print the last drill's recorded outcome; return 0 if it passed, 1 if it failed or none ran."""
    import json

    from vq_tasks import coordination

    record = coordination.read_drill(coordination.client(settings))
    if as_json:
        print(json.dumps(record, indent=2))
    elif not record:
        print("no restore drill has been recorded")
    else:
        verdict = "OK" if record.get("last_drill_ok") else "FAILED"
        print(
            f"last drill: {record.get('last_drill_at')} of {record.get('last_drill_backup_id')}: {verdict} "
            f"in {record.get('last_drill_seconds')} s (run {record.get('last_drill_run_id')})"
        )
        for what, why in (record.get("last_drill_failures") or {}).items():
            print(f"  FAILED {what}: {why}")
        if record.get("last_drill_ok_at"):
            print(f"last passing drill: {record['last_drill_ok_at']}")
    return 0 if record.get("last_drill_ok") else EXIT_FAILED
