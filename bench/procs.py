"""Measuring processes: peak RSS of every process of a tree (sampled, and the kernel's VmHWM), their
CPU time and the bytes they wrote, and running a command to its end with its resource usage.

Totals are exact where the kernel keeps them: ``run_waited`` reaps the command with ``os.wait4``,
whose resource usage covers the command and every descendant it waited for (a script's pg_dump,
tar and gzip), and ``Sampler.totals`` reads, for the processes still alive at the end (a worker's
main process and pool children), their own CPU time plus that of the children they reaped (pg_dump)
since ``begin``. Per process, the peak RSS is VmHWM read at the end when the process is still alive,
else the largest VmHWM read while sampling (every ``interval`` seconds).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

MIB = 1 << 20
BLOCK = 512  # ru_oublock counts 512-byte blocks


@dataclass
class Track:
    """One process seen in a sampled tree: its largest RSS, its VmHWM, its own CPU time."""

    pid: int
    role: str
    command: str
    idle_rss: int | None = None
    peak_rss: int = 0  # largest RSS sampled
    peak_at_s: float = 0.0
    hwm_seen: int = 0  # largest VmHWM read while sampling
    vm_hwm: int | None = None  # VmHWM read at the end (None: it had exited)
    cpu_seconds: float = 0.0  # own user + system time at the last reading
    note: str = ""
    seen_doing: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """The best peak RSS known: VmHWM at the end if alive then, else the sampled VmHWM or RSS."""
        return self.vm_hwm if self.vm_hwm is not None else max(self.hwm_seen, self.peak_rss)

    @property
    def peak_source(self) -> str:
        return "VmHWM" if self.vm_hwm is not None else "sampled"


@dataclass
class Totals:
    """CPU seconds and bytes written by a group of processes during a measurement."""

    cpu_seconds: float = 0.0
    written_bytes: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(self.cpu_seconds + other.cpu_seconds, self.written_bytes + other.written_bytes)


@dataclass
class Sampler:
    """Samples the processes under ``roots`` (and the roots) every ``interval`` seconds; keeps the
    peak of each. ``worker`` names processes as a Celery worker's (worker main, pool child N,
    pg_dump); otherwise each is named by its program (bash, tar, gzip)."""

    roots: list[psutil.Process]
    worker: bool = False
    folders: dict[str, Path] = field(default_factory=dict)
    root_roles: dict[int, str] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)
    tracks: dict[int, Track] = field(default_factory=dict)
    procs: dict[int, psutil.Process] = field(default_factory=dict)
    baseline: dict[int, tuple[float, int]] = field(default_factory=dict)
    peak_total: int = 0
    timeline: list[dict[str, float]] = field(default_factory=list)

    def add_root(self, proc: psutil.Process, role: str | None = None) -> None:
        """Sample ``proc`` and its descendants too, naming it ``role``."""
        self.roots.append(proc)
        if role:
            self.root_roles[proc.pid] = role

    def begin(self) -> None:
        """Start the measurement now: CPU and bytes written so far by live processes do not count."""
        self.t0 = time.monotonic()
        for proc in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                self.baseline[proc.pid] = (cpu_with_children(proc), write_bytes(proc))
        self.sample()

    def sample(self) -> None:
        """Read the RSS, VmHWM and CPU time of every process in the tree now."""
        now = round(time.monotonic() - self.t0, 2)
        point: dict[str, float] = {"t": now}
        for proc in self._tree():
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            track = self.tracks.get(proc.pid) or self._track(proc)
            if rss > track.peak_rss:
                track.peak_rss, track.peak_at_s = rss, now
            track.hwm_seen = max(track.hwm_seen, vm_hwm(proc.pid) or 0)
            track.cpu_seconds = times.user + times.system
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
        """Read VmHWM of every tracked process still alive (None for the others)."""
        for track in self.tracks.values():
            track.vm_hwm = vm_hwm(track.pid) if self._alive(track.pid) else None

    def totals(self) -> Totals:
        """Return the CPU time and bytes written since ``begin`` by the processes alive now, their
        reaped children's CPU time included. Processes that exited count through their parent (the
        CPU of a reaped child) or, for a root, through ``run_waited``."""
        total = Totals()
        for pid, proc in self.procs.items():
            if not self._alive(pid):
                continue
            try:
                cpu, written = cpu_with_children(proc), write_bytes(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            cpu0, written0 = self.baseline.get(pid, (0.0, 0))
            total += Totals(cpu - cpu0, written - written0)
        return total

    @contextlib.contextmanager
    def running(self, interval: float) -> Iterator[Sampler]:
        """Sample in a background thread every ``interval`` seconds for the block; sample once more
        and read VmHWM at its end."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                self.sample()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.sample()
            self.read_hwm()

    def _alive(self, pid: int) -> bool:
        proc = self.procs.get(pid)
        try:
            return proc is not None and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

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
        found: list[psutil.Process] = []
        for root in self.roots:
            self.procs.setdefault(root.pid, root)
            try:
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            found.append(self.procs[root.pid])
            for child in children:
                found.append(self.procs.setdefault(child.pid, child))
        return found

    def _track(self, proc: psutil.Process) -> Track:
        self.procs.setdefault(proc.pid, proc)
        try:
            name, parent, command = proc.name(), proc.ppid(), " ".join(proc.cmdline()[:3])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            name, parent, command = "?", 0, "?"
        track = Track(proc.pid, self._role(proc.pid, name, parent), command)
        if track.role == "pg_dump" and parent in self.tracks and self.worker:
            self.tracks[parent].note = "ran dump_database (pg_dump's parent)"
        self.tracks[proc.pid] = track
        return track

    def _role(self, pid: int, name: str, parent: int) -> str:
        if pid in self.root_roles:
            return self.root_roles[pid]
        if not self.worker:
            return name
        if pid == self.roots[0].pid:
            return "worker main"
        if name == "pg_dump":
            taken = sum(1 for t in self.tracks.values() if t.role.startswith("pg_dump"))
            return "pg_dump" if not taken else f"pg_dump {taken + 1}"
        if parent == self.roots[0].pid:
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


def cpu_with_children(proc: psutil.Process) -> float:
    """Return the user + system CPU seconds of ``proc`` and of the children it has reaped."""
    times = proc.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def write_bytes(proc: psutil.Process) -> int:
    """Return the bytes ``proc`` has caused to be written to storage (/proc/<pid>/io)."""
    return proc.io_counters().write_bytes


@dataclass
class Waited:
    """How a command run to its end went: exit code, wall time, and the resource usage of it and
    every descendant it waited for."""

    returncode: int
    wall_seconds: float
    cpu_seconds: float
    written_bytes: int
    max_rss: int  # the largest single process of the tree (ru_maxrss)
    machine_busy: float  # share of all CPUs busy meanwhile, whoever used them (0 to 1)

    @property
    def totals(self) -> Totals:
        return Totals(self.cpu_seconds, self.written_bytes)


def run_waited(
    command: list[str],
    env: Mapping[str, str],
    sampler: Sampler,
    interval: float,
    output: Path,
    cwd: Path | None = None,
    role: str | None = None,
    stdout: int | None = None,
) -> Waited:
    """Run ``command`` with ``env`` (added to this process's environment), its output appended to
    ``output`` (stdout to ``stdout`` if given, such as DEVNULL; each line of stderr after the
    seconds since the start, "[   12.34] "), while ``sampler`` samples it; reap it with
    ``os.wait4`` and return its wall time and resource usage."""
    with open(output, "ab") as log:
        busy = busy_cpu_seconds()
        started = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=log if stdout is None else stdout,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        stamper = threading.Thread(target=_stamp_lines, args=(process.stderr, log, started), daemon=True)
        stamper.start()
        with contextlib.suppress(psutil.NoSuchProcess):
            sampler.add_root(psutil.Process(process.pid), role)
        with sampler.running(interval):
            _, status, usage = os.wait4(process.pid, 0)
            wall = time.monotonic() - started
            busy = busy_cpu_seconds() - busy
        stamper.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    return Waited(
        returncode=process.returncode,
        wall_seconds=wall,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        written_bytes=usage.ru_oublock * BLOCK,
        max_rss=usage.ru_maxrss * 1024,
        machine_busy=busy / (wall * (os.cpu_count() or 1)),
    )


def busy_cpu_seconds() -> float:
    """Return the CPU seconds all CPUs of the machine have spent busy since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def _stamp_lines(source: IO[bytes], log: IO[bytes], started: float) -> None:
    """Copy each line of ``source`` to ``log`` after the seconds since ``started``, until its end."""
    for line in source:
        log.write(f"[{time.monotonic() - started:8.2f}] ".encode() + line)
        log.flush()
    source.close()


def stamped_lines(output: Path) -> list[tuple[float, str]]:
    """Return the (seconds, text) of each stderr line run_waited wrote into ``output``."""
    found = []
    for line in output.read_text(errors="replace").splitlines():
        if line.startswith("[") and "] " in line:
            stamp, text = line[1:].split("] ", 1)
            with contextlib.suppress(ValueError):
                found.append((float(stamp), text))
    return found


def files_size(folder: Path) -> int:
    """Return the bytes of every regular file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
