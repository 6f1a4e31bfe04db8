"""The five measurements of bench/run.py, each of one run:

- ``floor``: bare ``pg_dump > /dev/null``, the least a backup of the database can take;
- ``script``: bench/manual_backup.sh, the backup an operator would write by hand;
- ``vq-<algorithm>``: ``vq-backup run --wait`` through a real worker (a new one for each run, so
  that its VmHWM is this run's) to local storage;
- ``manual-restore``: bench/manual_restore.sh into a new database and a new redis-server;
- ``vq-restore-<algorithm>``: ``vq-backup restore latest --force --yes --json`` into a new database
  and an empty redis-server.

Each returns a Run: wall time, CPU time (the command and everything it waited for, plus the
processes still alive at the end: the worker's, the redis-server that was restored into), bytes
written to storage by those processes (kernel I/O accounting: intermediate files count, what
PostgreSQL's server writes does not), bytes of the files produced, and the peak RSS of every
process. PostgreSQL's server and the application Redis work the same for both sides and are not
counted in CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis
from bench_data import PgServer, drop_database
from dataset import DataSet
from procs import Sampler, Totals, Waited, files_size, run_waited, stamped_lines
from services import REPO, read_manifest, start_worker, stop_worker, wait_for_worker, worker_env

from tests.servers import RedisServer, free_port, start_redis

BENCH = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "vq_tasks.cli"]
PROBE = (
    "from vq_tasks.settings import load_settings\n"
    "print(getattr(load_settings(), 'compression_algorithm', '<no such setting>'))"
)


class Refused(Exception):
    """The worker would not start with these settings (such as a COMPRESSION_ALGORITHM it refuses)."""


RESTORE_PHASES = (  # name, the progress line that starts and ends it (None: the start, the end)
    ("start-up", None, "verifying"),
    ("verify", "verifying", "virtualqueue_backup"),
    ("fetch", "virtualqueue_backup", "restoring "),
    ("database", "restoring database", "database restored"),
    ("redis", "restoring redis", "redis restored"),
    ("config", "restoring config", "config restored"),
    ("integrity", "checking integrity", None),
)


@dataclass
class Run:
    """One measured run of one side."""

    side: str
    round: int
    wall_seconds: float
    cpu_seconds: float
    written_bytes: int
    machine_busy: float  # share of the machine's CPUs busy meanwhile (this run, PostgreSQL, others)
    stored_bytes: int | None = None
    processes: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)


@dataclass
class Bench:
    """What the measurements of one data set share: its services and a private working folder."""

    args: argparse.Namespace
    pg: PgServer
    data: DataSet
    root: Path
    app: RedisServer
    broker: RedisServer

    def pg_env(self, database: str | None = None) -> dict[str, str]:
        """libpq's variables for the scripts and pg_dump (a password would go in PGPASSWORD)."""
        env = {"PGHOST": self.pg.host, "PGPORT": str(self.pg.port), "PGUSER": self.pg.user}
        return {**env, "PGDATABASE": database or self.data.database.name}

    def vq_env(self, storage: Path, algorithm: str) -> dict[str, str]:
        """The worker's and the CLI's settings, with local storage in ``storage``."""
        folders = {
            "storage": storage,
            "staging": self.root / "staging",
            "config": self.data.config,
            "logs": self.data.logs,
            "audit": self.root / "audit.jsonl",
        }
        env = worker_env(
            self.pg.host,
            self.pg.port,
            self.pg.user,
            self.data.database.name,
            self.app.port,
            self.broker.port,
            folders,
        )
        return {**env, "COMPRESSION_ALGORITHM": algorithm}

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"


def settle(pg: PgServer) -> None:
    """Start every measurement alike: PostgreSQL's dirty buffers written (CHECKPOINT), then the
    kernel's (sync), so that one run's writes are not paid by the next."""
    with pg.connect() as conn:
        conn.execute("CHECKPOINT")
    os.sync()


def algorithm_refusal(bench: Bench, algorithm: str) -> str | None:
    """Return why this build of vq_tasks would not compress with ``algorithm`` (None if it would),
    from its settings loaded with COMPRESSION_ALGORITHM set as the worker gets it."""
    env = {**os.environ, **bench.vq_env(bench.root / "probe", algorithm)}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1].strip().removeprefix("- ")
        return f"the settings refuse it: {last[:200]}"
    value = done.stdout.strip()
    if value == "<no such setting>":  # a build before the setting: gzip, the default, is all it does
        return None if algorithm == "gzip" else "no COMPRESSION_ALGORITHM setting, a worker would use gzip"
    if value != algorithm:
        return f"COMPRESSION_ALGORITHM={algorithm} is read as {value!r}"
    return None


def measure_floor(bench: Bench, round_number: int) -> Run:
    """Time the bare ``pg_dump > /dev/null``."""
    settle(bench.pg)
    sampler = Sampler([])
    command = ["pg_dump", "--format=plain", "--no-password"]
    output = bench.log(f"floor-r{round_number}")
    waited = run_waited(
        command, bench.pg_env(), sampler, bench.args.interval, output, stdout=subprocess.DEVNULL
    )
    _check(waited.returncode, "pg_dump > /dev/null", output)
    return _run("floor", round_number, waited, waited.totals, sampler)


def measure_script_backup(bench: Bench, round_number: int, dest: Path) -> Run:
    """Time bench/manual_backup.sh writing into ``dest``."""
    settle(bench.pg)
    env = {
        **bench.pg_env(),
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(bench.app.port),
        "CONFIG_DIR": str(bench.data.config),
        "LOG_DIR": str(bench.data.logs),
    }
    sampler = Sampler([])
    command = ["bash", str(BENCH / "manual_backup.sh"), str(dest)]
    output = bench.log(f"script-r{round_number}")
    waited = run_waited(command, env, sampler, bench.args.interval, output)
    _check(waited.returncode, "manual_backup.sh", output)
    run = _run("script", round_number, waited, waited.totals + sampler.totals(), sampler)
    run.stored_bytes = files_size(dest)
    run.details = script_steps(output)
    run.details["files"] = {p.name: p.stat().st_size for p in sorted(dest.iterdir()) if p.is_file()}
    return run


def measure_vq_backup(bench: Bench, round_number: int, algorithm: str, storage: Path) -> Run:
    """Time ``vq-backup run --wait`` through a new worker, storing into ``storage``."""
    env = bench.vq_env(storage, algorithm)
    worker_log = bench.log(f"worker-{algorithm}-r{round_number}")
    worker = start_worker(env, worker_log)
    try:
        try:
            wait_for_worker(worker, env["CELERY_BROKER_URL"], worker_log)
        except RuntimeError as exc:
            if worker.poll() is None:
                raise
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise Refused(f"the worker exited at start: {lines[-1][:200]}") from None
        folders = {"storage": storage, "staging": bench.root / "staging"}
        sampler = Sampler([psutil.Process(worker.pid)], worker=True, folders=folders)
        time.sleep(1.0)
        sampler.mark_idle()
        settle(bench.pg)
        sampler.begin()
        command = [*CLI, "run", "--wait", "--timeout", str(bench.args.timeout)]
        output = bench.log(f"vq-{algorithm}-r{round_number}")
        waited = run_waited(
            command, env, sampler, bench.args.interval, output, cwd=REPO, role="vq-backup run (CLI)"
        )
        totals = waited.totals + sampler.totals()
    finally:
        stop_worker(worker)
    _check(waited.returncode, "vq-backup run --wait", output, worker_log)
    run = _run(f"vq-{algorithm}", round_number, waited, totals, sampler)
    run.stored_bytes = files_size(storage)
    run.details = manifest_details(read_manifest(storage))
    return run


def manifest_details(manifest: dict) -> dict:
    """Return where a VQ backup's time went, from its manifest: each dump task's duration, the
    whole run's, and the compression it records."""
    components = {
        name: {
            "duration_seconds": entry.get("duration_seconds"),
            "content_bytes": entry["content"]["size"],
            "stored_bytes": entry.get("stored_size"),
        }
        for name, entry in manifest["components"].items()
    }
    return {
        "backup_id": manifest["backup_id"],
        "compression": manifest.get("compression"),
        "duration_seconds": manifest["duration_seconds"],
        "components": components,
        "files": {f["name"]: f["size"] for f in manifest["files"]},
    }


def measure_manual_restore(bench: Bench, round_number: int, source: Path) -> Run:
    """Time bench/manual_restore.sh from ``source`` into a new database and redis-server."""
    target = f"{bench.data.database.name}_manual"
    redis_dir = bench.root / f"manual-redis-r{round_number}"
    drop_database(bench.pg, target)
    settle(bench.pg)
    env = {
        **bench.pg_env("postgres"),
        "RESTORE_DB": target,
        "REDIS_DIR": str(redis_dir),
        "REDIS_PORT": str(free_port()),
        "CONFIG_RESTORE_DIR": str(bench.root / f"manual-config-r{round_number}"),
    }
    sampler = Sampler([])
    command = ["bash", str(BENCH / "manual_restore.sh"), str(source)]
    output = bench.log(f"manual-restore-r{round_number}")
    try:
        waited = run_waited(command, env, sampler, bench.args.interval, output)
        daemon = _daemon(redis_dir / "redis.pid")
        if daemon is not None:
            sampler.add_root(daemon, "redis-server (restored)")
            sampler.sample()
            sampler.read_hwm()
        _check(waited.returncode, "manual_restore.sh", output)
        totals = waited.totals + sampler.totals()
        run = _run("manual-restore", round_number, waited, totals, sampler)
        run.details = script_steps(output) | check_restored(bench, target, int(env["REDIS_PORT"]))
    finally:
        _stop_daemon(redis_dir / "redis.pid")
        drop_database(bench.pg, target)
        shutil.rmtree(redis_dir, ignore_errors=True)
    return run


def measure_vq_restore(bench: Bench, round_number: int, algorithm: str, storage: Path) -> Run:
    """Time ``vq-backup restore latest --force --yes`` from ``storage`` into a new database and an
    empty redis-server, with the backup's settings otherwise."""
    target = f"{bench.data.database.name}_vq"
    drop_database(bench.pg, target)
    with start_redis(bench.root / f"vq-target-redis-r{round_number}") as target_redis:
        env = {
            **bench.vq_env(storage, algorithm),
            "DB_NAME": target,
            "REDIS_PORT": str(target_redis.port),
            "BACKUP_RESTORE_CONFIG_DIR": str(bench.root / f"vq-config-{algorithm}-r{round_number}"),
        }
        sampler = Sampler([])
        sampler.add_root(psutil.Process(target_redis.process.pid), "redis-server (target)")
        settle(bench.pg)
        sampler.begin()
        command = [*CLI, "restore", "latest", "--force", "--yes", "--json"]
        output = bench.log(f"vq-restore-{algorithm}-r{round_number}")
        try:
            waited = run_waited(
                command, env, sampler, bench.args.interval, output, cwd=REPO, role="vq-backup restore (CLI)"
            )
            totals = waited.totals + sampler.totals()
            _check(waited.returncode, "vq-backup restore", output)
            run = _run(f"vq-restore-{algorithm}", round_number, waited, totals, sampler)
            run.details = restore_details(output, waited.wall_seconds)
            run.details |= check_restored(bench, target, target_redis.port)
        finally:
            drop_database(bench.pg, target)
    return run


def restore_details(output: Path, wall: float) -> dict:
    """Return where a VQ restore's time went: its own duration (the JSON report it prints last) and
    each phase, timed by its progress lines (from "verifying" to "... verified", and so on)."""
    text = output.read_text(errors="replace")
    report = {}
    with contextlib.suppress(ValueError):
        report = json.loads(text[text.index("\n{") + 1 :] if "\n{" in text else text[text.index("{") :])
    marks = stamped_lines(output)
    phases: dict[str, float] = {}
    for name, begins, ends in RESTORE_PHASES:
        start = 0.0 if begins is None else next((t for t, line in marks if line.startswith(begins)), None)
        end = wall if ends is None else next((t for t, line in marks if line.startswith(ends)), None)
        if start is not None and end is not None:
            phases[name] = round(end - start, 2)
    return {"duration_seconds": report.get("duration_seconds"), "components": phases, "ok": report.get("ok")}


def script_steps(output: Path) -> dict:
    """Return how long each step of a script took, from its "step: NAME" lines on stderr."""
    marks = [
        (t, line.removeprefix("step: ")) for t, line in stamped_lines(output) if line.startswith("step: ")
    ]
    steps = {name: round(after - t, 2) for (t, name), (after, _) in itertools.pairwise(marks)}
    done = next((t for t, name in marks if name == "done"), None)
    return {"duration_seconds": done, "components": steps}


def check_restored(bench: Bench, database: str, redis_port: int) -> dict:
    """Check a restore (not timed): the rows of every table and the Redis keys match the data set."""
    with bench.pg.connect(database) as conn:
        rows = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in bench.data.database.rows}
    with redis.Redis("127.0.0.1", redis_port, socket_timeout=30) as client:
        keys = client.dbsize()
    if rows != bench.data.database.rows or keys != bench.data.total_keys:
        raise RuntimeError(
            f"restore into {database} and :{redis_port} incomplete: rows {rows} (expected "
            f"{bench.data.database.rows}), keys {keys} (expected {bench.data.total_keys})"
        )
    return {"rows_checked": sum(rows.values()), "keys_checked": keys}


def processes_of(sampler: Sampler) -> list[dict]:
    """What a run's report keeps of each process the sampler followed."""
    return [
        {
            "role": t.role,
            "pid": t.pid,
            "command": t.command,
            "peak_bytes": t.peak,
            "peak_source": t.peak_source,
            "idle_bytes": t.idle_rss,
            "cpu_seconds": round(t.cpu_seconds, 2),
            "notes": [*t.seen_doing, t.note] if t.note else t.seen_doing,
        }
        for t in sampler.tracks.values()
    ]


def _run(side: str, round_number: int, waited: Waited, totals: Totals, sampler: Sampler) -> Run:
    processes = processes_of(sampler)
    return Run(
        side=side,
        round=round_number,
        wall_seconds=round(waited.wall_seconds, 2),
        cpu_seconds=round(totals.cpu_seconds, 2),
        written_bytes=totals.written_bytes,
        machine_busy=round(waited.machine_busy, 3),
        processes=processes,
    )


def _check(returncode: int, what: str, *logs: Path) -> None:
    if returncode != 0:
        text = "\n".join(p.read_text(errors="replace")[-4000:] for p in logs if p.exists())
        raise RuntimeError(f"{what} failed with exit code {returncode}:\n{text}")


def _daemon(pidfile: Path) -> psutil.Process | None:
    try:
        return psutil.Process(int(pidfile.read_text()))
    except (OSError, ValueError, psutil.NoSuchProcess):
        return None


def _stop_daemon(pidfile: Path) -> None:
    """Stop the redis-server the manual restore left running (SIGTERM, SIGKILL after 10 s)."""
    proc = _daemon(pidfile)
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except psutil.TimeoutExpired:
        proc.kill()
