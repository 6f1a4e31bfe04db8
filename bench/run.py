"""VQ Backup against the backup an operator would script by hand, on a realistic data set.

    python bench/run.py                            # what `make bench` runs: 1 GiB, 2 rounds, gzip
    python bench/run.py --size-gb 0.25 --reuse     # keep the data set for the next run
    python bench/run.py --algorithm gzip,zstd      # COMPRESSION_ALGORITHM passed to the worker
    python bench/run.py --sizes 0.25,1,4 --reuse   # the scaling series: time vs size, memory flat

For each size it builds (or with --reuse, reuses) a data set: a PostgreSQL database of that many
GiB with text, jsonb and bytea that compresses about 3:1, an application Redis of 1M keys of mixed
types per GiB, 256 MiB of log lines per GiB and a config folder (bench/dataset.py). Then, in each
round, alternating the order (a then b, then b then a), it times:

- the floor: bare ``pg_dump > /dev/null``;
- (a) bench/manual_backup.sh: pg_dump > db.sql, redis-cli --rdb, tar czf of config and logs, tar czf
  of the lot, md5sum;
- (b) ``vq-backup run --wait`` through a real prefork worker (concurrency 2) to local storage;
- and unless --skip-restore, (a) bench/manual_restore.sh: md5sum -c, tar xzf, createdb + psql -f,
  the RDB copied into a new redis-server, started until it answers PING; against (b)
  ``vq-backup restore latest --force --yes`` into a new database and an empty redis-server.

It reports for each: wall time, CPU time, peak RSS of every process, bytes written and stored, the
ratio b/a, and PASS or FAIL for each target (bench/report.py). It prints tables and writes them
with the runs, machine, commit and settings to bench/results/bench-<timestamp>.json. It starts its
own Redis servers and workers and stops them; its databases are vq_bench_<size>* on the local
PostgreSQL (127.0.0.1:5432, user postgres, trust). This is a measurement, not a test.
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
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import dataset  # noqa: E402
from bench_data import PgServer  # noqa: E402
from measure import (  # noqa: E402
    Bench,
    Refused,
    Run,
    algorithm_refusal,
    measure_floor,
    measure_manual_restore,
    measure_script_backup,
    measure_vq_backup,
    measure_vq_restore,
)
from report import print_scaling, print_size, scaling, summarize, targets  # noqa: E402
from services import code_state, machine_facts  # noqa: E402

import tests.servers as servers  # noqa: E402

ALGORITHMS = ("gzip", "zstd")
servers.START_TIMEOUT = 600.0  # an application Redis of millions of keys takes more than 10 s to load


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="database size in GiB (default 1)")
    parser.add_argument("--sizes", type=_floats, help="a scaling series instead, e.g. 0.25,1,4")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of a and b, alternating (default 2)")
    parser.add_argument(
        "--algorithm",
        type=_algorithms,
        default=["gzip"],
        help="COMPRESSION_ALGORITHM: gzip, zstd or gzip,zstd",
    )
    parser.add_argument("--reuse", action="store_true", help="reuse a data set of the same size, keep it")
    parser.add_argument("--skip-restore", action="store_true", help="time the backups only")
    parser.add_argument("--redis-keys", type=int, help="Redis keys (default 1M per GiB)")
    parser.add_argument("--log-mb", type=float, help="MiB of logs (default 256 per GiB)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds to wait for a backup")
    parser.add_argument("--data-dir", type=Path, default=Path("/var/tmp/vq-bench"), help="data sets' folder")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary working folder")
    parser.add_argument("--results", type=Path, default=BENCH / "results", help="folder for the JSON")
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or [args.size_gb]
    return args


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _algorithms(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or any(n not in ALGORITHMS for n in names):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(ALGORITHMS)} (comma-separated)")
    return list(dict.fromkeys(names))


def run_size(args: argparse.Namespace, pg: PgServer, size_gb: float) -> dict:
    """Prepare the data set of ``size_gb`` GiB, run every round on it; return its result."""
    data = dataset.prepare(
        pg, size_gb, args.data_dir / f"{size_gb:g}gb", args.redis_keys, args.log_mb, args.reuse
    )
    facts = data.describe()
    root = Path(tempfile.mkdtemp(prefix="vq-bench-", dir=args.workdir))
    try:
        with contextlib.ExitStack() as stack:
            bench = start_bench(stack, args, pg, data, root)
            refused = {a: why for a in args.algorithm if (why := algorithm_refusal(bench, a))}
            runs = run_rounds(bench, args, refused)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if not args.reuse:
            dataset.remove(pg, data)
    refused |= ignored_algorithms(runs)
    summary = summarize(
        r for r in runs if r.side.removeprefix("vq-restore-").removeprefix("vq-") not in refused
    )
    result = {
        "size_gb": size_gb,
        "rounds": args.rounds,
        "dataset": facts,
        "refused": refused,
        "summary": summary,
        "targets": targets(summary, args.algorithm, refused),
        "runs": [asdict(r) for r in runs],
    }
    print_size(result)
    return result


def ignored_algorithms(runs: list[Run]) -> dict[str, str]:
    """Return the algorithms a worker did not use although asked to (its manifest says another)."""
    ignored = {}
    for run in runs:
        asked, used = run.side.removeprefix("vq-"), run.details.get("compression")
        if run.side.startswith("vq-") and not run.side.startswith("vq-restore-") and used != asked:
            ignored[asked] = f"the worker stored {used} although COMPRESSION_ALGORITHM={asked}"
    return ignored


def start_bench(
    stack: contextlib.ExitStack, args: argparse.Namespace, pg: PgServer, data: dataset.DataSet, root: Path
) -> Bench:
    """Start the application Redis on a copy of the data set's RDB and a broker Redis."""
    rdb = root / "app-redis" / "dump.rdb"
    rdb.parent.mkdir(parents=True)
    shutil.copyfile(data.rdb, rdb)
    app = stack.enter_context(servers.start_redis(root / "app-redis", rdb_file=rdb))
    broker = stack.enter_context(servers.start_redis(root / "broker"))
    keys = app.client().dbsize()
    if keys != data.total_keys:
        raise RuntimeError(f"the application Redis loaded {keys} keys, the data set has {data.total_keys}")
    return Bench(args, pg, data, root, app, broker)


def run_rounds(bench: Bench, args: argparse.Namespace, refused: dict[str, str]) -> list[Run]:
    """Run every round: the floor, then a and b alternately (a first in odd rounds), then the
    restores in the same order. Return every run. An algorithm the worker refuses goes into
    ``refused`` and is not run again."""
    warm_up(bench)
    runs: list[Run] = []
    for number in range(1, args.rounds + 1):
        order = 1 if number % 2 else -1
        backups = [("script", ""), *(("vq", a) for a in args.algorithm)][::order]
        restores = [("manual-restore", ""), *(("vq-restore", a) for a in args.algorithm)][::order]
        for kind, algorithm in [("floor", ""), *backups, *([] if args.skip_restore else restores)]:
            if algorithm in refused:
                continue
            try:
                runs.append(measure_step(bench, number, kind, algorithm))
            except Refused as exc:
                refused[algorithm] = str(exc)
                continue
            finally:
                bench.broker.client().flushall()  # no task of a finished run is left for the next worker
            _say(runs[-1])
        for folder in bench.root.glob(f"*-r{number}"):
            shutil.rmtree(folder, ignore_errors=True)
    return runs


def measure_step(bench: Bench, number: int, kind: str, algorithm: str) -> Run:
    """Run one measurement of round ``number``; backups write into the round's folders, restores
    read from them."""
    script_out = bench.root / f"script-r{number}"
    storage = bench.root / f"storage-{algorithm}-r{number}"
    if kind == "floor":
        return measure_floor(bench, number)
    if kind == "script":
        return measure_script_backup(bench, number, script_out)
    if kind == "vq":
        return measure_vq_backup(bench, number, algorithm, storage)
    if kind == "manual-restore":
        return measure_manual_restore(bench, number, script_out)
    return measure_vq_restore(bench, number, algorithm, storage)


def warm_up(bench: Bench) -> None:
    """Read the database and the logs once, untimed, so that no side pays for a cold cache."""
    print("warm-up (not timed): pg_dump > /dev/null, the logs read once")
    env = {**bench.pg_env()}
    subprocess.run(["pg_dump", "--no-password"], env=env, stdout=subprocess.DEVNULL, check=True)
    for path in bench.data.logs.rglob("*"):
        with open(path, "rb") as source:
            while source.read(1 << 20):
                pass


def _say(run: Run) -> None:
    stored = "" if run.stored_bytes is None else f", stored {run.stored_bytes / (1 << 20):.1f} MiB"
    print(
        f"  round {run.round} {run.side:<18} wall {run.wall_seconds:7.1f} s, CPU {run.cpu_seconds:7.1f} s,"
        f" machine busy {run.machine_busy:4.0%}, written {run.written_bytes / (1 << 20):8.1f} MiB{stored}",
        flush=True,
    )


def write_result(document: dict, path: Path) -> Path:
    """Write the result as JSON to ``path``; return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def inherited_settings() -> dict[str, str]:
    """Return the compression and backup settings the worker inherits from this environment (the
    defaults apply to the others); secrets are never among them."""
    secret = ("PASSWORD", "SECRET", "KEY", "TOKEN", "CONNECTION_STRING", "URL")
    return {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith(("COMPRESSION_", "BACKUP_")) and not any(word in k for word in secret)
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pg = PgServer(args.pg_host, args.pg_port, args.pg_user)
    started = datetime.now(UTC)
    with pg.connect() as conn:
        server_version = conn.execute("SHOW server_version").fetchone()[0]
    path = args.results / f"bench-{started:%Y%m%dT%H%M%SZ}.json"
    document = {
        "measured_at": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_facts(server_version),
        "code": code_state(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "worker": {"pool": "prefork", "concurrency": 2, "inherited_settings": inherited_settings()},
        "sizes": [],
        "scaling": None,
    }
    for size in args.sizes:  # written after each size: a long series keeps what it measured
        document["sizes"].append(run_size(args, pg, size))
        write_result(document, path)
    if len(document["sizes"]) > 1:
        document["scaling"] = scaling(document["sizes"])
        print_scaling(document["scaling"])
    if code_state()["vq_tasks_sha256"] != document["code"]["vq_tasks_sha256"]:
        document["code"]["note"] = (
            "vq_tasks changed on disk during the run: each worker ran the code of its start"
        )
    print(f"\nwritten to {write_result(document, path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
