"""Where does the time of a database dump go? Runs the real ``stage_part(dump_database)`` in this
process (no Celery), as bench/dump_rss.py does, and prints its speed, its peak RSS and the CPU
seconds of every thread (main, gzip-N), of pg_dump and of the machine (how busy both cores were).
``--stages`` also measures each stage alone on a sample of the dump held in memory.

    python bench/memory.py --size-gb 1 --keep-db      # leaves vq_bench behind
    python bench/profile_dump.py --rounds 2
    python bench/profile_dump.py --db vq_bench_prof --stages
    py-spy record --native --threads -o profile.svg -- .venv/bin/python bench/profile_dump.py --rounds 1
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from bench_data import DB_NAME, PgServer, database_size  # noqa: E402

from vq_tasks.backup.bundle import BundleWriter  # noqa: E402
from vq_tasks.backup.staging import StagingArea, stage_part  # noqa: E402
from vq_tasks.clients.pg_tools import pg_environment, pg_tool  # noqa: E402
from vq_tasks.clients.sql_dump import SqlDumpInspector  # noqa: E402
from vq_tasks.manifest import StagedPart  # noqa: E402
from vq_tasks.settings import Settings, load_settings  # noqa: E402
from vq_tasks.sources.postgres import dump_database  # noqa: E402
from vq_tasks.streams import compress  # noqa: E402
from vq_tasks.streams.compress import GzipStage  # noqa: E402
from vq_tasks.streams.stages import CHUNK_SIZE, HashStage, Nowhere, pump  # noqa: E402

MIB = 1 << 20


class Watcher:
    """Samples, every ``interval`` seconds, this process's RSS, the CPU seconds of each of its
    threads (kept after a thread ends) and the peak RSS of its children (pg_dump)."""

    def __init__(self, database: str, interval: float = 0.25):
        self._database = database
        self._process = psutil.Process()
        self._interval = interval
        self.peak = 0
        self.child_peak = 0
        self.thread_cpu: dict[int, float] = {}
        self.child_cpu: dict[int, float] = {}
        self.postgres_cpu: dict[int, float] = {}
        self._postgres_base: dict[int, float] = {}
        self._postgres_now: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="watcher")
        self._thread.start()

    def _run(self) -> None:
        ticks = 0
        while not self._stop.wait(self._interval):
            ticks += 1
            self.sample(postgres=ticks % 4 == 0)

    def sample(self, postgres: bool = True) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)
        for t in threading.enumerate():
            if t.native_id is not None:
                self.names.setdefault(t.native_id, t.name)
        for t in self._process.threads():
            self.thread_cpu[t.id] = t.user_time + t.system_time
        for child in self._process.children():
            try:
                self.child_peak = max(self.child_peak, child.memory_info().rss)
                times = child.cpu_times()
                self.child_cpu[child.pid] = times.user + times.system
            except psutil.NoSuchProcess:
                pass
        if not postgres:
            return
        for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):  # the backend serving pg_dump
            title = " ".join(p.info["cmdline"] or ())
            if p.info["name"] == "postgres" and f" {self._database} " in title and p.info["cpu_times"]:
                cpu = p.info["cpu_times"].user + p.info["cpu_times"].system
                self._postgres_now[p.pid] = cpu
                self.postgres_cpu[p.pid] = cpu - self._postgres_base.get(p.pid, 0.0)

    def reset(self) -> None:
        self.sample()
        self.peak = self.child_peak = 0
        self.thread_cpu.clear()
        self.child_cpu.clear()
        self._postgres_base = dict(self._postgres_now)
        self.postgres_cpu.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def vm_hwm() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def check_part(part: StagedPart, folder: Path) -> None:
    """Check the staged part as the rest of the system reads it: gzip(1) inflates it to the content's
    size and MD5, and a bundle holding it lists with tar(1)."""
    started = time.monotonic()
    with subprocess.Popen(["gzip", "-dc", part.path], stdout=subprocess.PIPE) as gunzip:
        md5, size = hashlib.md5(), 0
        while chunk := gunzip.stdout.read(CHUNK_SIZE):
            md5.update(chunk)
            size += len(chunk)
    assert gunzip.returncode == 0, "gzip -d failed"
    assert (size, md5.hexdigest()) == (part.content.size, part.content.md5), "content differs"
    bundle = folder / "bundle.tar.gz"
    with open(bundle, "wb") as out:
        writer = BundleWriter(out, True, datetime.now(UTC))
        writer.add(part)
        writer.close()
    listing = subprocess.run(["tar", "-tzf", str(bundle)], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == [part.member], listing.stdout
    bundle.unlink()
    print(
        f"  checked: gzip -d gives the recorded size and MD5, tar -tzf lists the bundle "
        f"({time.monotonic() - started:.1f} s)",
        flush=True,
    )


def full_round(settings: Settings, staging: Path, number: int, watcher: Watcher, check: bool) -> dict:
    area = StagingArea(staging, f"round{number}_20260101_000000")  # a backup id
    watcher.reset()
    machine = psutil.cpu_times()
    started = time.monotonic()
    try:
        produce = lambda out: dump_database(settings, out)  # noqa: E731
        part = stage_part(settings, area, "database", "database.sql", produce)
        took = time.monotonic() - started
        watcher.sample()
        after = psutil.cpu_times()
        busy = sum(after) - after.idle - (sum(machine) - machine.idle)
        result = {
            "size": part.content.size,
            "stored": part.staged_size,
            "seconds": took,
            "mb_s": part.content.size / 1e6 / took,
            "peak_rss": watcher.peak / MIB,
            "vm_hwm": vm_hwm(),
            "pg_dump_rss": watcher.child_peak / MIB,
            "threads": {watcher.names.get(tid, str(tid)): cpu for tid, cpu in watcher.thread_cpu.items()},
            "pg_dump_cpu": sum(watcher.child_cpu.values()),
            "postgres_cpu": sum(watcher.postgres_cpu.values()),
            "machine_busy": busy / took,
        }
        if check:
            check_part(part, staging)
    finally:
        area.remove()
    return result


def print_round(number: int, r: dict) -> None:
    threads = ", ".join(f"{name} {cpu:.1f}" for name, cpu in sorted(r["threads"].items()) if cpu >= 0.05)
    print(
        f"round {number}: {r['size'] / MIB:.0f} MiB -> {r['stored'] / MIB:.0f} MiB in {r['seconds']:.1f} s "
        f"({r['mb_s']:.0f} MB/s), peak RSS {r['peak_rss']:.1f} MiB (VmHWM {r['vm_hwm']:.1f}), "
        f"pg_dump {r['pg_dump_rss']:.1f} MiB\n"
        f"  CPU s: {threads}; pg_dump {r['pg_dump_cpu']:.1f}; postgres {r['postgres_cpu']:.1f}; "
        f"cores busy {r['machine_busy']:.2f} of {psutil.cpu_count()}",
        flush=True,
    )


def rate(label: str, size: int, seconds: float) -> None:
    print(f"  {label:<44} {size / 1e6 / seconds:8.0f} MB/s  ({seconds:.2f} s)", flush=True)


def stages_alone(settings: Settings, sample_mb: int) -> None:
    """Measure each stage alone: pg_dump read through a pipe, then on a sample held in memory."""
    print("stages alone:")
    argv = [pg_tool(settings, "pg_dump"), "--format=plain", "--no-password", "--dbname", settings.db_name]
    for label, chunk in (("pg_dump -> pump(1 MiB) -> nothing", CHUNK_SIZE), ("... pump(64 KiB)", 64 << 10)):
        started = time.monotonic()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, env=pg_environment(settings), bufsize=0)
        size = pump(process.stdout, Nowhere(), chunk)
        process.wait()
        rate(label, size, time.monotonic() - started)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, env=pg_environment(settings), bufsize=0)
    data = bytearray()
    while len(data) < sample_mb * MIB and (chunk := process.stdout.read(CHUNK_SIZE)):
        data += chunk
    data = bytes(data)
    process.kill()
    process.wait()
    chunks = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
    size = len(data)
    print(f"  on the first {size / MIB:.0f} MiB of the dump, in 1 MiB chunks:")

    def timed(label: str, work) -> None:
        started = time.monotonic()
        work()
        rate(label, size, time.monotonic() - started)

    def feed() -> None:
        inspector = SqlDumpInspector()
        for c in chunks:
            inspector.feed(c)

    timed("SqlDumpInspector.feed", feed)
    timed("bytes(memoryview slice) copy", lambda: [bytes(memoryview(c)[:]) for c in chunks])
    for name in ("md5", "sha256"):
        timed(f"hashlib.{name}", lambda name=name: [hashlib.new(name).update(c) for c in chunks])

    def hash_stage() -> None:
        stage = HashStage(Nowhere())
        for c in chunks:
            stage.write(c)

    timed("HashStage (md5 + sha256)", hash_stage)
    timed("zlib level 6, one thread", lambda: [zlib.compress(c, 6) for c in chunks[: len(chunks) // 4]])
    print("    (the zlib line is on a quarter of the sample: divide its MB/s by 4)")
    for threads in (1, 2):

        def gzip(threads: int = threads) -> None:
            stage = GzipStage(Nowhere(), settings.compression_level, threads)
            for c in chunks:
                stage.write(c)
            stage.close()

        timed(f"GzipStage level {settings.compression_level}, {threads} thread(s)", gzip)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--db", default=DB_NAME)
    parser.add_argument("--db-host", default="127.0.0.1")
    parser.add_argument("--stages", action="store_true", help="also measure each stage alone")
    parser.add_argument("--sample-mb", type=int, default=256)
    parser.add_argument("--check", action="store_true", help="check the part with gzip -d and tar -tzf")
    parser.add_argument("--threads", type=int, default=None, help="COMPRESSION_THREADS (default: setting)")
    parser.add_argument("--block-kib", type=int, default=None, help="gzip block (GZIP_BLOCK_SIZE)")
    args = parser.parse_args(argv)
    size = database_size(PgServer(host=args.db_host), args.db)
    if size is None:
        print(f"no database {args.db}: run bench/memory.py with --keep-db first", file=sys.stderr)
        return 2
    print(f"{args.db}: {size / MIB:.0f} MiB; idle RSS {psutil.Process().memory_info().rss / MIB:.1f} MiB")
    if args.block_kib:
        GzipStage.__init__.__defaults__ = (args.block_kib << 10,)
    print(f"deflate: {getattr(compress, 'DEFLATE', zlib).__name__}", flush=True)
    staging = Path(tempfile.mkdtemp(prefix="vq-profile-dump-"))
    extra = {"compression_threads": args.threads} if args.threads else {}
    settings = load_settings(db_host=args.db_host, db_name=args.db, backup_staging_dir=staging, **extra)
    watcher = Watcher(args.db)
    try:
        for number in range(1, args.rounds + 1):
            print_round(number, full_round(settings, staging, number, watcher, args.check))
        if args.stages:
            stages_alone(settings, args.sample_mb)
    finally:
        watcher.close()
        shutil.rmtree(staging, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
