"""Real emulators of the three clouds, each started on a free port of 127.0.0.1 and stopped after:
moto's S3 server (with IAM authentication switched on), Azurite and gcp-storage-emulator.

``make emulators`` installs them (moto and the GCS emulator from PyPI into the venv, Azurite from
npm into .emulators/). Each emulator can be frozen (SIGSTOP) and thawed, which is what a store that
stops answering in the middle of an upload looks like to a client, with its data kept for checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import HOST, free_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AWS_REGION = "us-east-1"
# IAM calls that create the test user and its key before moto starts checking signatures
UNAUTHENTICATED_SETUP_CALLS = 3


@dataclass
class Emulator:
    """A running emulator process, its endpoint and its log."""

    name: str
    process: subprocess.Popen
    port: int
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def freeze(self) -> None:
        """Stop answering (SIGSTOP): connections hang as with a lost network."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGCONT)
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _start(name: str, argv: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> Emulator:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    emulator = Emulator(name, process, port, log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{emulator.log_text()[-3000:]}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return emulator
        except OSError:
            time.sleep(0.2)
    emulator.stop()
    raise RuntimeError(f"{name} did not listen on {HOST}:{port} within {START_TIMEOUT} s")


def _venv_tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed: run `make emulators`")
    return found


@contextmanager
def s3_emulator(workdir: Path) -> Iterator[Emulator]:
    """moto's S3 server with IAM authentication: ``extra`` holds the access key of a user allowed
    everything, created by the first calls (moto checks signatures from then on)."""
    port = free_port()
    argv = [_venv_tool("moto_server"), "-H", HOST, "-p", str(port)]
    env = {"INITIAL_NO_AUTH_ACTION_COUNT": str(UNAUTHENTICATED_SETUP_CALLS)}
    emulator = _start("moto_server", argv, port, workdir / "moto.log", env)
    try:
        emulator.extra.update(_moto_user(emulator.endpoint, "vq-backup", [{"Action": "*", "Resource": "*"}]))
        yield emulator
    finally:
        emulator.stop()


def _moto_user(
    endpoint: str, user: str, statements: list[dict], iam_keys: dict | None = None
) -> dict[str, str]:
    """Create an IAM user with an inline policy and an access key; return the key."""
    import boto3

    keys = iam_keys or {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=AWS_REGION, **keys)
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", **s} for s in statements]}
    iam.put_user_policy(UserName=user, PolicyName="backup", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}


def moto_limited_user(emulator: Emulator, actions: list[str]) -> dict[str, str]:
    """Create (with the admin key) a user allowed only ``actions``; return its key."""
    admin = {k: emulator.extra[k] for k in ("aws_access_key_id", "aws_secret_access_key")}
    name = f"limited-{uuid.uuid4().hex[:8]}"
    return _moto_user(emulator.endpoint, name, [{"Action": actions, "Resource": "*"}], admin)


def s3_client(emulator: Emulator, **keys: str):
    import boto3

    credentials = keys or {k: emulator.extra[k] for k in ("aws_access_key_id", "aws_secret_access_key")}
    return boto3.client("s3", endpoint_url=emulator.endpoint, region_name=AWS_REGION, **credentials)


def azurite_binary() -> str:
    local = ROOT / ".emulators" / "node_modules" / ".bin" / "azurite-blob"
    found = os.environ.get("VQ_TEST_AZURITE") or (
        str(local) if local.exists() else shutil.which("azurite-blob")
    )
    if not found:
        raise RuntimeError("azurite-blob is not installed: run `make emulators`")
    return found


@contextmanager
def azure_emulator(workdir: Path) -> Iterator[Emulator]:
    """Azurite's blob service in memory; ``extra["connection_string"]`` reaches it."""
    port = free_port()
    argv = [
        azurite_binary(),
        "--blobHost", HOST,
        "--blobPort", str(port),
        "--inMemoryPersistence",
        "--skipApiVersionCheck",
        "--disableTelemetry",
        "--loose",
    ]  # fmt: skip
    emulator = _start("azurite", argv, port, workdir / "azurite.log")
    emulator.extra["connection_string"] = azurite_connection_string(emulator.endpoint)
    try:
        yield emulator
    finally:
        emulator.stop()


def azurite_connection_string(endpoint: str, key: str = AZURITE_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
        f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
    )


@contextmanager
def gcs_emulator(workdir: Path) -> Iterator[Emulator]:
    """gcp-storage-emulator in memory; clients reach it through STORAGE_EMULATOR_HOST."""
    port = free_port()
    argv = [_venv_tool("gcp-storage-emulator"), "start", "--host", HOST, "--port", str(port), "--in-memory"]
    emulator = _start("gcp-storage-emulator", argv, port, workdir / "gcs.log")
    try:
        yield emulator
    finally:
        emulator.stop()


def create_bucket(provider: str, emulator: Emulator, name: str) -> None:
    """Create a bucket (S3, GCS) or container (Azure) in the emulator."""
    if provider == "AWS_S3":
        s3_client(emulator).create_bucket(Bucket=name)
    elif provider == "Azure_Blob":
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(emulator.extra["connection_string"]).create_container(name)
    elif provider == "Google_Cloud":
        gcs_client(emulator).create_bucket(name)
    else:
        raise ValueError(provider)


def gcs_client(emulator: Emulator):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="vq-test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": emulator.endpoint},  # not the environment: tests stay independent
    )


def storage_env(
    provider: str, emulator: Emulator, bucket: str, prefix: str, endpoint: str | None = None
) -> dict[str, str]:
    """Return the environment variables that point VQ Backup at ``bucket/prefix`` in the emulator
    (reached at ``endpoint``, a proxy say, instead of its own), as an operator would set them."""
    endpoint = endpoint or emulator.endpoint
    if provider == "AWS_S3":
        return {
            "BACKUP_STORAGE_PATH": f"s3://{bucket}/{prefix}",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_REGION": AWS_REGION,
            "AWS_ACCESS_KEY_ID": emulator.extra["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": emulator.extra["aws_secret_access_key"],
            "BACKUP_STORAGE_PROVIDER": provider,
        }
    if provider == "Azure_Blob":
        return {
            "BACKUP_STORAGE_PATH": f"https://{AZURITE_ACCOUNT}.blob.core.windows.net/{bucket}/{prefix}",
            "AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(endpoint),
            "BACKUP_STORAGE_PROVIDER": provider,
        }
    if provider == "Google_Cloud":
        return {
            "BACKUP_STORAGE_PATH": f"gs://{bucket}/{prefix}",
            "STORAGE_EMULATOR_HOST": endpoint,
            "GOOGLE_CLOUD_PROJECT": "vq-test",
            "BACKUP_STORAGE_PROVIDER": provider,
        }
    raise ValueError(provider)


class CountingProxy:
    """A TCP proxy on a free port of 127.0.0.1 in front of ``upstream_port``: it counts the bytes
    clients send, and once they pass ``threshold`` calls ``on_threshold`` (once). Tests use it to
    stop an emulator in the middle of an upload, whatever the provider's protocol."""

    def __init__(self, upstream_port: int, threshold: int, on_threshold):
        import threading

        self.port = free_port()
        self.sent = 0
        self._upstream = upstream_port
        self._threshold = threshold
        self._on_threshold = on_threshold
        self._fired = False
        self._lock = threading.Lock()
        self._listener = socket.create_server((HOST, self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((HOST, self._upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                target.sendall(data)
                if counted:
                    self._count(len(data))
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _count(self, n: int) -> None:
        with self._lock:
            self.sent += n
            fire = not self._fired and self.sent >= self._threshold
            self._fired = self._fired or fire
        if fire:
            self._on_threshold()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
