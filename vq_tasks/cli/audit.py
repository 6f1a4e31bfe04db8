"""``vq-backup audit``: the recent lines of the audit log (BACKUP_AUDIT_LOG), newest last."""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from vq_tasks.cli.common import EXIT_FAILED, print_table
from vq_tasks.settings import Settings

SHOWN_FIELDS = ("time", "operation", "outcome", "backup_id", "origin", "duration_seconds")


def add_audit_command(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser("audit", help="show the recent operations from the audit log")
    audit.add_argument("-n", "--limit", type=int, default=20, help="how many lines (default 20)")
    audit.add_argument(
        "--operation", help="only this operation (backup, verify, restore, prune, drill, alert)"
    )
    audit.add_argument("--backup", dest="backup_id", help="only lines about this backup id")
    audit.add_argument("--json", action="store_true", help="print the JSON lines themselves")
    audit.set_defaults(handler=cmd_audit)


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    """Print the last ``--limit`` audit lines that match the filters; exit 1 without a log."""
    path = settings.backup_audit_log
    if path is None or not path.exists():
        print(f"vq-backup: no audit log at {path} (BACKUP_AUDIT_LOG)", file=sys.stderr)
        return EXIT_FAILED
    wanted = {"operation": args.operation, "backup_id": args.backup_id}
    entries = recent(path, max(args.limit, 1), {k: v for k, v in wanted.items() if v})
    if args.json:
        for entry in entries:
            print(json.dumps(entry, sort_keys=True))
        return 0
    if not entries:
        print(f"no matching lines in {path}")
        return 0
    rows = [(*(_cell(entry.get(name)) for name in SHOWN_FIELDS), details(entry)) for entry in entries]
    print_table(("TIME", "OPERATION", "OUTCOME", "BACKUP", "ORIGIN", "SECONDS", "DETAILS"), rows)
    return 0


def recent(path: Path, limit: int, match: dict[str, str]) -> list[dict]:
    """Return the last ``limit`` entries whose fields equal ``match``, reading the file once
    with at most ``limit`` entries in memory; lines that are not JSON objects are skipped."""
    kept: deque[dict] = deque(maxlen=limit)
    for entry in _entries(path):
        if all(entry.get(key) == value for key, value in match.items()):
            kept.append(entry)
    return list(kept)


def _entries(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                yield entry


def details(entry: dict) -> str:
    """Return the entry's other fields on one line: task id, error, files, what failed, ..."""
    rest = {k: v for k, v in entry.items() if k not in SHOWN_FIELDS and k != "integrity"}
    return " ".join(f"{key}={_cell(value)}" for key, value in sorted(rest.items()))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)
