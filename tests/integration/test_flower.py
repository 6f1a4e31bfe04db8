"""Flower, started by compose/flower/start (what the compose service runs) against a real broker,
shows the tasks of a real backup through its API: the chord's tasks, succeeded, behind basic
authentication, with backup ids and part names as arguments and no secret anywhere."""

from __future__ import annotations

import ast
import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli
from tests.servers import free_port, stop_process

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "compose" / "flower" / "start"
SECRETS = ("db-secret-pw", "redis-secret-pw", "broker-secret-pw")
USER, PASSWORD = "ops", "flower-secret-pw"
CHORD = (
    "vq_tasks.backup",
    "vq_tasks.dump_database",
    "vq_tasks.dump_redis",
    "vq_tasks.archive_config",
    "vq_tasks.archive_logs",
    "vq_tasks.finalize_backup",
)
READY_TIMEOUT = 60


def get(port: int, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, str]:
    """GET a Flower page; return its status and body (an HTTP error's too)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def script_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of the start script: the settings, and the venv's celery on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **env, "PATH": path, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def flower(base_env, tmp_path) -> Iterator[tuple[int, subprocess.Popen, Path]]:
    """Flower on a free port, with basic auth read from a secret file, as in compose."""
    secret = tmp_path / "flower_basic_auth"
    secret.write_text(f"{USER}:{PASSWORD}\n")
    port = free_port()
    log = tmp_path / "flower.log"
    env = script_env(base_env, FLOWER_BASIC_AUTH_FILE=str(secret), FLOWER_PORT=str(port))
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["sh", str(START)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert process.poll() is None, f"flower exited:\n{log.read_text()}"
            try:
                if get(port, "/healthcheck", auth=None) == (200, "OK"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"flower not ready:\n{log.read_text()}"
            time.sleep(0.3)
        yield port, process, log
    finally:
        stop_process(process, timeout=15, group=True)


def tasks_by_name(port: int) -> dict[str, list[dict]]:
    status, body = get(port, "/api/tasks")
    assert status == 200, body
    found: dict[str, list[dict]] = {}
    for task_id, task in json.loads(body).items():
        found.setdefault(task.get("name") or "", []).append({**task, "uuid": task_id})
    return found


def wait_for_chord(port: int, timeout: float = 60) -> dict[str, list[dict]]:
    """Return Flower's tasks once every task of the chord is listed as succeeded."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = tasks_by_name(port)
        if all(any(t["state"] == "SUCCESS" for t in tasks.get(name, [])) for name in CHORD):
            return tasks
        if time.monotonic() > deadline:
            states = {name: [t["state"] for t in found] for name, found in tasks.items()}
            raise AssertionError(f"flower does not show the chord succeeded: {states}")
        time.sleep(0.5)


def test_flower_shows_the_tasks_of_a_real_backup_behind_basic_auth_and_no_secret(
    base_env, start_worker, flower, tmp_path
):
    port, process, log = flower
    worker = start_worker(base_env)
    made = run_cli(base_env, "run", "--wait")
    assert made.returncode == 0, made.stdout + made.stderr
    backup_id = made.stdout.strip().splitlines()[-1]

    tasks = wait_for_chord(port)
    for name in CHORD:
        (task,) = tasks[name]  # one backup: each task once
        assert task["state"] == "SUCCESS" and task["worker"], task
        assert task["received"] and task["succeeded"] and task["runtime"] is not None
    for name in CHORD[1:5]:  # each dump task gets the backup id, and returns its part's record
        assert ast.literal_eval(tasks[name][0]["args"]) == (backup_id,)  # Flower shows a repr
    finalize = tasks["vq_tasks.finalize_backup"][0]
    assert backup_id in finalize["args"] + finalize["kwargs"]
    assert backup_id in tasks["vq_tasks.backup"][0]["result"]
    assert "'origin': 'cli'" in tasks["vq_tasks.backup"][0]["kwargs"]

    # One task's page, as an operator opens it from the list.
    status, info = get(port, f"/api/task/info/{finalize['uuid']}")
    assert status == 200 and json.loads(info)["name"] == "vq_tasks.finalize_backup"

    # Basic authentication: nothing without it, nothing with a wrong password.
    assert get(port, "/api/tasks", auth=None)[0] == 401
    assert get(port, "/api/tasks", auth=(USER, "wrong"))[0] == 401
    assert get(port, "/", auth=None)[0] == 401

    # No secret anywhere Flower shows: task arguments, results, workers, its log, its command line.
    shown = [get(port, path)[1] for path in ("/api/tasks", "/api/workers?refresh=1", "/api/task/types")]
    workers = json.loads(shown[1])
    assert [name for name in workers if name.startswith("w0@")] and "conf" in next(iter(workers.values()))
    shown += [get(port, f"/api/task/info/{t['uuid']}")[1] for found in tasks.values() for t in found]
    shown.append(log.read_text())
    for secret in SECRETS:
        for text in shown:
            assert secret not in text, f"{secret} shown by Flower"
    command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace")
    assert PASSWORD not in command_line and "celery" in command_line  # exec'd, credentials not in argv
    assert worker.process.poll() is None


def post(port: int, path: str, body: dict | None = None) -> int:
    """POST to Flower's API as the logged-in operator; return the status."""
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST")
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_flower_is_read_only_nobody_applies_sends_aborts_or_revokes_through_it(
    base_env, start_worker, flower, tmp_path
):
    """With Flower's login, `POST /api/task/async-apply/vq_tasks.prune` used to run a prune on a
    worker (a forced restore the same way). Read-only, every task and worker action answers 403
    and no task reaches the worker."""
    port, _, _ = flower
    worker = start_worker(base_env, name="watched")
    actions = [
        "/api/task/async-apply/vq_tasks.prune",
        "/api/task/apply/vq_tasks.prune",
        "/api/task/send-task/vq_tasks.restore",
        "/api/task/abort/0c5e2bd9-0000-4000-8000-000000000000",
        "/api/task/revoke/0c5e2bd9-0000-4000-8000-000000000000",
        "/api/worker/shutdown/watched@x",
        "/api/worker/pool/restart/watched@x",
        "/api/worker/queue/add-consumer/watched@x?queue=vq.dump",
    ]
    for path in actions:
        assert post(port, path, {"kwargs": {"force": True}}) == 403, path
    time.sleep(2)
    assert "vq_tasks.prune[" not in worker.log_text() and "vq_tasks.restore[" not in worker.log_text()
    assert get(port, "/api/tasks")[0] == 200  # watching still works


def test_flower_refuses_to_start_without_credentials(base_env, tmp_path):
    env = script_env(base_env, FLOWER_PORT=str(free_port()))
    env.pop("FLOWER_BASIC_AUTH", None)
    env.pop("FLOWER_BASIC_AUTH_FILE", None)
    done = subprocess.run(["sh", str(START)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "FLOWER_BASIC_AUTH_FILE" in done.stderr

    empty = tmp_path / "empty"
    empty.write_text("user-without-password\n")
    env["FLOWER_BASIC_AUTH_FILE"] = str(empty)
    done = subprocess.run(["sh", str(START)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "user:password" in done.stderr

    env["FLOWER_BASIC_AUTH_FILE"] = str(tmp_path / "missing")
    done = subprocess.run(["sh", str(START)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "missing" in done.stderr
