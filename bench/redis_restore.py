"""The Redis restore alone: ``restore_redis`` of an RDB of ``--keys`` keys into an empty
redis-server, each run a child process, so that its wall time and peak RSS are its own.

    python bench/redis_restore.py                          # 1M keys of mixed types, 3 rounds
    python bench/redis_restore.py --keys 200000 --rounds 1
    python bench/redis_restore.py --populate               # DEBUG POPULATE: 20-byte strings

The RDB is made once on a redis-server started here: by default the keys of `make bench`'s data set
(bench_data.fill_app_redis_fast: every type, a tenth of the strings with a TTL), with --populate
DEBUG POPULATE's. Each round restores it into a new redis-server and checks the key count. It
prints, per round and as medians: the wall time of the child (Python's start-up included), the
time until the throwaway had loaded the RDB, until every RESTORE was queued, and until EXEC
returned, and the child's CPU time and peak RSS (the throwaway and the target are other processes:
the CPU time is of our side alone, and the less noisy figure on a busy machine). A measurement, not
a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import redis  # noqa: E402
from bench_data import fill_app_redis_fast  # noqa: E402

from tests.servers import start_redis  # noqa: E402

CHILD = """
import json, resource, sys, time
from pathlib import Path
from vq_tasks.restore.redis import restore_redis
from vq_tasks.settings import load_settings
settings = load_settings(redis_host="127.0.0.1", redis_port=int(sys.argv[1]), redis_timeout=300,
                         celery_broker_url="redis://127.0.0.1:1/0")
started = time.perf_counter()
marks = {}
def progress(stage, db, count):
    marks.setdefault(stage, time.perf_counter() - started)  # the first of each stage
    if stage in ("removed", "applying"):
        marks.setdefault("queued_all", marks[stage])
result = restore_redis(settings, Path(sys.argv[2]), progress=progress)
marks["done"] = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_SELF)
marks["cpu_s"] = usage.ru_utime + usage.ru_stime
marks["peak_rss_mib"] = usage.ru_maxrss / 1024
marks["restored"] = sum(result.restored.values())
print(json.dumps(marks))
"""
COLUMNS = (  # seconds from the child's start: first batch queued (the RDB loaded), all queued, EXEC done
    ("queued", "1st batch s", 12),
    ("queued_all", "queued s", 10),
    ("done", "EXEC s", 8),
    ("wall_s", "wall s", 8),
    ("cpu_s", "CPU s", 7),
    ("peak_rss_mib", "peak RSS MiB", 14),
)


def make_rdb(root: Path, keys: int, populate: bool) -> Path:
    """Fill a redis-server of its own with ``keys`` keys and return the path of its saved RDB."""
    with start_redis(root / "source", args=["--enable-debug-command", "yes"]) as server:
        client = redis.Redis(server.host, server.port, socket_timeout=900)
        if populate:
            client.execute_command("DEBUG", "POPULATE", keys, "key", 20)
        else:
            fill_app_redis_fast(client, keys)
        client.save()
        client.close()
    return root / "source" / "dump.rdb"


def one_run(root: Path, rdb: Path, number: int) -> dict[str, float]:
    """Restore ``rdb`` into a new redis-server in a child process; return its figures."""
    with start_redis(root / f"target-{number}") as target:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(target.port), str(rdb)], capture_output=True, text=True
        )
        wall = time.perf_counter() - started
        if done.returncode:
            raise RuntimeError(f"the restore failed: {done.stderr[-2000:]}")
        marks = json.loads(done.stdout.splitlines()[-1])
        with target.client() as client:
            keys = client.dbsize()
    if keys != marks["restored"]:
        raise RuntimeError(f"the target has {keys} keys, the restore said {marks['restored']}")
    return {"wall_s": wall, **marks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--populate", action="store_true", help="DEBUG POPULATE's 20-byte strings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vq-bench-redis-restore-") as folder:
        root = Path(folder)
        rdb = make_rdb(root, args.keys, args.populate)
        rdb_mib = rdb.stat().st_size / (1 << 20)
        runs = [one_run(root, rdb, number) for number in range(args.rounds)]
    print(f"{args.keys} keys, RDB {rdb_mib:.1f} MiB")
    print("round" + "".join(f"{title:>{width}}" for _, title, width in COLUMNS))
    for number, run in enumerate(runs):
        print(f"{number:<5}" + "".join(f"{run[key]:>{width}.2f}" for key, _, width in COLUMNS))
    median = {key: round(statistics.median(run[key] for run in runs), 3) for key, _, _ in COLUMNS}
    result = {"keys": args.keys, "rdb_mib": round(rdb_mib, 1), "rounds": args.rounds, "median": median}
    print(json.dumps(result | {"peak_rss_mib": round(max(run["peak_rss_mib"] for run in runs), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
