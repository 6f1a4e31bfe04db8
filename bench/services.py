"""What the benchmarks run against: a real Celery worker with its settings in the environment, and
the facts that go with a result (machine, versions, code).

The worker is ``python -m celery -A vq_tasks worker --pool=prefork --concurrency=2``, started in a
session of its own so that stopping it stops its pool children too. Settings reach it only through
the environment, as in production; a password would too (never argv).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
ALLOCATOR_ENV = ("MALLOC_", "GLIBC_TUNABLES", "PYTHONMALLOC")


def worker_env(
    pg_host: str,
    pg_port: int,
    pg_user: str,
    db_name: str,
    redis_port: int,
    broker_port: int,
    folders: dict[str, Path],
) -> dict[str, str]:
    """Return the environment of the worker and the CLI: settings for a benchmark's services, with
    local storage and staging in ``folders``."""
    env = {
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{broker_port}/0",
        "DB_HOST": pg_host,
        "DB_PORT": str(pg_port),
        "DB_USER": pg_user,
        "DB_NAME": db_name,
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(redis_port),
        "BACKUP_STORAGE_PROVIDER": "Local",
        "BACKUP_STORAGE_PATH": str(folders["storage"]),
        "BACKUP_STAGING_DIR": str(folders["staging"]),
        "BACKUP_CONFIG_PATHS": str(folders["config"]),
        "BACKUP_LOG_PATHS": str(folders["logs"]),
        "COMPRESSION_ENABLED": "true",
        "BACKUP_RETRY_MAX": "0",
        "PYTHONUNBUFFERED": "1",
    }
    if "audit" in folders:
        env["BACKUP_AUDIT_LOG"] = str(folders["audit"])
    return env


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start one prefork worker of concurrency 2 in its own session, its output in ``log``."""
    command = [sys.executable, "-m", "celery", "-A", "vq_tasks", "worker", "--pool=prefork"]
    command += ["--concurrency=2", "--loglevel=WARNING", "--hostname=bench@%h"]
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_for_worker(worker: subprocess.Popen[bytes], broker_url: str, log: Path) -> None:
    """Return once the worker answers a ping. Raise RuntimeError, with its log, if it does not."""
    from celery import Celery

    control = Celery(broker=broker_url).control
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.returncode}:\n{log.read_text(errors='replace')}")
        if control.ping(timeout=1.0):
            return
    raise RuntimeError(f"worker did not answer within {READY_TIMEOUT:.0f} s:\n{log.read_text()}")


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Stop the worker's whole session with SIGTERM, then SIGKILL if it lingers."""
    if worker.poll() is not None:
        return
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def read_manifest(storage: Path) -> dict:
    """Return the one manifest written in ``storage``. Raise RuntimeError if there is none."""
    found = sorted(storage.glob("*_manifest.json"))
    if len(found) != 1:
        raise RuntimeError(f"expected one manifest in {storage}, found {[p.name for p in found]}")
    return json.loads(found[0].read_text())


def machine_facts(pg_version: str) -> dict[str, str | int]:
    """Return what the numbers depend on: CPUs, memory, versions, allocator settings inherited by
    the worker (glibc's malloc tunables change its RSS by several MiB)."""
    pg_dump = subprocess.run(["pg_dump", "--version"], capture_output=True, text=True).stdout.strip()
    redis_server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return {
        "nproc": os.cpu_count() or 0,
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgresql_server": pg_version,
        "pg_dump": pg_dump,
        "redis_server": redis_server.split()[2] if redis_server else "?",
        "allocator_env": " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith(ALLOCATOR_ENV)),
    }


def code_state() -> dict[str, str | list[str]]:
    """Return what code the worker ran: the commit, files changed since it, a digest of vq_tasks."""
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    status = subprocess.run(
        [*git, "status", "--porcelain", "vq_tasks"], capture_output=True, text=True
    ).stdout
    digest = hashlib.sha256()
    for path in sorted((REPO / "vq_tasks").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "commit": commit.strip(),
        "modified": [line[3:] for line in status.splitlines()],
        "vq_tasks_sha256": digest.hexdigest()[:16],
    }
