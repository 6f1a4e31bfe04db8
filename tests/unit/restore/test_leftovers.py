"""leftovers: work folders of killed processes are found by their free lock and removed, those of
living ones never; a child started with die_with_parent goes when its parent is SIGKILLed. Real
processes, real flock, real SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from vq_tasks.restore.leftovers import CLAIM_GRACE, CLAIMING, _lock, owned_folder, remove_abandoned

HOLDER = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path
    from vq_tasks.restore.leftovers import die_with_parent, owned_folder
    with owned_folder(Path(sys.argv[1]), ".restore-") as folder:
        (folder / "database.sql").write_text("data")
        child = subprocess.Popen(["sleep", "300"], preexec_fn=die_with_parent())
        print(folder, child.pid, flush=True)
        time.sleep(300)
    """
)


def start_holder(parent: Path) -> tuple[subprocess.Popen, Path, int]:
    """Start a process that holds an owned folder under ``parent`` and a child; return the
    process, its folder and its child's pid."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(parent)], stdout=subprocess.PIPE, text=True)
    folder, child = process.stdout.readline().split()
    return process, Path(folder), int(child)


def gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_living_owners_folder_stays_and_a_killed_ones_goes_with_its_child(tmp_path: Path):
    process, folder, child = start_holder(tmp_path)
    try:
        assert folder.parent == tmp_path and folder.name.startswith(".restore-")
        assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
        assert remove_abandoned(tmp_path, ".restore-") == [] and folder.exists()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert gone(child), "the child outlived its SIGKILLed parent"
        assert remove_abandoned(tmp_path, ".restore-") == [folder.name]
        assert not folder.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_new_folder_removes_the_abandoned_ones_of_its_prefix_only(tmp_path: Path):
    abandoned = tmp_path / ".restore-old"  # of a version without locks, or a killed owner
    abandoned.mkdir()
    (abandoned / "redis.rdb").write_bytes(b"x")
    other = tmp_path / ".drill-old"
    other.mkdir()
    linked = tmp_path / ".restore-link"
    linked.symlink_to(other)
    with owned_folder(tmp_path, ".restore-") as folder:
        assert folder.is_dir() and not abandoned.exists()
        assert other.is_dir() and linked.is_symlink(), "only folders of the prefix, never through a link"
        inner = remove_abandoned(tmp_path, ".restore-")
        assert inner == [] and folder.exists(), "its own folder is held"
    assert not folder.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".drill-old", ".restore-link"]


def test_a_claiming_folder_goes_once_it_is_old_empty_and_unlocked(tmp_path: Path):
    """A process killed between creating its claiming folder and locking it leaves it empty."""
    old = time.time() - CLAIM_GRACE - 5

    def claiming(name: str, age: float | None = old) -> Path:
        folder = tmp_path / f"{CLAIMING}.restore-{name}"
        folder.mkdir()
        if age is not None:
            os.utime(folder, (age, age))
        return folder

    abandoned, fresh, held, full = claiming("a"), claiming("b", None), claiming("c"), claiming("d")
    (full / "x").write_bytes(b"x")
    os.utime(full, (old, old))
    other = tmp_path / f"{CLAIMING}.drill-e"
    other.mkdir()
    os.utime(other, (old, old))
    lock = _lock(held, blocking=True)  # its owner is locking it right now
    try:
        assert remove_abandoned(tmp_path, ".restore-") == [abandoned.name]
    finally:
        os.close(lock)
    assert not abandoned.exists()
    assert fresh.is_dir() and held.is_dir() and full.is_dir() and other.is_dir()
