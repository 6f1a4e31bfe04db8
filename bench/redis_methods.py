"""The two ways a Redis backup is taken, side by side: SYNC (the server's own RDB over the
replication protocol) and the logical snapshot a managed service needs (SCAN, DUMP and the
expiry times, written as an RDB), on the same server of ``--keys`` keys (DEBUG POPULATE).

    python bench/redis_methods.py                  # part of `make bench`: 1M keys, 3 rounds
    python bench/redis_methods.py --keys 200000 --rounds 1

Each run is a child process (`dump_redis` with REDIS_BACKUP_METHOD sync or dump into a file), so
its wall time (Python's start-up included, alike for both) and peak RSS are its own. Target: the
snapshot at most 1.5 times the SYNC time. It prints a table and PASS or FAIL; a measurement, not
a test. A third row, the floor, is what no client of the snapshot can beat: the same server
answering PEXPIRETIME and DUMP for every key (whose names DEBUG POPULATE makes known, so no SCAN),
sent and read by `redis-cli --pipe` (C, replies counted, not parsed).
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
sys.path[:0] = [str(REPO)]

from tests.servers import start_redis  # noqa: E402

TARGET = 1.5
CHILD = """
import resource, sys
from vq_tasks.settings import load_settings
from vq_tasks.sources.redis import dump_redis
settings = load_settings(redis_host="127.0.0.1", redis_port=int(sys.argv[1]), redis_backup_method=sys.argv[2],
                         celery_broker_url="redis://127.0.0.1:1/0")
with open(sys.argv[3], "wb") as out:
    facts = dump_redis(settings, out)
print(sum(facts.keys.values()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def one_run(port: int, method: str, path: Path) -> tuple[float, float, int]:
    """Return (wall seconds, peak RSS MiB, keys written) of one backup in a child process."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(port), method, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    keys, peak_kib = done.stdout.split()[-2:]
    return wall, int(peak_kib) / 1024, int(keys)


def floor_run(port: int, keys: int, folder: Path) -> float:
    """Return the wall seconds of redis-cli --pipe sending PEXPIRETIME and DUMP of every key."""
    commands = folder / "floor.resp"
    if not commands.exists():
        with open(commands, "wb") as out:
            for number in range(keys):
                name = b"key:%d" % number
                head = b"$%d\r\n%s\r\n" % (len(name), name)
                out.write(b"*2\r\n$11\r\nPEXPIRETIME\r\n" + head + b"*2\r\n$4\r\nDUMP\r\n" + head)
    started = time.perf_counter()
    with open(commands, "rb") as source:
        pipe = ["redis-cli", "-p", str(port), "--pipe"]
        subprocess.run(pipe, stdin=source, capture_output=True, check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vq-bench-redis-") as folder:
        root = Path(folder)
        with start_redis(root / "redis", args=["--enable-debug-command", "yes"]) as server:
            with server.client() as client:
                client.execute_command("DEBUG", "POPULATE", args.keys, "key", 20)
            runs: dict[str, list[tuple[float, float, int]]] = {"sync": [], "dump": []}
            for number in range(args.rounds):
                for method in ("sync", "dump") if number % 2 == 0 else ("dump", "sync"):
                    runs[method].append(one_run(server.port, method, root / f"{method}.rdb"))
            floor = statistics.median(floor_run(server.port, args.keys, root) for _ in range(args.rounds))
    rows = {m: {"wall_s": statistics.median(r[0] for r in rs), "peak_rss_mib": max(r[1] for r in rs),
                "keys": rs[0][2]} for m, rs in runs.items()}  # fmt: skip
    ratio = rows["dump"]["wall_s"] / rows["sync"]["wall_s"]
    print(f"{'method':<8}{'keys':>10}{'wall s (median)':>18}{'peak RSS MiB':>15}")
    for method, row in rows.items():
        print(f"{method:<8}{row['keys']:>10}{row['wall_s']:>18.2f}{row['peak_rss_mib']:>15.1f}")
    print(f"{'floor':<8}{args.keys:>10}{floor:>18.2f}{'':>15}")
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"logical snapshot / SYNC: {ratio:.2f} (target <= {TARGET}): {verdict}")
    print(f"floor (server's DUMP work, C client) / SYNC: {floor / rows['sync']['wall_s']:.2f}")
    result = {"keys": args.keys, "rounds": args.rounds, "methods": rows, "ratio": round(ratio, 3)}
    print(json.dumps({**result, "floor_s": round(floor, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
