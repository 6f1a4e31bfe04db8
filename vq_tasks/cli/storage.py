"""``vq-backup storage-check``: is each configured destination reachable, readable and writable?
The troubleshooting step of the operators' guide, run in the CLI process with the worker's
settings: list, then write a probe object, read it back, compare, and delete it."""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from vq_tasks.cli.common import EXIT_FAILED, print_table
from vq_tasks.errors import redact
from vq_tasks.logs import human_size
from vq_tasks.settings import Settings
from vq_tasks.storage import ROLES

PROBE_PREFIX = "vq-storage-check-"


@dataclass
class Step:
    role: str
    step: str
    ok: bool
    detail: str
    seconds: float


def check_destination(settings: Settings, role: str, probe_size: int) -> list[Step]:
    """Run the checks of one destination in order; stop at the first failure (later steps would
    fail for the same reason). Return one Step per check run."""
    from vq_tasks.retention.plan import shortest_retention
    from vq_tasks.storage import open_storage

    steps: list[Step] = []
    data = os.urandom(probe_size)
    name = f"{PROBE_PREFIX}{socket.gethostname()}-{uuid.uuid4().hex[:8]}.tmp"
    state: dict = {}

    def run(step: str, action: Callable[[], str]) -> bool:
        started = time.monotonic()
        try:
            detail, ok = action(), True
        except Exception as exc:  # shown to the operator: the storage errors name the fix
            detail, ok = redact(f"{type(exc).__name__}: {exc}", settings.secret_values()), False
        steps.append(Step(role, step, ok, detail, time.monotonic() - started))
        return ok

    def opened() -> str:
        state["storage"] = open_storage(settings, role)
        return state["storage"].describe()

    def listed() -> str:
        usage = state["storage"].usage()
        return f"{usage.objects} objects, {human_size(usage.size)}"

    def written() -> str:
        with state["storage"].open_write(name) as out:
            out.write(data)
        return f"{name} ({human_size(len(data))})"

    def read_back() -> str:
        found = state["storage"].read_bytes(name, limit=len(data))
        if hashlib.sha256(found).digest() != hashlib.sha256(data).digest():
            raise RuntimeError(f"read {len(found)} bytes that differ from the {len(data)} written")
        return "the same bytes came back"

    def locks() -> str:
        problems = state["storage"].lock_problems(shortest_retention(settings))
        if problems:
            raise RuntimeError("; ".join(problems))
        return "every object is written with a retention lock"

    def deleted() -> str:
        if not state["storage"].delete(name):
            raise RuntimeError(f"{name} was not there to delete")
        return "probe removed"

    checks = [("open", opened), ("list", listed), ("write", written), ("read", read_back)]
    if settings.backup_immutability:
        checks.insert(2, ("locks", locks))
    for step, action in checks:
        if not run(step, action):
            break
    if "storage" in state and any(s.step == "write" and s.ok for s in steps):
        run("delete", deleted)  # also after a failed read: leave nothing behind
    return steps


def cmd_storage_check(args: argparse.Namespace, settings: Settings) -> int:
    """Check every configured destination; return 0 if all passed, else 1."""
    steps = []
    for role in ROLES:
        if settings.destination(role) is not None:
            steps += check_destination(settings, role, args.size_kib << 10)
    rows = [(s.role, s.step, "OK" if s.ok else "FAILED", f"{s.seconds:.2f}s", s.detail) for s in steps]
    print_table(("DESTINATION", "STEP", "RESULT", "TIME", "DETAIL"), rows)
    failed = [s for s in steps if not s.ok]
    if failed:
        print(f"\n{len(failed)} check(s) FAILED: see DETAIL for the fix")
        return EXIT_FAILED
    print("\nevery destination is reachable, readable and writable")
    return 0


def add_storage_check_command(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser(
        "storage-check", help="check that each storage destination is reachable and writable"
    )
    check.add_argument(
        "--size-kib",
        type=int,
        default=64,
        help="size of the probe object (above BACKUP_UPLOAD_PART_SIZE_MB it is uploaded in parts)",
    )
    check.set_defaults(handler=cmd_storage_check)
