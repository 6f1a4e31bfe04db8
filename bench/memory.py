"""Memory benchmark: the peak RSS of a real worker while it backs up a PostgreSQL database of a
given size (1 GiB by default), next to its own Redis servers and config and log folders.

    python bench/memory.py --size-gb 1          # what `make bench` runs (without --size-gb)
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
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
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

from tests.servers import RedisServer, start_redis  # noqa: E402

MIB = 1 << 20
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
ALLOCATOR_ENV = ("MALLOC_", "GLIBC_TUNABLES", "PYTHONMALLOC")


@dataclass
class Track:
    """One process of the worker's tree and the largest RSS seen in it."""

    pid: int
    role: str
    command: str
    idle_rss: int | None = None
    peak_rss: int = 0
    peak_at_s: float = 0.0
    vm_hwm: int | None = None
    note: str = ""
    seen_doing: list[str] = field(default_factory=list)


@dataclass
class Sampler:
    """Samples the RSS of a process and all its descendants; keeps the peak of each."""

    root: psutil.Process
    folders: dict[str, Path] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)
    tracks: dict[int, Track] = field(default_factory=dict)
    procs: dict[int, psutil.Process] = field(default_factory=dict)
    peak_total: int = 0
    timeline: list[dict[str, float]] = field(default_factory=list)

    def sample(self) -> None:
        """Read the RSS of every process in the tree now."""
        now = round(time.monotonic() - self.t0, 2)
        point: dict[str, float] = {"t": now}
        for proc in self._tree():
            try:
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            track = self.tracks.get(proc.pid) or self._track(proc)
            if rss > track.peak_rss:
                track.peak_rss, track.peak_at_s = rss, now
            point[track.role] = round(rss / MIB, 1)
            if track.role.startswith("pool child"):
                self._note_activity(proc, track)
        self.peak_total = max(self.peak_total, int(sum(v for k, v in point.items() if k != "t") * MIB))
        self.timeline.append(point)

    def mark_idle(self) -> None:
        """Record the current RSS of every process as its idle RSS."""
        self.sample()
        for pid, track in self.tracks.items():
            with contextlib.suppress(psutil.NoSuchProcess, KeyError):
                track.idle_rss = self.procs[pid].memory_info().rss

    def read_hwm(self) -> None:
        """Read VmHWM of every tracked process still alive."""
        for track in self.tracks.values():
            track.vm_hwm = vm_hwm(track.pid)

    def _note_activity(self, proc: psutil.Process, track: Track) -> None:
        """Note what a pool child is doing, from the files it has open (a part it stages, or the
        object it stores): dump tasks can run on either child."""
        try:
            paths = [f.path for f in proc.open_files()]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return
        for path in paths:
            doing = activity(path, self.folders)
            if doing and doing not in track.seen_doing:
                track.seen_doing.append(doing)

    def _tree(self) -> list[psutil.Process]:
        try:
            children = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in children:
            self.procs.setdefault(child.pid, child)
        return [self.root, *(self.procs[c.pid] for c in children)]

    def _track(self, proc: psutil.Process) -> Track:
        self.procs.setdefault(proc.pid, proc)
        try:
            name, parent, command = proc.name(), proc.ppid(), " ".join(proc.cmdline()[:3])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            name, parent, command = "?", 0, "?"
        track = Track(proc.pid, self._role(proc.pid, name, parent), command)
        if track.role == "pg_dump" and parent in self.tracks:
            self.tracks[parent].note = "ran dump_database (pg_dump's parent)"
        self.tracks[proc.pid] = track
        return track

    def _role(self, pid: int, name: str, parent: int) -> str:
        if pid == self.root.pid:
            return "worker main"
        if name == "pg_dump":
            taken = sum(1 for t in self.tracks.values() if t.role.startswith("pg_dump"))
            return "pg_dump" if not taken else f"pg_dump {taken + 1}"
        if parent == self.root.pid:
            return f"pool child {sum(1 for t in self.tracks.values() if t.role.startswith('pool')) + 1}"
        return f"{name} (pid {pid})"


def activity(path: str, folders: dict[str, Path]) -> str | None:
    """Given a file a pool child has open, return the step it shows: "stage database", "finalize"."""
    name = Path(path).name
    if "staging" in folders and path.startswith(str(folders["staging"])) and name.endswith(".tmp"):
        return f"stage {name.split('.')[1]}"
    if "storage" in folders and path.startswith(str(folders["storage"])) and ".partial-" in name:
        return "finalize"
    return None


def vm_hwm(pid: int) -> int | None:
    """Return the peak resident set size (VmHWM) of a live process, in bytes, or None."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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


def worker_env(
    pg: PgServer, app: RedisServer, broker: RedisServer, folders: dict[str, Path]
) -> dict[str, str]:
    """Return the environment of the worker and the CLI: settings for this benchmark's services."""
    return {
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{broker.port}/0",
        "DB_HOST": pg.host,
        "DB_PORT": str(pg.port),
        "DB_USER": pg.user,
        "DB_NAME": DB_NAME,
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(app.port),
        "BACKUP_STORAGE_PROVIDER": "Local",
        "BACKUP_STORAGE_PATH": str(folders["storage"]),
        "BACKUP_STAGING_DIR": str(folders["staging"]),
        "BACKUP_CONFIG_PATHS": str(folders["config"]),
        "BACKUP_LOG_PATHS": str(folders["logs"]),
        "COMPRESSION_ENABLED": "true",
        "BACKUP_RETRY_MAX": "0",
        "PYTHONUNBUFFERED": "1",
    }


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start one prefork worker of concurrency 2 in its own session, its output in ``log``."""
    command = [sys.executable, "-m", "celery", "-A", "vq_tasks", "worker", "--pool=prefork"]
    command += ["--concurrency=2", "--loglevel=WARNING", "--hostname=bench@%h"]
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_for_worker(worker: subprocess.Popen[bytes], broker_url: str, log: Path) -> None:
    """Return once the worker answers a ping. Raise RuntimeError, with its log, if it does not."""
    from celery import Celery

    control = Celery(broker=broker_url).control
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.returncode}:\n{log.read_text(errors='replace')}")
        if control.ping(timeout=1.0):
            return
    raise RuntimeError(f"worker did not answer within {READY_TIMEOUT:.0f} s:\n{log.read_text()}")


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Stop the worker's whole session with SIGTERM, then SIGKILL if it lingers."""
    if worker.poll() is not None:
        return
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


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


def read_manifest(storage: Path) -> dict:
    """Return the one manifest written in ``storage``. Raise RuntimeError if there is none."""
    found = sorted(storage.glob("*_manifest.json"))
    if len(found) != 1:
        raise RuntimeError(f"expected one manifest in {storage}, found {[p.name for p in found]}")
    return json.loads(found[0].read_text())


def machine_facts(pg_version: str) -> dict[str, str | int]:
    """Return what the numbers depend on: CPUs, memory, versions, allocator settings inherited by
    the worker (glibc's malloc tunables change its RSS by several MiB)."""
    pg_dump = subprocess.run(["pg_dump", "--version"], capture_output=True, text=True).stdout.strip()
    redis_server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return {
        "nproc": os.cpu_count() or 0,
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgresql_server": pg_version,
        "pg_dump": pg_dump,
        "redis_server": redis_server.split()[2] if redis_server else "?",
        "allocator_env": " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith(ALLOCATOR_ENV)),
    }


def code_state() -> dict[str, str | list[str]]:
    """Return what code the worker ran: the commit, files changed since it, a digest of vq_tasks."""
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    status = subprocess.run(
        [*git, "status", "--porcelain", "vq_tasks"], capture_output=True, text=True
    ).stdout
    digest = hashlib.sha256()
    for path in sorted((REPO / "vq_tasks").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "commit": commit.strip(),
        "modified": [line[3:] for line in status.splitlines()],
        "vq_tasks_sha256": digest.hexdigest()[:16],
    }


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
        env = worker_env(pg, app, broker, folders)
        code = code_state()
        worker = start_worker(env, root / "worker.log")
        stack.callback(stop_worker, worker)
        wait_for_worker(worker, env["CELERY_BROKER_URL"], root / "worker.log")
        sampler = Sampler(psutil.Process(worker.pid), folders)
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
