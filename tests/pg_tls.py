"""A PostgreSQL cluster of a test's own that speaks TLS, and the certificates it needs.

Certificates (made with openssl, EC P-256, valid two days): a CA; a server certificate for
127.0.0.1 and localhost (not 127.0.0.2, where the cluster listens too: a name mismatch); client
certificates whose CN is the user; another CA that signed nothing here. The cluster runs the
machine's initdb and pg_ctl on a free port (as root: as the system user ``postgres``, since
PostgreSQL refuses to run as root). pg_hba lets TCP clients in over TLS only: CERT_USER by its
certificate (``hostssl ... cert``), SCRAM_USER by password (``hostssl ... scram-sha-256``); the
superuser ADMIN reaches it over the socket.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.servers import free_port
from vq_tasks.settings import Settings, load_settings

ADMIN = "postgres"
CERT_USER = "vq_cert"
SCRAM_USER = "vq_scram"
SCRAM_PASSWORD = "scram-Secret-4e1f9"
SERVER_NAMES = "DNS:localhost,IP:127.0.0.1"
START_ATTEMPTS = 3
HBA = f"""local all all trust
hostssl all {SCRAM_USER} 127.0.0.0/8 scram-sha-256
hostssl all all 127.0.0.0/8 cert
"""


def postgres_bin() -> Path | None:
    """The folder of the machine's initdb, pg_ctl and postgres (the server pg_dump on PATH can dump)."""
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


@dataclass(frozen=True)
class Pki:
    """The test certificates, in ``folder``: ``<name>.crt`` and ``<name>.key`` (mode 600)."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def other_ca(self) -> Path:
        return self.folder / "other-ca.crt"

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.crt", self.folder / f"{name}.key"


def make_pki(folder: Path) -> Pki:
    """Make the CA, the other CA, the server's certificate and one client certificate per user."""
    folder.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other-ca"):
        make_key(folder, ca)
        openssl(
            folder,
            "req",
            "-x509",
            "-new",
            "-key",
            f"{ca}.key",
            "-subj",
            f"/CN=vq-test-{ca}",
            "-days",
            "2",
            "-out",
            f"{ca}.crt",
        )
    issue(folder, "server", "localhost", f"subjectAltName={SERVER_NAMES}")
    for user in (CERT_USER, SCRAM_USER):
        issue(folder, user, user, "extendedKeyUsage=clientAuth")
    return Pki(folder)


def make_key(folder: Path, name: str) -> None:
    openssl(
        folder, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key"
    )
    (folder / f"{name}.key").chmod(0o600)


def issue(folder: Path, name: str, common_name: str, extension: str) -> None:
    """Make ``name``.key and ``name``.crt, signed by ca.key, for CN ``common_name``."""
    make_key(folder, name)
    (folder / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\n{extension}\n")
    openssl(
        folder, "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={common_name}", "-out", f"{name}.csr"
    )
    openssl(
        folder,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-days", "2"),
        *("-set_serial", f"0x{secrets.token_hex(8)}", "-extfile", f"{name}.ext", "-out", f"{name}.crt"),
    )


class Cluster:
    """A running cluster on 127.0.0.1 and 127.0.0.2, port ``port``, its files in ``root``."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        """A superuser connection over the socket (no TLS, trust)."""
        return psycopg.connect(
            host=str(self.root), port=self.port, user=ADMIN, dbname=dbname, autocommit=True
        )

    def settings(self, **values: object) -> Settings:
        """Settings that reach this cluster over TCP at 127.0.0.1, changed by ``values``."""
        defaults: dict[str, object] = {"db_host": "127.0.0.1", "db_port": self.port, "db_name": "postgres"}
        return load_settings(celery_broker_url="redis://127.0.0.1:1/0", **{**defaults, **values})


@contextlib.contextmanager
def running_cluster(pki: Pki, ssl: bool = True) -> Iterator[Cluster]:
    """Start a cluster (with ``ssl`` on or off) whose users are CERT_USER and SCRAM_USER, both
    superusers; stop and remove it afterwards."""
    owner = server_user()
    root = Path(tempfile.mkdtemp(prefix="vq-pg-tls-"))  # under /tmp: the server user can reach it
    try:
        for name in ("server.crt", "server.key", "ca.crt"):
            shutil.copy(pki.folder / name, root / name)
        chown_tree(root, owner)
        run_as(
            owner, [*pg("initdb"), "-D", str(root / "data"), "-U", ADMIN, "--auth=trust", "-N", "-E", "UTF8"]
        )
        (root / "data" / "pg_hba.conf").write_text(HBA)
        cluster = start(root, owner, ssl)
        try:
            with cluster.admin() as conn:
                conn.execute(f"CREATE ROLE {CERT_USER} LOGIN SUPERUSER")
                conn.execute(f"CREATE ROLE {SCRAM_USER} LOGIN SUPERUSER PASSWORD '{SCRAM_PASSWORD}'")
            yield cluster
        finally:
            run_as(
                owner, [*pg("pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w", "stop"], check=False
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def start(root: Path, owner: pwd.struct_passwd | None, ssl: bool) -> Cluster:
    """Configure and start the cluster of ``root`` on a free port; a few ports are tried."""
    data, log = root / "data", root / "log"
    for _ in range(START_ATTEMPTS):
        port = free_port()
        (data / "postgresql.auto.conf").write_text(
            f"port = {port}\nlisten_addresses = '127.0.0.1,127.0.0.2'\nunix_socket_directories = '{root}'\n"
            f"ssl = {'on' if ssl else 'off'}\nssl_cert_file = '{root}/server.crt'\n"
            f"ssl_key_file = '{root}/server.key'\nssl_ca_file = '{root}/ca.crt'\nfsync = off\n"
        )
        chown_tree(root, owner)
        done = run_as(
            owner, [*pg("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "30", "start"], check=False
        )
        if done.returncode == 0:
            return Cluster(root, port)
    raise RuntimeError(f"PostgreSQL did not start:\n{log.read_text() if log.exists() else done.stderr}")


def pg(program: str) -> list[str]:
    folder = postgres_bin()
    assert folder is not None, "no initdb on PATH"
    return [str(folder / program)]


def server_user() -> pwd.struct_passwd | None:
    """The user the server runs as: ``postgres`` when we are root, else ourselves (None)."""
    return pwd.getpwnam("postgres") if os.geteuid() == 0 else None


def chown_tree(root: Path, owner: pwd.struct_passwd | None) -> None:
    if owner is None:
        return
    for path in [root, *root.rglob("*")]:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def run_as(
    owner: pwd.struct_passwd | None, argv: list[str], check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``argv`` as ``owner`` (None: as ourselves), in the C locale."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    ids = {} if owner is None else {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=check, cwd="/", **ids)
