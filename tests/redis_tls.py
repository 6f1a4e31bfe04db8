"""Redis over TLS for tests, as managed services run it: certificates made with ``openssl`` (a CA, a
server certificate for 127.0.0.1 and localhost, a client certificate), and a redis-server that
listens on TLS only (``--port 0``, ``--tls-port``) with ACL users, always stopped afterwards.

The server's passwords are in a config file of mode 600, never in argv. Debian's redis-server is
built with TLS; VQ_TEST_REDIS_SERVER names another binary (tests.servers.redis_server_binary).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis

from tests.servers import (
    HOST,
    PORT_ATTEMPTS,
    START_TIMEOUT,
    RedisServer,
    free_port,
    redis_server_binary,
)
from vq_tasks.settings import Settings, load_settings

ADMIN_PASSWORD = "tls-admin-Pa$$-w0rd"  # the default user's, for the tests' own clients
AuthClients = Literal["no", "optional", "yes"]


@dataclass(frozen=True)
class Certificates:
    """A CA, a server certificate it signed and a client certificate it signed, all PEM files."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def openssl(*args: str | Path) -> None:
    """Run ``openssl`` with ``args``; raise RuntimeError with its output if it fails."""
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def make_key(path: Path) -> Path:
    """Write a new EC P-256 private key (fast to make) to ``path``, mode 600, and return it."""
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    path.chmod(0o600)
    return path


def make_ca(folder: Path, name: str = "vq test CA") -> tuple[Path, Path]:
    """Make a self-signed CA named ``name`` in ``folder``; return its certificate and key."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = name.replace(" ", "-")
    key = make_key(folder / f"{stem}.key")
    cert = folder / f"{stem}.crt"
    openssl("req", "-x509", "-new", "-key", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}")
    return cert, key


def sign(
    folder: Path,
    stem: str,
    ca: tuple[Path, Path],
    common_name: str,
    usage: Literal["serverAuth", "clientAuth"],
    alt_names: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Make a key and a certificate for ``common_name`` signed by ``ca`` (certificate, key), for
    ``usage``, listing ``alt_names`` (such as "DNS:localhost", "IP:127.0.0.1"); return both."""
    key = make_key(folder / f"{stem}.key")
    request, cert, extensions = folder / f"{stem}.csr", folder / f"{stem}.crt", folder / f"{stem}.ext"
    lines = [f"extendedKeyUsage={usage}"]
    if alt_names:
        lines.append(f"subjectAltName={','.join(alt_names)}")
    extensions.write_text("\n".join(lines) + "\n")
    openssl("req", "-new", "-key", key, "-out", request, "-subj", f"/CN={common_name}")
    openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", extensions,
    )  # fmt: skip
    return cert, key


def make_certificates(
    folder: Path, alt_names: Sequence[str] = ("DNS:localhost", "IP:127.0.0.1")
) -> Certificates:
    """Make a CA, a server certificate for ``alt_names`` and a client certificate in ``folder``."""
    ca = make_ca(folder)
    server = sign(folder, "server", ca, "localhost", "serverAuth", alt_names)
    client = sign(folder, "client", ca, "vq-backup", "clientAuth")
    return Certificates(ca[0], ca[1], server[0], server[1], client[0], client[1])


def user_line(name: str, password: str, rules: str = "~* &* +@all") -> str:
    """Return the redis.conf line of an ACL user ``name`` with ``password`` and ``rules``."""
    return f"user {name} on >{password} {rules}"


class TLSRedisServer(RedisServer):
    """A running redis-server on TLS only; its clients are the default user's over TLS."""

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, dir: Path, log: Path, certs: Certificates
    ):
        super().__init__(process, port, ADMIN_PASSWORD, dir, log)
        self.certs = certs

    def client(self, db: int = 0) -> redis.Redis:
        """Return a TLS client of database ``db``, the default user's, with the client certificate
        (redis-py's own TLS, not the code under test; the server's name is not checked, as some
        tests give it a certificate for another)."""
        return redis.Redis(
            self.host, self.port, db=db, password=self.password, socket_timeout=10,
            ssl=True, ssl_ca_certs=str(self.certs.ca), ssl_certfile=str(self.certs.client_cert),
            ssl_keyfile=str(self.certs.client_key), ssl_check_hostname=False,
        )  # fmt: skip

    def settings(self, **overrides: Any) -> Settings:
        """Return settings naming this server as the Redis that is backed up, over TLS (checked
        against the tests' CA), as the default user; ``overrides`` replace any of them."""
        values: dict[str, Any] = {
            "redis_host": HOST,
            "redis_port": self.port,
            "redis_password": self.password,
            "redis_timeout": 5,
            "redis_tls": True,
            "redis_tls_ca_file": self.certs.ca,
            "celery_broker_url": "redis://127.0.0.1:1/0",
        }
        return load_settings(**{**values, **overrides})

    def __enter__(self) -> TLSRedisServer:
        return self


_running: set[TLSRedisServer] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        server.kill()


def config_text(
    port: int, folder: Path, certs: Certificates, auth_clients: AuthClients, users: Sequence[str]
) -> str:
    """Return the redis.conf of a TLS-only server on ``port`` of 127.0.0.1 with ``users`` lines."""
    lines = [
        f"bind {HOST}", "port 0", f"tls-port {port}", f'dir "{folder}"', 'save ""', "appendonly no",
        f"tls-cert-file {certs.server_cert}", f"tls-key-file {certs.server_key}",
        f"tls-ca-cert-file {certs.ca}", f"tls-auth-clients {auth_clients}",
        "repl-diskless-sync-delay 0", f"user default on >{ADMIN_PASSWORD} ~* &* +@all", *users,
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def start_tls_redis(
    workdir: Path,
    certs: Certificates,
    *,
    users: Sequence[str] = (),
    auth_clients: AuthClients = "no",
    args: Sequence[str] = (),
    binary: str | None = None,
) -> TLSRedisServer:
    """Start a redis-server in ``workdir`` listening on TLS only, with ``certs``, the ACL
    ``users`` lines (user_line) besides the default user (ADMIN_PASSWORD), and client
    certificates as ``auth_clients`` says; return it once it answers PING over TLS. Raise
    RuntimeError, with its log, if it does not within 10 s."""
    workdir.mkdir(parents=True, exist_ok=True)
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        config = workdir / f"redis-{port}.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as stream:
            stream.write(config_text(port, workdir, certs, auth_clients, users))
        log = workdir / f"redis-{port}.log"
        with open(log, "wb") as log_file:
            command = [binary or redis_server_binary(), str(config), *args]
            process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        server = TLSRedisServer(process, port, workdir, log, certs)
        _running.add(server)
        try:
            if _wait_ready(server):
                return server
        except BaseException:
            server.kill()
            raise
        server.kill()
    raise RuntimeError(f"redis-server found no free port in {PORT_ATTEMPTS} attempts")


def _wait_ready(server: TLSRedisServer) -> bool:
    """Return True once ``server`` answers PING over TLS, False if its port was taken."""
    deadline = time.monotonic() + START_TIMEOUT
    with server.client() as client:
        while (code := server.process.poll()) is None:
            try:
                if client.ping():
                    return True
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not answer PING over TLS in time; its log:\n{server.log_text()}"
                )
            time.sleep(0.05)
    if "Address already in use" in server.log_text():
        return False
    raise RuntimeError(
        f"redis-server on TLS port {server.port} exited with {code}; its log:\n{server.log_text()}"
    )
