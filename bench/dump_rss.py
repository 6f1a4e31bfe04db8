"""Is the database dump's memory bounded? Stage the dump of vq_bench several times in one process,
through the real ``stage_part`` and ``dump_database`` (no Celery), and print the peak RSS of each
round. If the peak kept rising from round to round, memory would grow with the bytes dumped.

    python bench/memory.py --size-gb 2 --keep-db     # leaves vq_bench behind
    python bench/dump_rss.py --rounds 3
    MALLOC_MMAP_THRESHOLD_=131072 python bench/dump_rss.py --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from bench_data import DB_NAME, PgServer, database_size  # noqa: E402

from vq_tasks.backup.staging import StagingArea, stage_part  # noqa: E402
from vq_tasks.settings import Settings, load_settings  # noqa: E402
from vq_tasks.sources.postgres import dump_database  # noqa: E402

MIB = 1 << 20


class PeakWatcher:
    """Samples this process's RSS every ``interval`` seconds in a thread; ``take`` returns and
    resets the peak."""

    def __init__(self, interval: float = 0.1):
        self._process = psutil.Process()
        self._interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def take(self) -> int:
        peak, self._peak = self._peak, 0
        return peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def dump_once(settings: Settings, staging: Path, round_number: int) -> int:
    """Stage one dump of the database and remove it; return the bytes dumped."""
    area = StagingArea(staging, f"round{round_number}_20260101_000000")
    try:
        produce = lambda out: dump_database(settings, out)  # noqa: E731
        return stage_part(settings, area, "database", "database.sql", produce).content.size
    finally:
        area.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--db-host", default="127.0.0.1")
    args = parser.parse_args(argv)
    size = database_size(PgServer(host=args.db_host))
    if size is None:
        print(f"no database {DB_NAME}: run bench/memory.py with --keep-db first", file=sys.stderr)
        return 2
    print(f"{DB_NAME}: {size / MIB:.0f} MiB")
    staging = Path(tempfile.mkdtemp(prefix="vq-dump-rss-"))
    settings = load_settings(db_host=args.db_host, db_name=DB_NAME, backup_staging_dir=staging)
    watcher = PeakWatcher()
    print(f"idle RSS {psutil.Process().memory_info().rss / MIB:.1f} MiB")
    try:
        for number in range(1, args.rounds + 1):
            started = time.monotonic()
            size = dump_once(settings, staging, number)
            took, peak = time.monotonic() - started, watcher.take()
            print(f"round {number}: {size / MIB:.0f} MiB in {took:.1f} s, peak RSS {peak / MIB:.1f} MiB")
    finally:
        watcher.close()
        shutil.rmtree(staging, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
