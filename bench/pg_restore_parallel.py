"""Our database restore side by side with ``psql -f`` and ``pg_restore -j N``, on the same data set.

    python bench/pg_restore_parallel.py                           # 1 GiB, 2 rounds, -j 1, 2 and 4
    python bench/pg_restore_parallel.py --size-gb 0.25 --rounds 1 --reuse   # a quick run, data set kept
    python bench/pg_restore_parallel.py --jobs 2 --reuse           # only -j 2 (and our default jobs)

It builds (or with --reuse, reuses) the data set of bench/dataset.py (the same as bench/run.py's:
its database ``vq_bench_<size>`` is what is restored), checks that database's rows per table
(vq_tasks.restore.postgres.database_row_counts), and dumps it twice, untimed: in plain format as
the product does (``pg_dump --format=plain --no-password``, vq_tasks/sources/postgres.py) and with
``pg_dump -Fc``. Then in each round, alternating the order (the list below, then reversed), it
times, each into a fresh database ``<source>_pgr`` dropped afterwards:

- ``psql``: ``createdb --template=template0`` then ``psql -X -q -v ON_ERROR_STOP=1
  --single-transaction -f dump.sql`` (what bench/manual_restore.sh does);
- ``pg_restore-jN``: ``createdb --template=template0`` then ``pg_restore -j N -d <db> dump.custom``
  for every N of --jobs;
- ``ours-jN``: ``restore_database(settings, dump.sql, rows per table, target_db=<db>, swap=False)``
  with BACKUP_RESTORE_JOBS=N, in a child Python process of its own (settings from its environment,
  as a worker's): it creates the database from template0, loads it and checks its rows per table.
  The wall time is the child's, Python's start-up and imports included (shown apart).

For each it reports the median wall time, the CPU time of the command and everything it waited for
(psql, pg_restore's workers, our child and its psql sessions), the CPU time of PostgreSQL's server
meanwhile (every process of the postmaster: backends, parallel and autovacuum workers, WAL writer,
checkpointer; other sessions' work on the same server included), the share of the machine's CPUs
busy, the peak RSS (ours: the restoring process's own VmHWM; the others: the largest process of the
tree), the ratio ours / pg_restore -j2 and PASS or FAIL of the target "ours, at the default jobs of
this machine, <= 1.0 x pg_restore -j2", and where our time goes (DatabaseRestoreResult.phases when
the build has them; else the restore's log lines). The baselines' rows are checked after each run,
untimed. It prints tables and writes them with the runs, machine, commit and settings to
bench/results/pg-restore-parallel-<timestamp>.json. This is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import dataset  # noqa: E402
from bench_data import PgServer, drop_database  # noqa: E402
from measure import Run, processes_of, settle  # noqa: E402
from procs import Sampler, files_size, run_waited, stamped_lines  # noqa: E402
from services import code_state, machine_facts  # noqa: E402

MIB = 1 << 20
PG_RESTORE_REFERENCE = 2  # the target compares with pg_restore -j 2
OURS_VS_PG_RESTORE = 1.0
LOG_PHASES = (  # before the build reports phases: from its log lines (start, end; None: the end)
    ("before create", None, "creating database"),
    ("create", "creating database", "loading "),
    ("load + check", "loading ", "restored "),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size-gb", type=float, default=1.0, help="database size in GiB (default 1; 0.25 quick)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating the order (default 2)")
    parser.add_argument(
        "--jobs", type=_ints, default=[1, 2, 4], help="-j of pg_restore and ours (default 1,2,4)"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse a data set of the same size, keep it")
    parser.add_argument("--redis-keys", type=int, help="the data set's Redis keys (default 1M per GiB)")
    parser.add_argument("--log-mb", type=float, help="the data set's MiB of logs (default 256 per GiB)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples")
    parser.add_argument("--data-dir", type=Path, default=Path("/var/tmp/vq-bench"), help="data sets' folder")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary working folder (the dumps)")
    parser.add_argument("--results", type=Path, default=BENCH / "results", help="folder for the JSON")
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    return parser.parse_args(argv)


def _ints(text: str) -> list[int]:
    values = sorted({int(part) for part in text.split(",") if part.strip()})
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("positive integers, comma-separated, e.g. 1,2,4")
    return values


# --- the child: our restore, as a worker runs it ---------------------------------------------------

# Run by ``python -c`` in the repository, so that it imports vq_tasks and nothing of the bench:
# restore_database with the settings of its environment, then one JSON line on stdout with what it
# returned, how long the call took and the process's own peak RSS (VmHWM).
CHILD = """
import json, logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from vq_tasks.restore.postgres import restore_database
from vq_tasks.settings import load_settings

sql_path, expected_path, target = sys.argv[1:4]
settings = load_settings()
with open(expected_path) as source:
    expected = json.load(source)
started = time.monotonic()
result = restore_database(settings, sql_path, expected, target_db=target, swap=False)
restore_seconds = time.monotonic() - started
with open("/proc/self/status") as status:
    hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({
    "restore_seconds": round(restore_seconds, 3),
    "duration_seconds": result.duration_seconds,
    "restore_jobs_setting": settings.restore_jobs,
    "jobs": getattr(result, "jobs", None),
    "split_by_toc": getattr(result, "split_by_toc", None),
    "phases": getattr(result, "phases", None),
    "rows": sum(result.row_counts.values()),
    "tables": len(result.row_counts),
    "warnings": result.warnings,
    "vm_hwm_bytes": hwm,
}), flush=True)
"""


# --- the server's CPU ------------------------------------------------------------------------------


class ServerCpu:
    """CPU seconds of PostgreSQL's server between ``begin`` and ``end``: the postmaster's own, that
    of its children alive at either end (backends, WAL writer, checkpointer...) and that of the
    children it reaped meanwhile (a backend's whole life: what it had at ``begin`` is taken off).
    None when the server is not a process of this machine that psutil can read."""

    def __init__(self, pg: PgServer):
        self.postmaster: psutil.Process | None = None
        self.start: tuple[float, dict[int, float]] | None = None
        try:
            with pg.connect() as conn:
                backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                self.postmaster = psutil.Process(psutil.Process(backend).ppid())
        except (psutil.Error, OSError):
            self.postmaster = None

    def _read(self) -> tuple[float, dict[int, float]]:
        assert self.postmaster is not None
        t = self.postmaster.cpu_times()
        own: dict[int, float] = {}
        for proc in self.postmaster.children():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                times = proc.cpu_times()
                own[proc.pid] = times.user + times.system
        return t.user + t.system + t.children_user + t.children_system, own

    def begin(self) -> None:
        self.start = None
        with contextlib.suppress(psutil.Error, AssertionError):
            self.start = self._read()

    def end(self) -> float | None:
        if self.start is None:
            return None
        time.sleep(0.2)  # the postmaster reaps the backends of the sessions that just closed
        try:
            total1, own1 = self._read()
        except psutil.Error:
            return None
        total0, own0 = self.start
        cpu = total1 - total0 + sum(c - own0.get(pid, 0.0) for pid, c in own1.items())
        cpu -= sum(c for pid, c in own0.items() if pid not in own1)
        return round(cpu, 2)


# --- the measurements ------------------------------------------------------------------------------


class Bench:
    """What every measurement of one data set shares."""

    def __init__(self, args: argparse.Namespace, pg: PgServer, data: dataset.DataSet, root: Path):
        self.args, self.pg, self.data, self.root = args, pg, data, root
        self.source = data.database.name
        self.target = f"{self.source}_pgr"
        self.plain = root / "dump.sql"
        self.custom = root / "dump.custom"
        self.expected_file = root / "expected.json"
        self.expected: dict[str, int] = {}
        self.server = ServerCpu(pg)

    def pg_env(self, database: str = "postgres") -> dict[str, str]:
        env = {"PGHOST": self.pg.host, "PGPORT": str(self.pg.port), "PGUSER": self.pg.user}
        return {**env, "PGDATABASE": database}

    def vq_env(self, jobs: int) -> dict[str, str]:
        """Our settings, as a worker gets them: the source as DB_NAME, BACKUP_RESTORE_JOBS=jobs."""
        return {
            "DB_HOST": self.pg.host,
            "DB_PORT": str(self.pg.port),
            "DB_USER": self.pg.user,
            "DB_NAME": self.source,
            "BACKUP_STORAGE_PROVIDER": "Local",
            "BACKUP_STORAGE_PATH": str(self.root / "storage"),
            "BACKUP_STAGING_DIR": str(self.root / "staging"),
            "BACKUP_AUDIT_LOG": str(self.root / "audit.jsonl"),
            "BACKUP_RESTORE_JOBS": str(jobs),
            "PYTHONUNBUFFERED": "1",
        }

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"


def prepare_dumps(bench: Bench) -> dict:
    """Count the source's rows per table and dump it in plain and custom format (untimed for the
    comparison, but recorded); return the facts."""
    from vq_tasks.restore.postgres import database_row_counts
    from vq_tasks.settings import load_settings

    settings = load_settings(db_host=bench.pg.host, db_port=bench.pg.port, db_user=bench.pg.user)
    bench.expected = database_row_counts(settings, bench.source)
    bench.expected_file.write_text(json.dumps(bench.expected, indent=2) + "\n")
    default_jobs = load_settings(backup_restore_jobs=None).restore_jobs  # BACKUP_RESTORE_JOBS unset
    facts: dict = {"rows": bench.expected, "default_restore_jobs": default_jobs}
    dumps = {
        "plain": (["pg_dump", "--format=plain", "--no-password", "--dbname", bench.source], bench.plain),
        "custom": (["pg_dump", "-Fc", "--no-password", "--dbname", bench.source], bench.custom),
    }
    for name, (command, path) in dumps.items():
        started = time.monotonic()
        env = {**os.environ, **bench.pg_env(bench.source)}
        subprocess.run([*command, "--file", str(path)], env=env, check=True)
        took = time.monotonic() - started
        facts[name] = {"command": " ".join(command), "bytes": path.stat().st_size, "seconds": round(took, 2)}
        print(f"  pg_dump {name}: {path.stat().st_size / MIB:.1f} MiB in {took:.1f} s (not compared)")
    return facts


def measure_baseline(bench: Bench, number: int, side: str, jobs: int | None) -> Run:
    """Time createdb and then psql -f (``jobs`` None) or pg_restore -j ``jobs`` into the target."""
    if jobs is None:
        load = ["psql", "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1", "--single-transaction"]
        load += ["-d", bench.target, "-f", str(bench.plain)]
    else:
        load = ["pg_restore", "--no-password", "-j", str(jobs), "-d", bench.target, str(bench.custom)]
    script = 'createdb --no-password --template=template0 "$TARGET" && exec "$@"'
    command = ["bash", "-c", script, "bash", *load]
    env = {**bench.pg_env(), "TARGET": bench.target}
    run = _timed(bench, number, side, command, env, role=None)
    rows = check_rows(bench)
    run.details |= {"command": " ".join(load), "rows_checked": rows}
    return run


def measure_ours(bench: Bench, number: int, side: str, jobs: int) -> Run:
    """Time restore_database in a child process with BACKUP_RESTORE_JOBS=jobs."""
    command = [sys.executable, "-c", CHILD, str(bench.plain), str(bench.expected_file), bench.target]
    run = _timed(bench, number, side, command, bench.vq_env(jobs), role="our restore (child)")
    output = bench.log(f"{side}-r{number}")
    report = _last_json(output)
    run.details |= report
    if "restore_seconds" in report:  # the interpreter's start, imports, settings, the report
        run.details["outside_seconds"] = round(run.wall_seconds - report["restore_seconds"], 2)
    run.details["log_phases"] = log_phases(output, run.wall_seconds)
    if report.get("vm_hwm_bytes"):
        run.details["peak_rss_bytes"] = report["vm_hwm_bytes"]
    return run


def _timed(bench: Bench, number: int, side: str, command: list[str], env: dict, role: str | None) -> Run:
    """Run ``command`` to its end, into a fresh target (dropped first, if a run left it), measured:
    wall, CPU of it and what it waited for, the server's CPU meanwhile, peak RSS. The caller checks
    the rows; run_rounds drops the target."""
    drop_database(bench.pg, bench.target)
    settle(bench.pg)
    sampler = Sampler([])
    output = bench.log(f"{side}-r{number}")
    bench.server.begin()
    waited = run_waited(command, env, sampler, bench.args.interval, output, cwd=REPO, role=role)
    server_cpu = bench.server.end()
    if waited.returncode != 0:
        text = output.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{side} failed with exit code {waited.returncode}:\n{text}")
    processes = processes_of(sampler)
    return Run(
        side=side,
        round=number,
        wall_seconds=round(waited.wall_seconds, 2),
        cpu_seconds=round(waited.cpu_seconds, 2),
        written_bytes=waited.written_bytes,
        machine_busy=round(waited.machine_busy, 3),
        processes=processes,
        details={
            "server_cpu_seconds": server_cpu,
            "peak_rss_bytes": max((p["peak_bytes"] for p in processes), default=0),
        },
    )


def check_rows(bench: Bench) -> int:
    """Compare the target's rows per table with the source's (untimed); return the rows."""
    with bench.pg.connect(bench.target) as conn:
        rows = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in bench.expected}
    if rows != bench.expected:
        raise RuntimeError(f"restore into {bench.target} incomplete: rows {rows}, expected {bench.expected}")
    return sum(rows.values())


def _last_json(output: Path) -> dict:
    for line in reversed(output.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return {}


def log_phases(output: Path, wall: float) -> dict[str, float]:
    """Where the child's time went by its log lines (stamped on stderr): before creating the
    database (Python's start-up, the dump's checks), creating it, then loading and checking."""
    marks = stamped_lines(output)
    phases: dict[str, float] = {}
    for name, begins, ends in LOG_PHASES:
        start = 0.0 if begins is None else next((t for t, line in marks if line.startswith(begins)), None)
        end = wall if ends is None else next((t for t, line in marks if line.startswith(ends)), None)
        if start is not None and end is not None:
            phases[name] = round(end - start, 2)
    return phases


def sides(jobs: list[int], default_jobs: int) -> list[tuple[str, str, int | None]]:
    """Return (side, kind, jobs) in the order of an odd round: each -j of pg_restore next to ours."""
    found: list[tuple[str, str, int | None]] = [("psql", "psql", None)]
    for n in jobs:
        found.append((f"pg_restore-j{n}", "pg_restore", n))
        found.append((f"ours-j{n}", "ours", n))
    if default_jobs not in jobs:
        found.append((f"ours-j{default_jobs}", "ours", default_jobs))
    if PG_RESTORE_REFERENCE not in jobs:
        found.append((f"pg_restore-j{PG_RESTORE_REFERENCE}", "pg_restore", PG_RESTORE_REFERENCE))
    return found


def run_rounds(bench: Bench, order: list[tuple[str, str, int | None]]) -> list[Run]:
    runs: list[Run] = []
    for number in range(1, bench.args.rounds + 1):
        for side, kind, jobs in order if number % 2 else order[::-1]:
            try:
                if kind == "ours":
                    assert jobs is not None
                    runs.append(measure_ours(bench, number, side, jobs))
                else:
                    runs.append(measure_baseline(bench, number, side, jobs))
            finally:
                drop_database(bench.pg, bench.target)
            _say(runs[-1])
    return runs


def _say(run: Run) -> None:
    server = run.details.get("server_cpu_seconds")
    server_text = "-" if server is None else f"{server:6.1f}"
    print(
        f"  round {run.round} {run.side:<14} wall {run.wall_seconds:7.1f} s, CPU {run.cpu_seconds:6.1f} s,"
        f" server CPU {server_text} s, busy {run.machine_busy:4.0%},"
        f" peak RSS {run.details.get('peak_rss_bytes', 0) / MIB:6.1f} MiB",
        flush=True,
    )


# --- summary and report ----------------------------------------------------------------------------


def summarize(runs: list[Run]) -> dict[str, dict]:
    """Return, per side, the medians over its rounds (peak RSS: the largest)."""
    by_side: dict[str, list[Run]] = {}
    for run in runs:
        by_side.setdefault(run.side, []).append(run)
    summary = {}
    for side, group in by_side.items():
        walls = [r.wall_seconds for r in group]
        servers = [
            r.details["server_cpu_seconds"] for r in group if r.details.get("server_cpu_seconds") is not None
        ]
        entry = {
            "rounds": len(group),
            "wall_seconds": round(statistics.median(walls), 2),
            "wall_range": [min(walls), max(walls)],
            "cpu_seconds": round(statistics.median(r.cpu_seconds for r in group), 2),
            "server_cpu_seconds": round(statistics.median(servers), 2) if servers else None,
            "machine_busy": round(statistics.median(r.machine_busy for r in group), 3),
            "peak_rss_bytes": max(r.details.get("peak_rss_bytes") or 0 for r in group),
        }
        if side.startswith("ours-"):
            entry |= _ours_summary(group)
        summary[side] = entry
    return summary


def _ours_summary(group: list[Run]) -> dict:
    def median_of(key: str, source: str | None = None) -> dict[str, float]:
        found: dict[str, list[float]] = {}
        for run in group:
            values = run.details.get(source or key) or {}
            for name, seconds in values.items():
                found.setdefault(name, []).append(seconds)
        return {name: round(statistics.median(v), 2) for name, v in found.items()}

    details = [r.details for r in group]
    return {
        "jobs_reported": sorted({d.get("jobs") for d in details}, key=str),
        "split_by_toc": sorted({d.get("split_by_toc") for d in details}, key=str),
        "outside_seconds": round(statistics.median(d.get("outside_seconds") or 0.0 for d in details), 2),
        "restore_seconds": round(statistics.median(d.get("restore_seconds") or 0.0 for d in details), 2),
        "phases": median_of("phases"),
        "log_phases": median_of("log_phases"),
    }


def targets(summary: dict[str, dict], default_jobs: int) -> list[dict]:
    """Return the target: ours at the default jobs <= 1.0 x pg_restore -j2 (wall, medians)."""
    ours, theirs = f"ours-j{default_jobs}", f"pg_restore-j{PG_RESTORE_REFERENCE}"
    name = (
        f"database restore, ours (default jobs here: {default_jobs}) <= {OURS_VS_PG_RESTORE:g} x "
        f"pg_restore -j{PG_RESTORE_REFERENCE}"
    )
    if ours not in summary or theirs not in summary:
        return [{"target": name, "status": "n/a", "value": None, "detail": "not measured"}]
    a, b = summary[theirs]["wall_seconds"], summary[ours]["wall_seconds"]
    ratio = b / a
    inner = summary[ours].get("restore_seconds") or b
    return [
        {
            "target": name,
            "status": "PASS" if ratio <= OURS_VS_PG_RESTORE else "FAIL",
            "value": round(ratio, 3),
            "detail": f"{b:.1f} s / {a:.1f} s = {ratio:.2f} (limit {OURS_VS_PG_RESTORE:g}); the call to"
            f" restore_database alone (no Python start-up): {inner:.1f} s = {inner / a:.2f}",
        }
    ]


def label(side: str) -> str:
    if side == "psql":
        return "psql -f (one transaction)"
    kind, jobs = side.rsplit("-j", 1)
    return f"pg_restore -j {jobs}" if kind == "pg_restore" else f"ours, BACKUP_RESTORE_JOBS={jobs}"


def print_result(result: dict) -> None:
    summary, dumps, db = result["summary"], result["dumps"], result["dataset"]["database"]
    print(
        f"\n=== {result['size_gb']:g} GiB: database {db['name']} {db['size_bytes'] / MIB:.0f} MiB, "
        f"{sum(dumps['rows'].values()):,} rows; plain dump {dumps['plain']['bytes'] / MIB:.0f} MiB, "
        f"custom {dumps['custom']['bytes'] / MIB:.0f} MiB; medians of {result['rounds']} round(s) ==="
    )
    reference = summary.get(f"pg_restore-j{PG_RESTORE_REFERENCE}")
    header = (
        f"{'wall s':>8} {'(range)':>13} {'CPU s':>7} {'server CPU s':>13} {'busy':>5} {'peak RSS MiB':>13}"
    )
    print(f"\n{'DATABASE RESTORE':<34}{header} {'/ pg_restore -j2':>17}")
    for side in sorted(summary, key=_order):
        s = summary[side]
        low, high = s["wall_range"]
        server = "-" if s["server_cpu_seconds"] is None else f"{s['server_cpu_seconds']:.1f}"
        ratio = f"{s['wall_seconds'] / reference['wall_seconds']:.2f}" if reference else "-"
        print(
            f"{label(side):<34}{s['wall_seconds']:>8.1f} {f'({low:.1f}-{high:.1f})':>13}"
            f" {s['cpu_seconds']:>7.1f} {server:>13} {s['machine_busy']:>5.0%}"
            f" {s['peak_rss_bytes'] / MIB:>13.1f} {ratio:>17}"
        )
    print(
        "(wall: createdb and the load; ours: the child process, Python's start-up included, and its row"
        "\n check. CPU: the command and what it waited for. server CPU: PostgreSQL's processes meanwhile."
        "\n busy: all the machine's CPUs meanwhile. peak RSS: ours, the restoring process (VmHWM); the"
        "\n others, the largest process of the tree)"
    )
    _print_ours(summary)
    print("\nTARGET")
    for row in result["targets"]:
        print(textwrap.fill(f"  {row['status']:<4}  {row['target']}: {row['detail']}", width=108))


def _order(side: str) -> tuple[int, int]:
    if side == "psql":
        return (0, 0)
    kind, jobs = side.rsplit("-j", 1)
    return (1 if kind == "pg_restore" else 2, int(jobs))


def _print_ours(summary: dict[str, dict]) -> None:
    print(
        "\nWHERE OUR TIME GOES (medians, s): the child's wall = outside (Python's start-up, imports,"
        " settings) + restore_database"
    )
    for side in sorted((s for s in summary if s.startswith("ours-")), key=_order):
        s = summary[side]
        phases = s["phases"] or s["log_phases"]
        source = "phases" if s["phases"] else "log lines (this build reports no phases)"
        parts = ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items())
        line = (
            f"{label(side)}: wall {s['wall_seconds']:.1f} = outside {s['outside_seconds']:.2f}"
            f" + restore_database {s['restore_seconds']:.2f}; jobs used {_listed(s['jobs_reported'])},"
            f" split by TOC {_listed(s['split_by_toc'])}; {source}: {parts}"
        )
        print(textwrap.fill(line, width=108, initial_indent="  ", subsequent_indent="      "))


def _listed(values: list) -> str:
    shown = ["n/a" if v is None else str(v) for v in values]
    return "/".join(shown) or "-"


# --- main ------------------------------------------------------------------------------------------


def write_result(document: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pg = PgServer(args.pg_host, args.pg_port, args.pg_user)
    started = datetime.now(UTC)
    with pg.connect() as conn:
        server_version = conn.execute("SHOW server_version").fetchone()[0]
    path = args.results / f"pg-restore-parallel-{started:%Y%m%dT%H%M%SZ}.json"
    code = code_state()
    data = dataset.prepare(
        pg, args.size_gb, args.data_dir / f"{args.size_gb:g}gb", args.redis_keys, args.log_mb, args.reuse
    )
    facts = data.describe()
    root = Path(tempfile.mkdtemp(prefix="vq-bench-pgr-", dir=args.workdir))
    try:
        bench = Bench(args, pg, data, root)
        dumps = prepare_dumps(bench)
        default_jobs = dumps["default_restore_jobs"]
        runs = run_rounds(bench, sides(args.jobs, default_jobs))
        dumps["work_folder_bytes"] = files_size(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        drop_database(pg, f"{data.database.name}_pgr")
        if not args.reuse:
            dataset.remove(pg, data)
    summary = summarize(runs)
    result = {
        "measured_at": started.isoformat(timespec="seconds"),
        "command": " ".join(
            ["python", "bench/pg_restore_parallel.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine_facts(server_version),
        "code": code,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if v is not None},
        "size_gb": args.size_gb,
        "rounds": args.rounds,
        "dataset": facts,
        "dumps": dumps,
        "summary": summary,
        "targets": targets(summary, default_jobs),
        "runs": [asdict(r) for r in runs],
    }
    if code_state()["vq_tasks_sha256"] != code["vq_tasks_sha256"]:
        result["code"]["note"] = (
            "vq_tasks changed on disk during the run: each child ran the code of its start"
        )
    print_result(result)
    print(f"\nwritten to {write_result(result, path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
