"""``vq-backup run [--wait]``: enqueue a backup; with --wait follow its run record and exit
non-zero when it fails."""

from __future__ import annotations

import argparse
import getpass
import sys
import time

from vq_tasks.cli.common import (
    EXIT_FAILED,
)
from vq_tasks.logs import human_size
from vq_tasks.settings import Settings

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


def add_run_command(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="enqueue a backup now")
    run.add_argument("--wait", action="store_true", help="follow the backup until it ends")
    run.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait with --wait")
    run.add_argument(
        "--timeout-start", type=float, default=60, help="seconds to wait for a worker to start it"
    )
    run.set_defaults(handler=cmd_run)
