"""The off-site copy from a Local primary to S3 (credentials under BACKUP_OFFSITE_ names) through a
real worker, and `vq-backup storage-check` on working and broken destinations."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.emulators import create_bucket, storage_env
from tests.integration.conftest import run_cli
from tests.integration.test_cloud_backup import backup_now, names_in, storage_of
from vq_tasks.manifest import manifest_name

pytestmark = pytest.mark.integration


def offsite_env(s3, bucket: str, **overrides: str) -> dict[str, str]:
    """BACKUP_OFFSITE_* settings for a prefix of ``bucket`` in moto, as an operator writes them."""
    env = {f"BACKUP_OFFSITE_{k.removeprefix('BACKUP_STORAGE_')}": v for k, v in storage_env(
        "AWS_S3", s3, bucket, "dr/vq").items()}  # fmt: skip
    return {**env, **overrides}


@pytest.fixture
def s3_bucket(s3) -> str:
    name = f"vq-test-{uuid.uuid4().hex[:8]}"
    create_bucket("AWS_S3", s3, name)
    return name


def test_every_backup_is_copied_off_site_and_verifies_there(base_env, s3, s3_bucket, start_worker):
    env = {**base_env, **offsite_env(s3, s3_bucket)}
    assert "BACKUP_OFFSITE_AWS_SECRET_ACCESS_KEY" in env and "AWS_SECRET_ACCESS_KEY" not in env
    worker = start_worker(env)
    backup_id = backup_now(env)
    offsite = storage_of(env, "offsite")
    deadline = time.monotonic() + 60
    while offsite.stat(manifest_name(backup_id)) is None:
        assert time.monotonic() < deadline, worker.log_text()[-3000:]
        time.sleep(0.2)
    assert names_in(offsite) == sorted(
        f"{backup_id}{s}" for s in (".tar.gz", "_logs.tar.gz", "_manifest.json")
    )
    listed = run_cli(env, "list", "--offsite")
    assert backup_id in listed.stdout and "complete" in listed.stdout, listed.stdout + listed.stderr
    verified = run_cli(env, "verify", "latest", "--offsite")
    assert verified.returncode == 0 and "all OK" in verified.stdout, verified.stdout + verified.stderr
    assert "copied off-site" in worker.log_text()
    assert env["BACKUP_OFFSITE_AWS_SECRET_ACCESS_KEY"] not in worker.log_text()


def test_storage_check_passes_on_working_destinations(base_env, s3, s3_bucket):
    env = {**base_env, **offsite_env(s3, s3_bucket)}
    checked = run_cli(env, "storage-check", "--size-kib", str(12 << 10))  # 12 MiB: in parts
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for role in ("primary", "offsite"):
        for step in ("open", "list", "write", "read", "delete"):
            assert any(line.split()[:3] == [role, step, "OK"] for line in checked.stdout.splitlines()), (
                role,
                step,
                checked.stdout,
            )
    assert names_in(storage_of(env, "offsite")) == []  # the probe is gone
    assert "every destination is reachable" in checked.stdout


def test_storage_check_names_the_fix_when_broken(base_env, s3, s3_bucket):
    env = {**base_env, **offsite_env(s3, s3_bucket, BACKUP_OFFSITE_AWS_SECRET_ACCESS_KEY="not-the-key")}
    checked = run_cli(env, "storage-check")
    assert checked.returncode == 1
    offsite_lines = [line for line in checked.stdout.splitlines() if line.startswith("offsite")]
    assert any(" list " in line and "FAILED" in line for line in offsite_lines), checked.stdout
    assert "AWS_SECRET_ACCESS_KEY" in checked.stdout and "not-the-key" not in checked.stdout
    missing = {**base_env, **offsite_env(s3, "vq-no-such-bucket")}
    checked = run_cli(missing, "storage-check")
    assert checked.returncode == 1 and "vq-no-such-bucket does not exist" in checked.stdout, checked.stdout
