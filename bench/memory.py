"""Memory benchmark: the peak RSS of a real worker while it backs up a PostgreSQL database of a
given size (1 GiB by default), next to its own Redis servers and config and log folders.

    python bench/memory.py --size-gb 1          # before bench/run.py, what `make bench` ran
    python bench/memory.py --size-gb 0.25 --reuse --keep-db

It creates the database vq_bench on the local PostgreSQL (127.0.0.1:5432, user postgres, trust),
starts an application Redis of ~100k keys and a broker Redis (tests/servers.start_redis), one
``celery worker --pool=prefork --concurrency=2``, then runs ``vq-backup run --wait`` while sampling,
every 0.2 s, the RSS of the worker's main process, of each pool child and of pg_dump. At the end it
reads VmHWM (the kernel's own peak) of the worker's processes, prints a table and writes the same
as JSON to bench/results/memory-<timestamp>.json. Everything it started is stopped and removed.
This is a measurement, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

from bench_data import (  # noqa: E402
    DB_NAME,
    DatabaseInfo,
    PgServer,
    describe_database,
    drop_database,
    fill_app_redis,
    generate_database,
    make_files,
    reusable,
)
from procs import Sampler  # noqa: E402
from services import (  # noqa: E402
    code_state,
    machine_facts,
    read_manifest,
    start_worker,
    stop_worker,
    wait_for_worker,
    worker_env,
)

from tests.servers import start_redis  # noqa: E402

MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="database size in GiB (default 1)")
    parser.add_argument("--reuse", action="store_true", help="keep vq_bench if it already has that size")
    parser.add_argument("--keep-db", action="store_true", help="do not drop vq_bench at the end")
    parser.add_argument("--redis-keys", type=int, default=100_000, help="keys in the application Redis")
    parser.add_argument("--log-mb", type=float, default=6.0, help="MiB of log files to back up")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the backup")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--results", type=Path, default=BENCH / "results", help="folder for the JSON")
    parser.add_argument("--pg-host", default=os.environ.get("VQ_TEST_PG_HOST", "127.0.0.1"))
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("VQ_TEST_PG_PORT", "5432")))
    parser.add_argument("--pg-user", default=os.environ.get("VQ_TEST_PG_USER", "postgres"))
    return parser.parse_args(argv)


def prepare_database(pg: PgServer, args: argparse.Namespace) -> DatabaseInfo:
    """Return vq_bench at the requested size: reused if asked and possible, else generated."""
    if args.reuse and reusable(pg, args.size_gb):
        print(f"reusing {DB_NAME}")
        return describe_database(pg, reused=True)
    print(f"generating {DB_NAME}: {args.size_gb:g} GiB")
    info = generate_database(pg, args.size_gb)
    print(f"generated {info.size_bytes / MIB:.0f} MiB in {info.generation_seconds:.1f} s")
    return info


def run_backup(
    env: dict[str, str], sampler: Sampler, args: argparse.Namespace, out: Path
) -> tuple[int, float]:
    """Run ``vq-backup run --wait`` while sampling; return its exit code and wall time in seconds."""
    command = [sys.executable, "-m", "vq_tasks.cli", "run", "--wait", "--timeout", str(args.timeout)]
    started = time.monotonic()
    with open(out, "wb") as output:
        cli = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=output, stderr=output)
    while cli.poll() is None:
        sampler.sample()
        time.sleep(args.interval)
    wall = time.monotonic() - started
    sampler.sample()
    return cli.returncode, wall


def build_result(
    args: argparse.Namespace, db: DatabaseInfo, manifest: dict, sampler: Sampler, wall: float, code: dict
) -> dict:
    """Return the benchmark's result document."""
    files = {f["name"]: f["size"] for f in manifest["files"]}
    bundle = next(size for name, size in files.items() if not name.endswith(("_logs.tar.gz", "_logs.tar")))
    content = {name: entry["content"]["size"] for name, entry in manifest["components"].items()}
    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/memory.py", *sys.argv[1:]]),
        "machine": machine_facts(db.server_version),
        "code": code,
        "settings": {
            "concurrency": 2,
            "compression_threads": 2,
            "compression_level": 6,
            "interval": args.interval,
        },
        "database": asdict(db),
        "backup": {
            "backup_id": manifest["backup_id"],
            "wall_seconds": round(wall, 1),
            "manifest_duration_seconds": manifest["duration_seconds"],
            "bundle_bytes": bundle,
            "stored_files": files,
            "content_bytes": content,
        },
        "peak_total_rss_bytes": sampler.peak_total,
        "processes": [asdict(t) for t in sampler.tracks.values()],
        "timeline_mib": sampler.timeline,
    }


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f} MiB"


def print_report(result: dict) -> None:
    """Print the result as a readable table."""
    db, backup = result["database"], result["backup"]
    rows = [
        ("data size (pg_database_size)", mib(db["size_bytes"])),
        ("database.sql (plain dump)", mib(backup["content_bytes"].get("database"))),
        ("generation time", "reused" if db["reused"] else f"{db['generation_seconds']:.1f} s"),
        ("backup wall time (CLI)", f"{backup['wall_seconds']:.1f} s"),
        ("backup duration (manifest)", f"{backup['manifest_duration_seconds']:.1f} s"),
        ("stored bundle size", mib(backup["bundle_bytes"])),
        ("peak RSS of the worker tree (sum)", mib(result["peak_total_rss_bytes"])),
        ("allocator settings", result["machine"]["allocator_env"] or "defaults"),
    ]
    width = max(len(label) for label, _ in rows)
    print()
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")
    print(f"\n{'process':<14} {'pid':>7} {'idle RSS':>11} {'peak RSS':>11} {'at':>7} {'VmHWM':>11}  note")
    for p in result["processes"]:
        notes = ", ".join(filter(None, [*p["seen_doing"], p["note"]]))
        print(
            f"{p['role']:<14} {p['pid']:>7} {mib(p['idle_rss']):>11} {mib(p['peak_rss']):>11} "
            f"{p['peak_at_s']:>6.1f}s {mib(p['vm_hwm']):>11}  {notes}"
        )


def write_result(result: dict, folder: Path) -> Path:
    """Write the result as JSON into ``folder``; return the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"memory-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def start_services(stack: contextlib.ExitStack, root: Path, args: argparse.Namespace) -> tuple:
    """Start the app and broker Redis servers and fill the app Redis; return both servers."""
    app = stack.enter_context(start_redis(root / "app-redis"))
    broker = stack.enter_context(start_redis(root / "broker"))
    started = time.monotonic()
    counts = fill_app_redis(app.client(), args.redis_keys)
    took = time.monotonic() - started
    print(f"app Redis on :{app.port}: {sum(counts.values())} keys {counts} in {took:.1f} s")
    return app, broker


def measure(args: argparse.Namespace, pg: PgServer, db: DatabaseInfo, root: Path) -> dict:
    """Start Redis servers and a worker, run one backup while sampling; return the result."""
    with contextlib.ExitStack() as stack:
        app, broker = start_services(stack, root, args)
        folders = {**make_files(root, args.log_mb), "storage": root / "backups", "staging": root / "staging"}
        env = worker_env(pg.host, pg.port, pg.user, DB_NAME, app.port, broker.port, folders)
        code = code_state()
        worker = start_worker(env, root / "worker.log")
        stack.callback(stop_worker, worker)
        wait_for_worker(worker, env["CELERY_BROKER_URL"], root / "worker.log")
        sampler = Sampler([psutil.Process(worker.pid)], worker=True, folders=folders)
        time.sleep(1.0)
        sampler.mark_idle()
        print("worker ready; running: python -m vq_tasks.cli run --wait")
        exit_code, wall = run_backup(env, sampler, args, root / "cli.out")
        sampler.read_hwm()
        print((root / "cli.out").read_text(errors="replace").rstrip())
        if exit_code != 0:
            log = (root / "worker.log").read_text(errors="replace")
            raise RuntimeError(f"the backup failed ({exit_code}); worker log:\n{log}")
        if code_state()["vq_tasks_sha256"] != code["vq_tasks_sha256"]:
            code["note"] = "vq_tasks changed on disk during the run; the worker ran the code of its start"
        return build_result(args, db, read_manifest(folders["storage"]), sampler, wall, code)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pg = PgServer(args.pg_host, args.pg_port, args.pg_user)
    root = Path(tempfile.mkdtemp(prefix="vq-bench-", dir=args.workdir))
    try:
        db = prepare_database(pg, args)
        result = measure(args, pg, db, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if not args.keep_db:
            drop_database(pg)
    print_report(result)
    print(f"\nwritten to {write_result(result, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
