"""Backups on each cloud, through the real chord and worker, against the clouds' emulators: list,
verify, restore of every component, prune and the off-site copy; a 200 MB object uploaded in parts
by a worker whose memory stays far below it; the store stopped in the middle of an upload."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.emulators import CountingProxy, Emulator, azurite_connection_string, create_bucket, storage_env
from tests.integration.conftest import fill_database, run_backup, run_cli
from tests.integration.test_restore import call_restore, change_everything, snapshot
from tests.servers import redis_server_binary
from vq_tasks.manifest import manifest_name
from vq_tasks.settings import load_settings
from vq_tasks.storage import open_storage
from vq_tasks.storage.base import Storage

pytestmark = pytest.mark.integration
CLOUDS = {"AWS_S3": "s3", "Azure_Blob": "azure", "Google_Cloud": "gcs"}
SECRETS = ("db-secret-pw", "redis-secret-pw", "broker-secret-pw")
MIB = 1 << 20


@pytest.fixture(params=list(CLOUDS))
def cloud(request) -> tuple[str, Emulator]:
    """Each cloud provider, with its emulator (started once per session)."""
    return request.param, request.getfixturevalue(CLOUDS[request.param])


def new_bucket(provider: str, emulator: Emulator) -> str:
    name = f"vq-test-{uuid.uuid4().hex[:8]}"
    create_bucket(provider, emulator, name)
    return name


@pytest.fixture
def cloud_env(base_env, cloud) -> dict[str, str]:
    """A working backup's settings with the cloud as its storage, in 5 MiB parts."""
    provider, emulator = cloud
    bucket = new_bucket(provider, emulator)
    return {
        **base_env,
        **storage_env(provider, emulator, bucket, "prod/vq"),
        "REDIS_SERVER_BIN": redis_server_binary(),
        "BACKUP_UPLOAD_PART_SIZE_MB": "5",
        "BACKUP_UPLOAD_CONCURRENCY": "2",
    }


def storage_of(env: dict[str, str], role: str = "primary") -> Storage:
    """The storage the worker writes to, opened in the test through the same settings."""
    return open_storage(load_settings(**{k.lower(): v for k, v in env.items()}), role)


def names_in(storage: Storage) -> list[str]:
    return sorted(o.name for o in storage.list())


def backup_now(env: dict[str, str]) -> str:
    return run_backup(env)


def test_backup_list_verify_restore_prune_and_offsite(
    cloud_env, database, derived_databases, source_redis, layout, start_worker, monkeypatch, tmp_path
):
    offsite = tmp_path / "offsite"
    restored_logs = tmp_path / "restored-logs"
    env = {
        **cloud_env,
        "BACKUP_OFFSITE_PROVIDER": "Local",
        "BACKUP_OFFSITE_PATH": str(offsite),
        "BACKUP_RESTORE_LOGS_DIR": str(restored_logs),
    }
    fill_database(database, customers=200)
    worker = start_worker(env)
    backup_id = backup_now(env)
    storage = storage_of(env)
    assert names_in(storage) == sorted(
        f"{backup_id}{s}" for s in (".tar.gz", "_logs.tar.gz", "_manifest.json")
    )
    listed = run_cli(env, "list")
    assert backup_id in listed.stdout and "complete" in listed.stdout, listed.stdout + listed.stderr
    verified = run_cli(env, "verify", "latest")
    assert verified.returncode == 0 and "all OK" in verified.stdout, verified.stdout + verified.stderr

    _wait_for(lambda: (offsite / manifest_name(backup_id)).exists(), "the off-site copy")
    offsite_check = run_cli(env, "verify", backup_id, "--offsite")
    assert offsite_check.returncode == 0, offsite_check.stdout + offsite_check.stderr

    before = snapshot(database, source_redis, layout["config"])
    change_everything(database, source_redis, layout["config"])
    outcome = call_restore(env, monkeypatch, force=True, components=["database", "redis", "config", "logs"])
    assert isinstance(outcome, dict) and outcome["ok"], outcome
    after = snapshot(database, source_redis, layout["config"])
    assert after[:3] == before[:3]  # rows, Redis contents, config files and modes
    assert [p.name for p in restored_logs.rglob("app.log")] == ["app.log"]

    old, debris = "virtualqueue_backup_20000101_020000", "virtualqueue_backup_20000102_020000"
    for name in (f"{old}.tar.gz", f"{old}_manifest.json", f"{debris}.tar.gz", "not-a-backup.txt"):
        with storage.open_write(name) as out:
            out.write(b"planted by the test")
    pruned = run_cli(env, "prune")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert names_in(storage) == sorted(
        [f"{backup_id}{s}" for s in (".tar.gz", "_logs.tar.gz", "_manifest.json")] + ["not-a-backup.txt"]
    )

    flip_a_byte(storage, f"{backup_id}.tar.gz")
    damaged = run_cli(env, "verify", backup_id)
    assert damaged.returncode == 1 and "MISMATCH" in damaged.stdout, damaged.stdout + damaged.stderr
    state = snapshot(database, source_redis, layout["config"])
    refused = run_cli(env, "restore", backup_id, "--force", "--yes")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert snapshot(database, source_redis, layout["config"]) == state  # nothing was changed

    everything = worker.log_text() + listed.stdout + verified.stdout + pruned.stdout + str(outcome)
    cloud_secrets = [env[k] for k in ("AWS_SECRET_ACCESS_KEY",) if k in env] + ["Eby8vdM02xNOcqFlqUwJPL"]
    for secret in (*SECRETS, *cloud_secrets):
        assert secret not in everything


def flip_a_byte(storage: Storage, name: str) -> None:
    """Rewrite a stored object with one byte in its middle flipped (bit rot, a bad disk)."""
    data = bytearray(storage.read_bytes(name, limit=1 << 30))
    data[len(data) // 2] ^= 0x01
    with storage.open_write(name) as out:
        out.write(bytes(data))


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.2)


def peak_rss_growth(pid: int, baseline_kib: int) -> int:
    """Return how far the peak resident size of ``pid`` (VmHWM) rose above ``baseline_kib``, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return (peak - baseline_kib) * 1024


def current_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))


def test_200_mb_object_goes_up_in_parts_with_bounded_memory(cloud_env, cloud, layout, start_worker):
    """The logs archive holds 200 MB of incompressible data; a solo worker (the task runs in the
    process we measure) uploads it in the default 8 MiB parts, four at a time."""
    with open(layout["logs"] / "huge.log", "wb") as out:
        for _ in range(200):
            out.write(os.urandom(MIB))
    env = {
        **cloud_env,
        "COMPRESSION_ENABLED": "false",
        "BACKUP_UPLOAD_PART_SIZE_MB": "8",
        "BACKUP_UPLOAD_CONCURRENCY": "4",
    }
    worker = start_worker(env, concurrency=1, pool="solo")
    baseline = current_rss_kib(worker.process.pid)
    backup_id = backup_now(env)
    growth = peak_rss_growth(worker.process.pid, baseline)
    logs = storage_of(env).stat(f"{backup_id}_logs.tar")
    assert logs is not None and logs.size > 200 * MIB
    print(f"\n{cloud[0]}: peak RSS {growth / MIB:.1f} MiB above idle for a {logs.size / MIB:.0f} MiB object")
    assert growth < 100 * MIB, f"the worker grew {growth / MIB:.0f} MiB uploading {logs.size / MIB:.0f} MiB"
    provider, emulator = cloud
    if provider == "AWS_S3":  # the multipart ETag says how many parts went up
        from tests.emulators import s3_client

        bucket = env["BACKUP_STORAGE_PATH"].split("/")[2]
        head = s3_client(emulator).head_object(Bucket=bucket, Key=f"prod/vq/{backup_id}_logs.tar")
        assert head["ETag"].strip('"').endswith("-26")  # 25 parts of 8 MiB and a last one


def test_storage_stopped_mid_upload_retries_then_alerts_and_prune_clears(
    cloud_env, cloud, layout, start_worker, smtp
):
    """The emulator stops answering (SIGSTOP) once 15 MB of a 60 MB upload went through a proxy:
    the upload times out, is retried, fails; an email names the failure; no manifest exists; and
    once the store answers again, the next prune removes what the failed run left."""
    provider, emulator = cloud
    port, mailbox = smtp
    with open(layout["logs"] / "big.log", "wb") as out:
        for _ in range(60):
            out.write(os.urandom(MIB))
    proxy = CountingProxy(emulator.port, 15 * MIB, emulator.freeze)
    bucket = cloud_env["BACKUP_STORAGE_PATH"].split("/")[3 if provider == "Azure_Blob" else 2]
    through_proxy = storage_env(provider, emulator, bucket, "prod/vq", endpoint=proxy.endpoint)
    env = {
        **cloud_env,
        **through_proxy,
        "COMPRESSION_ENABLED": "false",
        "BACKUP_STORAGE_TIMEOUT": "2",
        "BACKUP_STORAGE_RETRIES": "2",
        "BACKUP_RETRY_MAX": "1",
        "BACKUP_RETRY_BACKOFF": "1",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "BACKUP_ALERT_EMAIL": "oncall@example.com",
    }
    worker = start_worker(env)
    try:
        made = run_cli(env, "run", "--wait", timeout=300)
        messages = mailbox.wait_for(1, timeout=120)
    finally:
        emulator.thaw()
        proxy.close()
    assert proxy.sent >= 15 * MIB
    assert made.returncode == 1, made.stdout + made.stderr
    assert "FAILED finalize" in made.stderr
    assert "will retry" in worker.log_text() or "Retry in" in worker.log_text()
    assert len(messages) == 1 and "FAILED" in messages[0]["Subject"]
    assert provider in messages[0].get_content()  # the error names the provider

    direct = {**cloud_env, "BACKUP_UPLOAD_PART_SIZE_MB": "5"}  # the emulator itself, not the proxy
    storage = storage_of(direct)
    assert not [n for n in names_in(storage) if n.endswith("_manifest.json")]
    pruned = run_cli(direct, "prune")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert names_in(storage) == []


def wrong_credentials(provider: str, emulator: Emulator, tmp_path: Path) -> dict[str, str]:
    """Settings with credentials the store refuses (GCS emulators take anyone: a key file that is
    no key fails before a request is made)."""
    if provider == "AWS_S3":
        return {"AWS_SECRET_ACCESS_KEY": "wrong-secret-key"}
    if provider == "Azure_Blob":
        return {"AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(emulator.endpoint, "d3Jvbmc=")}
    key_file = tmp_path / "key.json"
    key_file.write_text('{"type": "service_account", "private_key": "not a key"}')
    return {"GOOGLE_APPLICATION_CREDENTIALS": str(key_file), "STORAGE_EMULATOR_HOST": ""}


def test_wrong_credentials_fail_at_once_with_a_clear_message(cloud_env, cloud, start_worker, smtp, tmp_path):
    provider, emulator = cloud
    port, mailbox = smtp
    wrong = wrong_credentials(provider, emulator, tmp_path)
    env = {
        **cloud_env,
        **wrong,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "BACKUP_ALERT_EMAIL": "oncall@example.com",
    }
    worker = start_worker(env)
    made = run_cli(env, "run", "--wait", timeout=120)
    assert made.returncode == 1, made.stdout + made.stderr
    variable = {
        "AWS_S3": "AWS_SECRET_ACCESS_KEY",
        "Azure_Blob": "AZURE_STORAGE_CONNECTION_STRING",
        "Google_Cloud": "GOOGLE_APPLICATION_CREDENTIALS",
    }[provider]
    assert variable in made.stderr and provider in made.stderr, made.stderr
    messages = mailbox.wait_for(1)
    assert len(messages) == 1 and variable in messages[0].get_content()
    assert "will retry" not in worker.log_text() and "Retry in" not in worker.log_text()  # no retry storm
    for secret in ("wrong-secret-key", "d3Jvbmc="):
        assert secret not in made.stderr + worker.log_text() + messages[0].get_content()
