"""Parsing the restore's DUMP and PTTL replies: our Python reader (redis_wire.ReplyReader) against
hiredis' (redis_replies.Replies, what the restore uses, and hiredis.Reader's bare loop), on the
replies of ``--keys`` keys captured from a redis-server started here, parsed from memory.

    python bench/redis_replies.py                 # 100k keys: 200k replies, of both key sets
    python bench/redis_replies.py --keys 50000

Key sets: "mixed", the keys of `make bench`'s data set (bench_data.fill_app_redis_fast) and one in
a thousand a value of 64 KiB to 1 MiB; "small", DEBUG POPULATE's 20-byte strings. Prints the
median of 5 runs of each, and the ratio to ours. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import hiredis  # noqa: E402
import redis  # noqa: E402
from bench_data import fill_app_redis_fast  # noqa: E402

from tests.servers import start_redis  # noqa: E402
from vq_tasks.clients.redis_replies import Replies  # noqa: E402
from vq_tasks.clients.redis_wire import ReplyReader  # noqa: E402
from vq_tasks.restore.redis import DUMP_AND_PTTL  # noqa: E402

BATCH = 1000


def capture(root: Path, keys: int, mixed: bool) -> tuple[bytes, int]:
    """Fill a new server with ``keys`` keys; return the bytes of its replies to DUMP and PTTL of
    every key, and how many keys."""
    with start_redis(root, args=["--enable-debug-command", "yes"]) as server:
        client = redis.Redis(server.host, server.port, socket_timeout=900)
        if mixed:
            fill_app_redis_fast(client, keys - keys // 1000)
            rng = random.Random(5)
            for number in range(keys // 1000):
                client.set(b"large:%d" % number, rng.randbytes(rng.choice([64 << 10, 256 << 10, 1 << 20])))
        else:
            client.execute_command("DEBUG", "POPULATE", keys, "key", 20)
        names = list(client.scan_iter(count=BATCH))
        client.close()
        replies = bytearray()
        with socket.create_connection((server.host, server.port)) as sock:
            for start in range(0, len(names), BATCH):
                batch = names[start : start + BATCH]
                sock.sendall(b"".join(DUMP_AND_PTTL % (len(k), k, len(k), k) for k in batch))
                counter, counted = hiredis.Reader(), 0
                while counted < 2 * len(batch):
                    data = sock.recv(1 << 20)
                    replies += data
                    counter.feed(data)
                    while counter.gets() is not False:
                        counted += 1
    return bytes(replies), len(names)


def source(data: bytes) -> Callable[[memoryview], int]:
    """A ``recv_into`` handing out ``data`` as fast as asked."""
    view, done = memoryview(data), 0

    def recv_into(into: memoryview) -> int:
        nonlocal done
        size = min(len(into), len(data) - done)
        into[:size] = view[done : done + size]
        done += size
        return size

    return recv_into


def ours(data: bytes, keys: int) -> None:
    reader = ReplyReader(source(data))
    for _ in range(keys):
        reader.bulk(), reader.integer()


def replies(data: bytes, keys: int) -> None:
    read = Replies(source(data), "bench")
    for start in range(0, keys, BATCH):
        for _ in read.pairs(min(BATCH, keys - start)):
            pass


def bare_hiredis(data: bytes, keys: int) -> None:
    reader, view, done = hiredis.Reader(), memoryview(data), 0
    for _ in range(2 * keys):
        while reader.gets() is False:
            reader.feed(view[done : done + (32 << 10)])
            done += 32 << 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args()
    ways = {"ours (ReplyReader)": ours, "Replies (hiredis)": replies, "hiredis.Reader alone": bare_hiredis}
    print(f"{'keys':<7}{'replies':>9}{'MiB':>7}  {'reader':<22}{'ms (median)':>12}{'ours / it':>11}")
    with tempfile.TemporaryDirectory(prefix="vq-bench-replies-") as folder:
        for name, mixed in (("mixed", True), ("small", False)):
            data, keys = capture(Path(folder) / name, args.keys, mixed)
            times = {}
            for way, run in ways.items():
                runs = []
                for _ in range(5):
                    started = time.perf_counter()
                    run(data, keys)
                    runs.append(time.perf_counter() - started)
                times[way] = statistics.median(runs) * 1000
                ratio = times["ours (ReplyReader)"] / times[way]
                mib = len(data) / (1 << 20)
                print(f"{name:<7}{2 * keys:>9}{mib:>7.1f}  {way:<22}{times[way]:>12.1f}{ratio:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
