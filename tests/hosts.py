"""Test hosts on one machine, so integration tests can run Celery workers as if on separate machines.

A ``Host`` is a network namespace ``vqh-<random>`` joined to the root namespace by a veth pair on a
/24 of its own from 10.213.0.0/16: the root side is its ``gateway`` (10.213.N.1), the namespace side
its ``address`` (10.213.N.2). Its processes run in their own mount and UTS namespaces too: their host
name is the host's name (resolvable through a private /etc/hosts), so the leases of
``vq_tasks.worker.leases`` and Celery's node names tell the hosts apart, and bind mounts give each
host files of its own. The services stay bound to 127.0.0.1: ``Host.forward`` relays
``gateway:port`` in the root namespace to ``127.0.0.1:port``. ``Host.cut`` drops every packet on the
host's link (a pulled cable: nothing is reset, connections hang) until ``Host.reconnect``.

Needs root, ``ip`` (iproute2), ``unshare`` (util-linux), ``nft`` (nftables) and ``hostname``;
``netns_available`` names what is missing. No sysctl is changed. A lock file serialises the set-up
and the clean-up of concurrent test runs; each root-side link names its owner (pid and start time)
in its alias, so ``leftovers`` finds only what a run that has ended left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tests.servers import HOST, stop_process

PREFIX = "vqh-"
NETWORK = ipaddress.IPv4Network("10.213.0.0/16")
SUBNET_PREFIX = 24
INNER_LINK = "eth0"
CUT_TABLE = "vqh_cut"
COMMAND_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
CHUNK = 65536
_OWNER = re.compile(r"pid=(\d+) start=(\d+)")
_CUT_RULES = f"""
table inet {CUT_TABLE} {{
  chain input {{ type filter hook input priority -300; policy accept; iifname "{INNER_LINK}" drop; }}
  chain output {{ type filter hook output priority -300; policy accept; oifname "{INNER_LINK}" drop; }}
}}
"""

_Stream = int | IO[Any] | None


def _run(argv: Sequence[str], input: str | None = None, check: bool = True) -> str:
    """Run a set-up command and return its output; raise RuntimeError with its stderr if it fails."""
    done = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        raise FileNotFoundError(f"no {name} on PATH")
    return found


def _ip(*args: str, check: bool = True) -> str:
    return _run([_tool("ip"), *args], check=check)


def _lock_file() -> Path:
    folder = Path("/run/lock")
    return (folder if folder.is_dir() else Path(tempfile.gettempdir())) / "vqh-hosts.lock"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Hold the lock that serialises creating hosts and cleaning leftovers (across test runs)."""
    with open(_lock_file(), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot, "" if it is gone (tells a reused pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_alias() -> str:
    pid = os.getpid()
    return f"vq-backup test host, pid={pid} start={_start_time(pid)}"


def _owner_alive(alias: str) -> bool:
    match = _OWNER.search(alias)
    return bool(match) and _start_time(int(match.group(1))) == match.group(2)


def _links() -> list[dict[str, Any]]:
    return json.loads(_ip("-j", "link", "show") or "[]")


def _namespaces() -> list[str]:
    found = json.loads(_ip("-j", "netns", "list", check=False) or "[]")
    return [entry["name"] for entry in found]


def _live_names() -> set[str]:
    """Names of the hosts whose owning process still runs."""
    return {
        link["ifname"]
        for link in _links()
        if link["ifname"].startswith(PREFIX) and _owner_alive(link.get("ifalias", ""))
    }


def leftovers() -> list[str]:
    """List what hosts of ended runs left: "netns NAME", "link NAME" and "dir PATH" entries."""
    live = _live_names()
    found = [f"netns {name}" for name in _namespaces() if name.startswith(PREFIX) and name not in live]
    found += [
        f"link {link['ifname']}"
        for link in _links()
        if link["ifname"].startswith(PREFIX) and link["ifname"] not in live
    ]
    found += [
        f"dir {path}"
        for path in sorted(Path(tempfile.gettempdir()).glob(f"{PREFIX}*"))
        if path.is_dir() and path.name not in live
    ]
    return found


def clean_leftovers() -> list[str]:
    """Remove what ``leftovers`` lists (killing the processes left in such namespaces); return it.
    Idempotent, and safe beside other runs: their hosts are alive and left alone."""
    with _locked():
        found = leftovers()
        for entry in found:
            kind, name = entry.split(" ", 1)
            if kind == "netns":
                _kill_namespace_processes(name)
                _ip("netns", "delete", name, check=False)
            elif kind == "link":
                _ip("link", "delete", name, check=False)
            else:
                shutil.rmtree(name, ignore_errors=True)
    return found


def _kill_namespace_processes(name: str) -> None:
    for pid in _ip("netns", "pids", name, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of NETWORK that no address of the root namespace is in (call under the lock)."""
    used = set()
    for link in json.loads(_ip("-j", "-4", "addr", "show") or "[]"):
        for info in link.get("addr_info", []):
            used.add(ipaddress.IPv4Address(info["local"]))
    for subnet in NETWORK.subnets(new_prefix=SUBNET_PREFIX):
        if not any(address in subnet for address in used):
            return subnet
    raise RuntimeError(f"no free /{SUBNET_PREFIX} left in {NETWORK}")


class _Pipe:
    """One forwarded connection: bytes both ways, a half-close passed on as one."""

    def __init__(self, downstream: socket.socket, upstream: socket.socket, done: Callable[[_Pipe], None]):
        self.sockets = (downstream, upstream)
        self._done = done
        self._open = 2
        self._lock = threading.Lock()

    def start(self) -> None:
        downstream, upstream = self.sockets
        for source, target in ((downstream, upstream), (upstream, downstream)):
            threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(CHUNK):
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort()
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last:
            for sock in self.sockets:
                sock.close()
            self._done(self)

    def abort(self) -> None:
        """End both directions at once (a reset on one side, or the forwarder closing)."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Forwarder:
    """Listens on (address, port) of the root namespace and relays each connection to 127.0.0.1:port."""

    def __init__(self, address: str, port: int):
        self.target = (HOST, port)
        self.server = socket.create_server((address, port))
        self._pipes: set[_Pipe] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._serve, daemon=True, name=f"forward {address}:{port}").start()

    def _serve(self) -> None:
        while True:
            try:
                downstream, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
            except OSError:
                downstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                downstream.close()  # a reset: nothing listens behind the forwarder
                continue
            upstream.settimeout(None)
            pipe = _Pipe(downstream, upstream, self._forget)
            with self._lock:
                if self._closed:
                    pipe.abort()
                    continue
                self._pipes.add(pipe)
            pipe.start()

    def _forget(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)

    def close(self) -> None:
        """Stop listening and end every forwarded connection."""
        with self._lock:
            self._closed = True
            pipes = list(self._pipes)
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.server.close()
        for pipe in pipes:
            pipe.abort()


class Host:
    """A test host: a network namespace with a link to the root namespace; ``close`` or leaving its
    ``with`` block removes it and all it added (its processes, forwarders, bind targets)."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen[bytes]] = []
        self._forwarders: list[_Forwarder] = []
        self._made_paths: list[Path] = []
        self._cut = False
        self._closed = False
        with _locked():
            self.name = PREFIX + secrets.token_hex(3)
            subnet = _free_subnet()
            self.gateway = str(subnet.network_address + 1)
            self.address = str(subnet.network_address + 2)
            self.dir = Path(tempfile.gettempdir()) / self.name
            _live.add(self)
            try:
                self._create(subnet.prefixlen)
            except BaseException:
                self.close()
                raise

    def _create(self, prefixlen: int) -> None:
        self.dir.mkdir()
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else f"{HOST}\tlocalhost\n"
        (self.dir / "hosts").write_text(f"{hosts.rstrip()}\n{self.address}\t{self.name}\n")
        _ip("netns", "add", self.name)
        _ip("link", "add", self.name, "type", "veth", "peer", "name", INNER_LINK, "netns", self.name)
        _ip("link", "set", self.name, "alias", _owner_alias(), "addrgenmode", "none")
        _ip("addr", "add", f"{self.gateway}/{prefixlen}", "dev", self.name)
        _ip("link", "set", self.name, "up")
        inside = ("-n", self.name)
        _ip(*inside, "link", "set", INNER_LINK, "addrgenmode", "none")
        _ip(*inside, "addr", "add", f"{self.address}/{prefixlen}", "dev", INNER_LINK)
        _ip(*inside, "link", "set", INNER_LINK, "up")
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "route", "add", "default", "via", self.gateway)

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.address} via {self.gateway}{', cut' if self._cut else ''})"

    def forward(self, *ports: int) -> None:
        """Relay ``gateway:port`` to ``127.0.0.1:port`` for each port, so that this host reaches the
        local services at its gateway while they stay bound to 127.0.0.1."""
        for port in ports:
            self._forwarders.append(_Forwarder(self.gateway, port))

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin: _Stream = subprocess.DEVNULL,
        stdout: _Stream = None,
        stderr: _Stream = None,
        binds: Mapping[Path, Path] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on this host, in a mount namespace of its own where each source of
        ``binds`` is bind-mounted on its target (created here if missing). It leads a session of
        its own (stop it with ``stop_process(..., group=True)``); its pid is the command's own."""
        mounts = {self.dir / "hosts": Path("/etc/hosts"), **(binds or {})}
        lines = ["set -e", f"hostname {shlex.quote(self.name)}"]
        for source, target in mounts.items():
            source, target = Path(source).absolute(), Path(target).absolute()
            self._make_target(target, source.is_dir())
            lines.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))}")
        script = "\n".join([*lines, 'exec "$@"'])
        command = [_tool("ip"), "netns", "exec", self.name, _tool("unshare"), "--mount", "--uts"]
        command += ["--propagation", "private", "--", "sh", "-c", script, "sh", *argv]
        process = subprocess.Popen(
            command,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        self._processes.append(process)
        return process

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        binds: Mapping[Path, Path] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` on this host to its end and return its output; past ``timeout`` seconds
        kill its process group and raise subprocess.TimeoutExpired."""
        process = self.popen(
            argv,
            env=env,
            binds=binds,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = process.communicate(input, timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def _make_target(self, target: Path, directory: bool) -> None:
        """Create a missing bind target (a folder or an empty file, as its source), remembered so
        that ``close`` removes it again."""
        if target.exists():
            return
        missing = [parent for parent in target.parents if not parent.exists()]
        for parent in reversed(missing):
            parent.mkdir()
            self._made_paths.append(parent)
        if directory:
            target.mkdir()
        else:
            target.touch()
        self._made_paths.append(target)

    def cut(self) -> None:
        """Drop every packet on this host's link, both ways, as a pulled cable does: the processes
        live on, nothing is reset, connections hang and new ones time out."""
        if not self._cut:
            self._nft("-f", "-", input=_CUT_RULES)
            self._cut = True

    def reconnect(self) -> None:
        """Undo ``cut``: packets pass again (a hung TCP connection resumes at its next retransmission)."""
        if self._cut:
            self._nft("delete", "table", "inet", CUT_TABLE)
            self._cut = False

    def _nft(self, *args: str, input: str | None = None) -> None:
        """Run nft in this host's network namespace: its rules are the namespace's own."""
        _run([_tool("ip"), "netns", "exec", self.name, _tool("nft"), *args], input=input)

    @property
    def is_cut(self) -> bool:
        return self._cut

    def close(self) -> None:
        """Stop this host's processes and forwarders, remove its link and namespace, and remove
        the bind targets and files it made."""
        if self._closed:
            return
        self._closed = True
        for process in self._processes:
            with contextlib.suppress(ProcessLookupError):
                stop_process(process, timeout=STOP_TIMEOUT, group=True)
        _kill_namespace_processes(self.name)  # whatever they left (they leave their sessions too)
        for forwarder in self._forwarders:
            forwarder.close()
        _ip("link", "delete", self.name, check=False)  # both ends of the pair, at once
        _ip("netns", "delete", self.name, check=False)
        for path in reversed(self._made_paths):  # only while still empty
            with contextlib.suppress(OSError):
                if path.is_dir():
                    path.rmdir()
                elif path.stat().st_size == 0:
                    path.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)
        _live.discard(self)

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_live: set[Host] = set()


@atexit.register
def _close_leftovers() -> None:
    for host in list(_live):
        host.close()


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """Remove the leftovers of ended runs, then make ``count`` hosts for the block and remove them
    afterwards, whether the block fails or not."""
    clean_leftovers()
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(Host()) for _ in range(count)]


@functools.cache
def netns_available() -> str | None:
    """None when this machine can make a host (a namespace with its link, a process inside, a cut);
    else why not, for pytest.skip. Tried once per run."""
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces)"
    try:
        for tool in ("ip", "unshare", "nft", "hostname"):
            _tool(tool)
        with Host() as host:
            host.cut()
            host.reconnect()
            done = host.run(["hostname"], timeout=COMMAND_TIMEOUT)
            if done.returncode != 0 or done.stdout.decode().strip() != host.name:
                return f"a process in a test host failed: {done.stderr.decode(errors='replace').strip()}"
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return f"cannot make a test host: {error}"
    return None
