"""The throwaway redis-server that a Redis restore loads the RDB into, and which versions fit.

Why a server of our own: the worker reaches the application's Redis only over the network, and only
a redis-server reads an RDB file. It runs on 127.0.0.1 on a free port, ``save ""`` and no AOF, in a
private temp folder where the RDB is linked as its dbfilename, a random password in a 0600 config
file, never in argv; ``close`` ends it and removes the folder. Killed with us (leftovers.py): the
server gets SIGKILL from Linux, and the next throwaway removes the folder.

Versions: a DUMP payload carries the RDB version of the server that made it, and Redis refuses a
payload newer than its own ("DUMP payload version or checksum are wrong"). So the RDB file's
version (its header ``REDIS00NN``) must be at most what the throwaway reads, and what the throwaway
writes at most what the target reads: the throwaway is best the target's own version
(REDIS_SERVER_BIN). check_versions checks both before anything is written, from the versions both
servers report and RDB_VERSIONS; the restore checks once more on a payload the throwaway makes.
Supported: Redis 5.0 to 8.0, standalone (not Cluster), as target and as throwaway; a newer version
is accepted and left to the payload check. RDB_VERSIONS for 6.2 (9) and 7.0 (10) is checked against
real servers by the tests; 5.0, 7.2, 7.4 and 8.0 are RDB_VERSION of their rdb.h.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from vq_tasks.clients.rdb import HEADER_SIZE, MAGIC
from vq_tasks.errors import PermanentError, TransientError, redact
from vq_tasks.restore.leftovers import die_with_parent, owned_folder

# (major, minor) of Redis -> the newest RDB version it reads and writes (RDB_VERSION in rdb.h)
RDB_VERSIONS = {(5, 0): 9, (6, 0): 9, (6, 2): 9, (7, 0): 10, (7, 2): 11, (7, 4): 12, (8, 0): 12}
HOST = "127.0.0.1"
RDB_NAME = "backup.rdb"
LOAD_TIMEOUT = 1800.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 3
NOTHING_WRITTEN = "nothing was written"
FOLDER_PREFIX = "vq-redis-restore-"  # the throwaway's folder, in the temp folder

Progress = Callable[[str, str, int], object]
"""progress(stage, db, count): ("loading", "", percent), ("removed" | "queued", db, keys so far),
("applying", "", commands in the transaction)."""


def rdb_version_of(redis_version: str, who: str = "Redis") -> int | None:
    """Given a Redis version such as "7.0.15", return the newest RDB version it reads and writes,
    or None for a version newer than RDB_VERSIONS knows. Raise PermanentError, naming ``who``, for
    a version older than 5.0 or no version at all."""
    match = re.match(r"(\d+)\.(\d+)", redis_version)
    found = (int(match[1]), int(match[2])) if match else None
    if found is None or found < min(RDB_VERSIONS):
        raise PermanentError(f"{who} runs Redis {redis_version}: supported are Redis 5.0 and newer")
    if found > max(RDB_VERSIONS):
        return None
    return RDB_VERSIONS[max(since for since in RDB_VERSIONS if since <= found)]


def oldest_redis_reading(rdb_version: int) -> str:
    """Given an RDB version, return the oldest Redis that reads it, such as "7.0"."""
    for (major, minor), rdb in sorted(RDB_VERSIONS.items()):
        if rdb >= rdb_version:
            return f"{major}.{minor}"
    return "newer than {}.{}".format(*max(RDB_VERSIONS))


def rdb_file_version(path: Path) -> int:
    """Given an RDB file, return the version in its header. Raise PermanentError if it cannot be
    read or is no RDB."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(HEADER_SIZE)
    except OSError as exc:
        raise PermanentError(f"cannot read the RDB {path}: {exc.strerror or exc}") from None
    digits = head[len(MAGIC) :]
    if len(head) < HEADER_SIZE or not head.startswith(MAGIC) or not digits.isdigit():
        raise PermanentError(f"{path} is not an RDB file: it starts with {head[:16]!r}")
    return int(digits)


def payload_rdb_version(payload: bytes) -> int:
    """Given a DUMP payload (the value, two bytes of RDB version, eight of CRC64), return its RDB
    version."""
    return int.from_bytes(payload[-10:-8], "little")


def server_binary_path(server_binary: str | None = None) -> str:
    """Given the redis-server to use or None, return it, else $REDIS_SERVER_BIN, else the
    redis-server on PATH. Raise PermanentError if there is none."""
    chosen = server_binary or os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")
    if not chosen:
        raise PermanentError(
            "no redis-server to load the RDB with: install one on the worker or set REDIS_SERVER_BIN"
        )
    return chosen


def server_binary_version(binary: str) -> str:
    """Given a redis-server binary, return its version, such as "7.0.15". Raise PermanentError if
    it does not run or is no redis-server."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PermanentError(f"cannot run {binary} --version (REDIS_SERVER_BIN): {exc}") from None
    match = re.search(r"\bv=(\d+\.\d+\S*)", done.stdout)
    if done.returncode or not match:
        shown = (done.stdout or done.stderr).strip()[:80]
        raise PermanentError(f"{binary} is no redis-server (REDIS_SERVER_BIN): --version said {shown!r}")
    return match[1]


def check_versions(
    rdb_version: int, target: str, target_version: str, binary: str, binary_version: str
) -> None:
    """Given the RDB file's version, the target (as messages name it) and its Redis version, and
    the throwaway's binary and version, return if the file loads into the throwaway and its
    payloads restore into the target. Raise PermanentError naming both versions otherwise."""
    target_rdb = rdb_version_of(target_version, f"the target {target}")
    server_rdb = rdb_version_of(binary_version, f"redis-server {binary} (REDIS_SERVER_BIN)")
    if target_rdb is not None and rdb_version > target_rdb:
        raise PermanentError(
            f"the backup's RDB is version {rdb_version} (Redis {oldest_redis_reading(rdb_version)} or"
            f" newer) but the target {target} runs Redis {target_version}, which reads RDB versions up"
            f" to {target_rdb}: restore into a Redis {oldest_redis_reading(rdb_version)} or newer;"
            f" {NOTHING_WRITTEN}"
        )
    if server_rdb is not None and rdb_version > server_rdb:
        raise PermanentError(
            f"the backup's RDB is version {rdb_version} but redis-server {binary_version} ({binary})"
            f" reads RDB versions up to {server_rdb}: set REDIS_SERVER_BIN to a redis-server"
            f" {oldest_redis_reading(rdb_version)} or newer, best the target's {target_version};"
            f" {NOTHING_WRITTEN}"
        )
    if server_rdb is not None and target_rdb is not None and server_rdb > target_rdb:
        raise too_new_for_target(server_rdb, binary, binary_version, target, target_version)


def too_new_for_target(
    payload_rdb: int, binary: str, binary_version: str, target: str, target_version: str
) -> PermanentError:
    """Given the RDB version of the throwaway's payloads, its binary and version, the target and
    its version, return the error saying that the target would refuse those payloads."""
    return PermanentError(
        f"redis-server {binary_version} ({binary}) makes DUMP payloads of RDB version {payload_rdb},"
        f" which the target {target}, running Redis {target_version}, refuses: set REDIS_SERVER_BIN"
        f" to a redis-server of the target's version ({target_version}); {NOTHING_WRITTEN}"
    )


def config_text(directory: Path, port: int, password: str) -> str:
    """Given the throwaway's folder, port and password, return its redis.conf."""
    quoted = '"' + str(directory).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    lines = [f"bind {HOST}", f"port {port}", "protected-mode yes", f"dir {quoted}", f"dbfilename {RDB_NAME}"]
    lines += ['save ""', "appendonly no", "daemonize no", 'logfile ""', f"requirepass {password}"]
    return "\n".join(lines) + "\n"


def write_config(directory: Path, port: int, password: str) -> Path:
    """Given the throwaway's folder, port and password, write its config, readable by its owner
    only, and return its path."""
    path = directory / f"redis-{port}.conf"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(config_text(directory, port, password))
    return path


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Throwaway:
    """A redis-server of our own that has loaded the RDB (none: it starts empty, the scratch target
    of a restore drill); ``close`` ends it and removes its folder."""

    def __init__(
        self, binary: str, rdb_path: Path | None, timeout: float, load_timeout: float = LOAD_TIMEOUT
    ):
        self.binary = binary
        self.timeout = timeout
        self.password = secrets.token_urlsafe(32)
        self._folder = contextlib.ExitStack()
        self.dir = self._folder.enter_context(owned_folder(Path(tempfile.gettempdir()), FOLDER_PREFIX))
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._rdb_path = rdb_path.resolve() if rdb_path is not None else None
        self._load_timeout = load_timeout

    @property
    def where(self) -> str:
        return f"the throwaway redis-server ({self.binary}) on {HOST}:{self.port}"

    def client(self, db: int = 0) -> redis.Redis:
        """Return a client of database ``db`` of the throwaway."""
        return redis.Redis(
            HOST,
            self.port,
            db=db,
            password=self.password,
            socket_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def start(self, progress: Progress | None = None) -> None:
        """Start the server and return once it has loaded the RDB. Raise PermanentError, with the
        end of its log, if it fails to, TransientError if it finds no free port."""
        if self._rdb_path is not None:
            (self.dir / RDB_NAME).symlink_to(self._rdb_path)
        for _ in range(START_ATTEMPTS):
            self.port = free_port()
            config = write_config(self.dir, self.port, self.password)
            with open(self.dir / f"redis-{self.port}.log", "wb") as log:
                self.process = subprocess.Popen(
                    [self.binary, str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=die_with_parent(),  # the data set in memory goes when we do
                )
            if self._wait_loaded(progress):
                return
        raise TransientError(f"the throwaway redis-server found no free port in {START_ATTEMPTS} attempts")

    def _wait_loaded(self, progress: Progress | None) -> bool:
        """Return True once loaded, False if the port was taken. Raise as ``start`` does."""
        assert self.process is not None
        deadline, shown = time.monotonic() + self._load_timeout, -1
        with self.client() as client:
            while self.process.poll() is None:
                try:
                    state = client.info("persistence")
                except redis.exceptions.AuthenticationError as exc:
                    raise PermanentError(f"{self.where} refused its password: {exc}") from None
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    state = None  # not listening yet
                if state is not None and not int(state.get("loading", 0)):
                    return True
                percent = int(float(state.get("loading_loaded_perc", 0))) if state else 0
                if progress and state and percent != shown:
                    shown = percent
                    progress("loading", "", percent)
                if time.monotonic() > deadline:
                    raise PermanentError(f"{self.where} did not load the RDB in {self._load_timeout:g} s")
                time.sleep(0.05)
        if "Address already in use" in self.log_text():
            return False
        what = f"load the RDB {self._rdb_path}" if self._rdb_path is not None else "start"
        raise PermanentError(f"{self.where} could not {what}: {self.log_tail()}")

    def log_text(self) -> str:
        try:
            text = (self.dir / f"redis-{self.port}.log").read_text(errors="replace")
        except OSError:
            return ""
        return redact(text, [self.password])

    def log_tail(self, count: int = 2) -> str:
        """Return the last warnings of the log (its last lines if none), without their prefix."""
        lines = [line for line in self.log_text().splitlines() if line.strip()]
        warned = [m[1] for line in lines if (m := re.match(r"^\d+:\w [\d\w :.]+? # (.*)", line))]
        shown = [line for line in warned if not line.startswith("WARNING")] or lines
        return " | ".join(shown[-count:]) or "(empty log)"

    def close(self) -> None:
        """End the server (SIGTERM, SIGKILL if it lingers) and remove its folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._folder.close()
