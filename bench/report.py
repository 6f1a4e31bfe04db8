"""Summaries, targets and tables of bench/run.py.

Each side's runs are summarized by their median (wall, CPU, bytes) and the largest peak RSS of each
process over the rounds. The targets are computed from those medians, never written in:

- backup wall time with gzip at most 0.5 x the hand-written script's;
- backup wall time with zstd at most 1.3 x bare ``pg_dump > /dev/null``;
- no process of the worker (main, pool children, the pg_dump they run) over 150 MiB peak RSS;
- restore wall time at most 0.6 x the hand-written restore's (database, Redis and config).
"""

from __future__ import annotations

import statistics
import textwrap
from collections import defaultdict
from collections.abc import Iterable

from measure import Run

MIB = 1 << 20
GZIP_VS_SCRIPT = 0.5
ZSTD_VS_FLOOR = 1.3
WORKER_RSS_LIMIT = 150 * MIB
RESTORE_VS_MANUAL = 0.6
LINEAR_R2 = 0.99  # the scaling series counts as linear at or above this R² of a straight-line fit
FLAT_GROWTH = 0.10  # and memory as flat if the largest size's peak is within this of the smallest's
CLI_ROLES = ("vq-backup run (CLI)", "vq-backup restore (CLI)")
LABELS = {
    "floor": "floor  pg_dump > /dev/null",
    "script": "a  manual_backup.sh",
    "manual-restore": "a  manual_restore.sh",
}


def label(side: str) -> str:
    """Return how a side is named in the tables."""
    if side in LABELS:
        return LABELS[side]
    if side.startswith("vq-restore-"):
        return f"b  vq-backup restore ({side.removeprefix('vq-restore-')})"
    return f"b  vq-backup run ({side.removeprefix('vq-')})"


def summarize(runs: Iterable[Run]) -> dict[str, dict]:
    """Return, per side, the medians over its rounds and each process's largest peak RSS."""
    by_side: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_side[run.side].append(run)
    return {side: _summary(group) for side, group in by_side.items()}


def _summary(runs: list[Run]) -> dict:
    walls = [r.wall_seconds for r in runs]
    stored = [r.stored_bytes for r in runs if r.stored_bytes is not None]
    processes: dict[str, dict] = {}
    for run in runs:
        counted: dict[str, int] = defaultdict(int)
        for proc in run.processes:
            counted[proc["role"]] += 1
            entry = processes.setdefault(proc["role"], {"peak_bytes": 0, "peak_source": "", "count": 0})
            if proc["peak_bytes"] > entry["peak_bytes"]:
                entry.update(peak_bytes=proc["peak_bytes"], peak_source=proc["peak_source"])
            notes = entry.setdefault("notes", [])
            notes += [n for n in proc["notes"] if n not in notes]
        for role, count in counted.items():
            processes[role]["count"] = max(processes[role]["count"], count)
    largest = max(processes.items(), key=lambda kv: kv[1]["peak_bytes"], default=("-", {"peak_bytes": 0}))
    return {
        "rounds": len(runs),
        "wall_seconds": round(statistics.median(walls), 2),
        "wall_range": [min(walls), max(walls)],
        "walls": walls,
        "cpu_seconds": round(statistics.median(r.cpu_seconds for r in runs), 2),
        "machine_busy": round(statistics.median(r.machine_busy for r in runs), 3),
        "written_bytes": int(statistics.median(r.written_bytes for r in runs)),
        "stored_bytes": int(statistics.median(stored)) if stored else None,
        "largest_process": {"role": largest[0], "peak_bytes": largest[1]["peak_bytes"]},
        "processes": processes,
        "details": [r.details for r in runs],
    }


def worker_peak(summary: dict[str, dict]) -> tuple[str, int] | None:
    """Return the worker process with the largest peak RSS over every VQ backup, and that peak."""
    peaks = [
        (f"{role} ({side})", entry["peak_bytes"])
        for side, s in summary.items()
        if side.startswith("vq-") and not side.startswith("vq-restore-")
        for role, entry in s["processes"].items()
        if role not in CLI_ROLES
    ]
    return max(peaks, key=lambda p: p[1]) if peaks else None


def targets(summary: dict[str, dict], algorithms: list[str], refused: dict[str, str]) -> list[dict]:
    """Return each target with its computed value, limit and PASS, FAIL or n/a."""
    rows = [
        _ratio_target("backup wall, gzip <= 0.5 x script", summary, "vq-gzip", "script", GZIP_VS_SCRIPT),
        _ratio_target("backup wall, zstd <= 1.3 x bare pg_dump", summary, "vq-zstd", "floor", ZSTD_VS_FLOOR),
    ]
    if rows[1]["status"] == "FAIL":
        rows[1]["detail"] += cpu_bound(summary["vq-zstd"], summary["floor"], ZSTD_VS_FLOOR)
    for row, algorithm in ((rows[0], "gzip"), (rows[1], "zstd")):
        if algorithm in refused:
            row.update(status="n/a", detail=f"not supported by this build: {refused[algorithm]}")
        elif algorithm not in algorithms:
            row.update(status="n/a", detail=f"not run (--algorithm {algorithm})")
    peak = worker_peak(summary)
    rows.append(
        {
            "target": "worker process peak RSS <= 150 MiB",
            "status": "n/a" if peak is None else ("PASS" if peak[1] <= WORKER_RSS_LIMIT else "FAIL"),
            "value": None if peak is None else peak[1],
            "detail": "no VQ backup ran" if peak is None else f"{peak[1] / MIB:.1f} MiB, {peak[0]}",
        }
    )
    for algorithm in algorithms:
        if algorithm not in refused:
            name = f"restore wall, {algorithm} backup <= {RESTORE_VS_MANUAL:g} x manual restore"
            side = f"vq-restore-{algorithm}"
            rows.append(_ratio_target(name, summary, side, "manual-restore", RESTORE_VS_MANUAL))
    return rows


def cpu_bound(run: dict, floor: dict, limit: float) -> str:
    """Say whether the machine's CPUs, fully used, could have done the run's work within the limit:
    the share of both CPUs it kept busy times its wall time is what the same work needs at least
    (an upper estimate when other work shared the machine)."""
    needed = run["machine_busy"] * run["wall_seconds"]
    allowed = limit * floor["wall_seconds"]
    verdict = "more than" if needed > allowed else "within"
    return (
        f"; the CPUs were {run['machine_busy']:.0%} busy: fully used they would still need"
        f" {needed:.1f} s, {verdict} the {allowed:.1f} s allowed"
    )


def _ratio_target(name: str, summary: dict[str, dict], b: str, a: str, limit: float) -> dict:
    if b not in summary or a not in summary:
        return {"target": name, "status": "n/a", "value": None, "detail": "not measured"}
    ratio = summary[b]["wall_seconds"] / summary[a]["wall_seconds"]
    return {
        "target": name,
        "status": "PASS" if ratio <= limit else "FAIL",
        "value": round(ratio, 3),
        "detail": f"{summary[b]['wall_seconds']:.1f} s / {summary[a]['wall_seconds']:.1f} s = {ratio:.2f}"
        f" (limit {limit:g})",
    }


def print_size(result: dict) -> None:
    """Print one data set's tables: backup, restore, peak RSS per process, time per task, targets."""
    data, summary = result["dataset"], result["summary"]
    db = data["database"]
    print(
        f"\n=== {result['size_gb']:g} GiB data set: database {db['name']} {db['size_bytes'] / MIB:.0f} MiB, "
        f"{sum(data['redis_keys'].values()):,} Redis keys (RDB {data['rdb_bytes'] / MIB:.0f} MiB), "
        f"{data['log_bytes'] / MIB:.0f} MiB of logs; medians of {result['rounds']} round(s) ==="
    )
    for side, reason in result["refused"].items():
        print(f"vq-backup with {side}: not supported by this build: {reason}")
    backup = [s for s in ("floor", "script") if s in summary] + _vq_sides(summary, "vq-")
    restore = [s for s in ("manual-restore",) if s in summary] + _vq_sides(summary, "vq-restore-")
    _print_sides("BACKUP", backup, summary, "script")
    _print_sides("RESTORE", restore, summary, "manual-restore")
    print(
        "(CPU: of the command, what it waited for and the worker; busy: of all the machine's CPUs meanwhile,"
        "\n PostgreSQL's server and other sessions' work included)"
    )
    _print_processes(backup + restore, summary)
    _print_where_time_goes(summary)
    print("\nTARGETS")
    for row in result["targets"]:
        line = f"  {row['status']:<4}  {row['target']:<51} {row['detail']}"
        print(textwrap.fill(line, width=108, subsequent_indent=" " * 59))


def _vq_sides(summary: dict[str, dict], prefix: str) -> list[str]:
    sides = [s for s in summary if s.startswith(prefix)]
    return [s for s in sides if prefix == "vq-restore-" or not s.startswith("vq-restore-")]


def _print_sides(title: str, sides: list[str], summary: dict[str, dict], baseline: str) -> None:
    header = f"{'wall s':>8} {'(range)':>13} {'CPU s':>8} {'busy':>5} {'written MiB':>12} {'stored MiB':>11}"
    print(f"\n{title:<34}{header}  largest process")
    for side in sides:
        s = summary[side]
        low, high = s["wall_range"]
        stored = "-" if s["stored_bytes"] is None else f"{s['stored_bytes'] / MIB:.1f}"
        largest = s["largest_process"]
        print(
            f"{label(side):<34}{s['wall_seconds']:>8.1f} {f'({low:.1f}-{high:.1f})':>13} "
            f"{s['cpu_seconds']:>8.1f} {s['machine_busy']:>5.0%} "
            f"{s['written_bytes'] / MIB:>12.1f} {stored:>11}  "
            f"{largest['role']} {largest['peak_bytes'] / MIB:.1f} MiB"
        )
    for side in sides:
        if side.startswith("vq-") and baseline in summary:
            _print_ratio(side, summary[side], summary[baseline])


def _print_ratio(side: str, b: dict, a: dict) -> None:
    def ratio(key: str) -> str:
        return f"{b[key] / a[key]:.2f}" if a.get(key) else "-"

    peak = b["largest_process"]["peak_bytes"] / max(1, a["largest_process"]["peak_bytes"])
    name = f"   b/a ({side.removeprefix('vq-')})"
    print(
        f"{name:<34}{ratio('wall_seconds'):>8} {'':>13} {ratio('cpu_seconds'):>8} {'':>5} "
        f"{ratio('written_bytes'):>12} {ratio('stored_bytes'):>11}  {peak:.2f}"
    )


def _print_processes(sides: list[str], summary: dict[str, dict]) -> None:
    print("\nPEAK RSS PER PROCESS, MiB (largest over the rounds; * = VmHWM of a process alive at the end,")
    print("otherwise the largest VmHWM sampled; xN = N such processes in one run)")
    for side in sides:
        procs = sorted(summary[side]["processes"].items(), key=lambda kv: -kv[1]["peak_bytes"])
        cells = []
        for role, entry in procs:
            mark = "*" if entry["peak_source"] == "VmHWM" else ""
            count = f" x{entry['count']}" if entry["count"] > 1 else ""
            notes = f" [{', '.join(entry.get('notes', []))}]" if entry.get("notes") else ""
            cells.append(f"{role}{count} {entry['peak_bytes'] / MIB:.1f}{mark}{notes}")
        print(f"  {label(side).split('  ', 1)[-1]}:")
        print(textwrap.fill("; ".join(cells), width=108, initial_indent=" " * 6, subsequent_indent=" " * 6))


def _print_where_time_goes(summary: dict[str, dict]) -> None:
    lines = []
    for side, s in summary.items():
        for number, (wall, details) in enumerate(zip(s["walls"], s["details"], strict=True), start=1):
            parts = details.get("components") or {}
            if not parts or details.get("duration_seconds") is None:
                continue
            took = ", ".join(
                f"{name} {_seconds(v.get('duration_seconds') if isinstance(v, dict) else v)}"
                for name, v in parts.items()
            )
            total = details["duration_seconds"]
            line = f"{side} round {number}: wall {wall:.1f}s, of which {total:.1f}s ({took})"
            lines.append(textwrap.fill(line, width=108, initial_indent="  ", subsequent_indent=" " * 6))
    if lines:
        print("\nWHERE THE TIME GOES: wall time, of which the scripts' steps (their step lines), the VQ")
        print("backup's duration and each dump task's (manifest; 2 at a time, then finalize), or the VQ")
        print("restore's duration (its report) and each phase (its progress lines)")
        print("\n".join(lines))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def scaling(results: list[dict]) -> dict:
    """Return, for each side measured at every size, its median wall time per size, a straight-line
    fit (seconds per GiB, intercept, R²) and whether it is linear; and the worker's peak RSS per
    size and whether it is flat."""
    sizes = [r["size_gb"] for r in results]
    sides = [s for s in results[0]["summary"] if all(s in r["summary"] for r in results)]
    series = {}
    for side in sides:
        walls = [r["summary"][side]["wall_seconds"] for r in results]
        series[side] = {"wall_seconds": walls, **_fit(sizes, walls)}
    peaks = [worker_peak(r["summary"]) for r in results]
    memory = [p[1] if p else None for p in peaks]
    flat = None
    if all(memory) and len(memory) > 1:
        flat = max(memory) <= min(memory) * (1 + FLAT_GROWTH)  # type: ignore[type-var, operator]
    return {"sizes_gb": sizes, "series": series, "worker_peak_bytes": memory, "memory_flat": flat}


def _fit(xs: list[float], ys: list[float]) -> dict:
    if len(set(xs)) < 2:
        return {}
    slope, intercept = statistics.linear_regression(xs, ys)
    mean = statistics.fmean(ys)
    total = sum((y - mean) ** 2 for y in ys)
    residual = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    r2 = 1 - residual / total if total else 1.0
    return {
        "seconds_per_gb": round(slope, 2),
        "intercept_seconds": round(intercept, 2),
        "r2": round(r2, 4),
        "linear": r2 >= LINEAR_R2 if len(xs) > 2 else None,
    }


def print_scaling(result: dict) -> None:
    """Print wall time against size for every side, its fit, and the worker's peak RSS per size."""
    sizes = result["sizes_gb"]
    print("\n=== SCALING: median wall seconds (seconds per GiB) ===")
    print(f"{'':<34}" + "".join(f"{f'{s:g} GiB':>17}" for s in sizes) + "   fit: s/GiB, intercept, R²")
    for side, row in result["series"].items():
        cells = "".join(
            f"{f'{w:.1f} ({w / s:.1f})':>17}" for w, s in zip(row["wall_seconds"], sizes, strict=True)
        )
        verdict = {True: "linear", False: "NOT linear", None: "(3+ sizes to judge)"}[row.get("linear")]
        fit = "-"
        if "r2" in row:
            fit = f"{row['seconds_per_gb']:.1f}, {row['intercept_seconds']:+.1f} s, {row['r2']:.3f} {verdict}"
        print(f"{label(side):<34}{cells}   {fit}")
    peaks = "".join(f"{'-' if p is None else f'{p / MIB:.1f} MiB':>17}" for p in result["worker_peak_bytes"])
    flat = {True: "PASS flat", False: "FAIL grows", None: "-"}[result["memory_flat"]]
    limit = f"(limit +{FLAT_GROWTH:.0%} over the smallest)"
    print(f"{'largest worker process peak RSS':<34}{peaks}   {flat} {limit}")
    print(f"(linear: R² >= {LINEAR_R2} of a straight-line fit through the sizes)")
