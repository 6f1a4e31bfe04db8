"""Immutable backups on S3 Object Lock, against moto's S3 server: what an attacker holding the
workers' own credentials can do to a locked backup (delete a version, overwrite, hide it behind a
delete marker) changes nothing that is listed, verified or restored; verify reports it, alerts
and counts it; prune leaves locked objects for later without failing; a bucket without Object
Lock stops the worker at start-up and fails storage-check with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import ClientError

from tests.emulators import s3_client, storage_env
from tests.integration.conftest import fill_database, pg_connect, run_cli
from tests.integration.test_cloud_backup import backup_now, storage_of
from vq_tasks import coordination
from vq_tasks.manifest import bundle_name, manifest_name
from vq_tasks.retention.prune import prune_all
from vq_tasks.settings import load_settings
from vq_tasks.storage.base import ObjectLocked

pytestmark = pytest.mark.integration
DAY = timedelta(days=1)


def locked_bucket(s3) -> str:
    name = f"vq-lock-{uuid.uuid4().hex[:8]}"
    s3_client(s3).create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


@pytest.fixture
def locked_env(base_env, s3, smtp) -> dict[str, str]:
    port, _ = smtp
    return {
        **base_env,
        **storage_env("AWS_S3", s3, locked_bucket(s3), "vq"),
        "BACKUP_IMMUTABILITY": "true",
        "BACKUP_RETENTION_DAYS": "2",
        "BACKUP_LOGS_RETENTION_DAYS": "1",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "BACKUP_ALERT_EMAIL": "ops@example.com",
    }


def settings_of(env: dict[str, str]):
    return load_settings(**{k.lower(): v for k, v in env.items()})


def attacker(s3, env: dict[str, str]):
    """A boto3 client with the workers' own credentials: what a stolen key can do."""
    return s3_client(
        s3, aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]
    )


def key_of(env: dict[str, str], name: str) -> tuple[str, str]:
    bucket, prefix = env["BACKUP_STORAGE_PATH"].removeprefix("s3://").split("/", 1)
    return bucket, f"{prefix}/{name}"


def test_a_locked_backup_survives_its_workers_credentials(locked_env, s3, smtp, start_worker, database):
    env = locked_env
    rows = fill_database(database)
    start_worker(env)
    backup_id = backup_now(env)
    storage = storage_of(env)
    manifest = json.loads(storage.read_bytes(manifest_name(backup_id)))
    assert manifest["locks"]["mode"] == "governance"
    promised = datetime.fromisoformat(manifest["locks"]["until"])
    started = datetime.fromisoformat(manifest["started_at"])
    assert promised == started + 2 * DAY  # a manual backup: the daily tier only
    assert datetime.fromisoformat(manifest["locks"]["logs_until"]) == started + DAY
    bundle = bundle_name(backup_id, "gzip")
    for name in (manifest_name(backup_id), bundle):
        until = storage.retention(name)
        assert until is not None and until >= promised - timedelta(seconds=1), (name, until)

    client = attacker(s3, env)
    bucket, bundle_key = key_of(env, bundle)
    original = client.list_object_versions(Bucket=bucket, Prefix=bundle_key)["Versions"][0]["VersionId"]
    with pytest.raises(ClientError) as denied:  # deleting the locked version itself is refused
        client.delete_object(Bucket=bucket, Key=bundle_key, VersionId=original)
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ObjectLocked) as locked:  # and so is our own prune's delete
        storage.delete(bundle)
    assert locked.value.until is not None and locked.value.until >= promised - timedelta(seconds=1)

    time.sleep(1.1)  # moto's times are to the second: tampering comes after the commit's second
    client.delete_object(Bucket=bucket, Key=bundle_key)  # a delete marker hides the bundle
    _, manifest_key = key_of(env, manifest_name(backup_id))
    client.put_object(Bucket=bucket, Key=manifest_key, Body=b'{"forged": true}')  # overwritten
    assert client.list_objects_v2(Bucket=bucket, Prefix=bundle_key).get("KeyCount") == 0

    listed = run_cli(env, "list")
    assert backup_id in listed.stdout and "complete" in listed.stdout, listed.stdout + listed.stderr
    verified = run_cli(env, "verify", backup_id)
    assert verified.returncode == 1, verified.stdout + verified.stderr
    assert "hidden by a delete marker" in verified.stdout and "overwritten" in verified.stdout, (
        verified.stdout
    )
    assert f"{backup_id}: 2 of " in verified.stdout, verified.stdout  # those two, the checksums hold
    _, mailbox = smtp
    mails = mailbox.wait_for(1)
    assert mails and "BACKUP TAMPERED WITH" in mails[0]["Subject"], [m["Subject"] for m in mails]
    audit = (settings_of(env).backup_audit_log).read_text()
    assert '"operation": "integrity"' in audit and "tampered" in audit
    counters = coordination.read_counters(coordination.client(settings_of(env)))
    assert counters.get("integrity:tampered") == 1, counters

    with pg_connect(database) as conn:
        conn.execute("DELETE FROM events; DELETE FROM tickets; DELETE FROM customers")
    restored = run_cli(env, "restore", backup_id, "--force", "--yes", "--component", "database")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    with pg_connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] == rows["public.customers"]


def test_prune_leaves_locked_backups_for_later_without_failing(locked_env, start_worker, caplog):
    env = locked_env
    start_worker(env)
    older = backup_now(env)
    backup_now(env)  # the newest is never deleted: the older one is what prune wants
    settings = settings_of(env)
    later = datetime.now(UTC) + 3 * DAY  # past retention, but the store's clock says locked
    first = prune_all(settings, now=later, say=lambda line: None)
    assert first.ok, first.failures()
    primary = first.destinations[0]
    assert [lock.deletion.name for lock in primary.locked] == [manifest_name(older)]
    assert primary.deletions == [] and primary.expired_left == []
    assert storage_of(env).stat(manifest_name(older)) is not None  # nothing of it went
    warned = [r for r in caplog.records if "not yet deletable" in r.getMessage()]
    caplog.clear()
    again = prune_all(settings, now=later, say=lambda line: None)
    assert again.ok and len(again.destinations[0].locked) == 1
    assert len(warned) == 1 and not [
        r for r in caplog.records if r.levelname == "WARNING" and "not yet" in r.getMessage()
    ]


def test_a_bucket_without_object_lock_is_refused_with_the_fix(base_env, s3):
    plain = f"vq-plain-{uuid.uuid4().hex[:8]}"
    s3_client(s3).create_bucket(Bucket=plain)
    env = {**base_env, **storage_env("AWS_S3", s3, plain, "vq"), "BACKUP_IMMUTABILITY": "true"}
    checked = run_cli(env, "storage-check")
    assert checked.returncode == 1
    assert any(line.split()[:3] == ["primary", "locks", "FAILED"] for line in checked.stdout.splitlines()), (
        checked.stdout
    )
    assert "has no Object Lock" in checked.stdout and "put-object-lock-configuration" in checked.stdout
    worker = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "vq_tasks",
            "worker",
            "--pool=solo",
            "--without-gossip",
            "--without-mingle",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode != 0, worker.stdout + worker.stderr
    assert "has no Object Lock" in worker.stdout + worker.stderr


def test_the_off_site_copy_is_locked_as_its_manifest_promises(base_env, s3, start_worker):
    offsite = storage_env("AWS_S3", s3, locked_bucket(s3), "dr")
    env = {
        **base_env,
        **{f"BACKUP_OFFSITE_{k.removeprefix('BACKUP_STORAGE_')}": v for k, v in offsite.items()},
        "BACKUP_IMMUTABILITY": "true",
    }
    start_worker(env)
    backup_id = backup_now(env)
    primary, copy = storage_of(env), storage_of(env, "offsite")
    assert all(not (primary.root / o.name).stat().st_mode & 0o222 for o in primary.list())  # Local: read-only
    deadline = time.monotonic() + 60
    while copy.stat(manifest_name(backup_id)) is None:
        assert time.monotonic() < deadline, "no off-site copy"
        time.sleep(0.2)
    promised = json.loads(copy.read_bytes(manifest_name(backup_id)))["locks"]
    for stored in copy.list():
        until = promised["logs_until" if "_logs" in stored.name else "until"]
        assert copy.retention(stored.name) >= datetime.fromisoformat(until) - timedelta(seconds=1), (
            stored.name
        )
    verified = run_cli(env, "verify", backup_id, "--offsite")
    assert verified.returncode == 0 and "all OK" in verified.stdout, verified.stdout + verified.stderr
