"""The whole backup through real worker processes, PostgreSQL, Redis and an SMTP server."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.integration.conftest import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    fill_database,
    pg_connect,
    redis_value,
    run_cli,
)
from tests.servers import free_port, start_redis
from vq_tasks.cli.run import unsubscribe
from vq_tasks.manifest import TAR_SUFFIX
from vq_tasks.streams.readers import HashingReader, decompressing, open_tar_stream

pytestmark = pytest.mark.integration
SECRETS = ("db-secret-pw", "redis-secret-pw", "broker-secret-pw")


def stored_files(storage: Path) -> list[str]:
    return sorted(p.name for p in storage.iterdir()) if storage.exists() else []


def command_digest(tool: str, path: Path) -> str:
    return subprocess.run([tool, str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


def run_backup(env) -> tuple[str, subprocess.CompletedProcess]:
    result = run_cli(env, "run", "--wait")
    backup_id = result.stdout.strip().splitlines()[-1] if result.returncode == 0 else ""
    return backup_id, result


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_full_backup_is_complete_checked_and_restorable(
    base_env, database, source_redis, layout, start_worker, tmp_path, compression
):
    base_env = {**base_env, "COMPRESSION_ALGORITHM": compression}
    suffix = TAR_SUFFIX[compression]
    expected_rows = fill_database(database)
    old_debris = layout["storage"] / "virtualqueue_backup_20000101_000000.tar.gz"
    layout["storage"].mkdir(parents=True)
    old_debris.write_bytes(b"left by a crashed run")
    worker = start_worker(base_env)

    backup_id, result = run_backup(base_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "database staged" in result.stdout  # the progress display

    storage = layout["storage"]
    bundle, logs, manifest_file = (
        storage / f"{backup_id}{s}" for s in (suffix, f"_logs{suffix}", "_manifest.json")
    )
    manifest = json.loads(manifest_file.read_text())
    assert manifest["status"] == "complete" and manifest["kind"] == "manual"
    assert manifest["compression"] == compression

    # The bundle lists with tar -tzf (tar --zstd -tf, zstd -dc | tar -t), and every stored file's
    # checksums match md5sum/sha256sum.
    members = ["database.sql", "globals.sql", "redis.rdb", f"config{suffix}"]
    flag = ["-z"] if compression == "gzip" else ["--zstd"]
    listing = subprocess.run(["tar", *flag, "-tf", str(bundle)], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == members
    if compression == "zstd":
        plain = subprocess.run(["zstd", "-dc", str(bundle)], capture_output=True, check=True).stdout
        listing = subprocess.run(["tar", "-t"], input=plain, capture_output=True, check=True)
        assert listing.stdout.decode().split() == members
    for entry in manifest["files"]:
        path = storage / entry["name"]
        assert entry["size"] == path.stat().st_size
        assert entry["md5"] == command_digest("md5sum", path)
        assert entry["sha256"] == command_digest("sha256sum", path)

    extracted = tmp_path / "extracted"
    with open_tar_stream(bundle) as tar:
        # the data filter where Python has one (3.11.4+): the bundle holds plain files either way
        tar.extractall(extracted, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    for name, component in manifest["components"].items():
        member = extracted / component["member"] if name != "logs" else logs
        content = member.read_bytes() if name != "logs" else _unpacked(member)
        assert hashlib.sha256(content).hexdigest() == component["content"]["sha256"], name
        assert len(content) == component["content"]["size"], name

    _check_database_restores(extracted / "database.sql", expected_rows, manifest)
    _check_rdb_loads(extracted / "redis.rdb", source_redis, tmp_path, manifest)
    _check_config_archive(extracted / f"config{suffix}", layout)
    with open_tar_stream(logs) as tar:
        names = tar.getnames()
    assert any(n.endswith("log/virtualqueue/app.log") for n in names)
    assert not any(n.endswith("app.log.10") for n in names)  # older than the 7-day window

    assert not (layout["staging"] / backup_id).exists()  # staging cleaned
    deadline = time.monotonic() + 30
    while old_debris.exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # prune was enqueued by finalize
    assert not old_debris.exists()

    listed = run_cli(base_env, "list")
    assert backup_id in listed.stdout and "complete" in listed.stdout
    shown = run_cli(base_env, "show", backup_id)
    assert "public.tickets=500" in shown.stdout

    everything = worker.log_text() + result.stdout + result.stderr + manifest_file.read_text() + shown.stdout
    for secret in SECRETS:
        assert secret not in everything


def _unpacked(path: Path) -> bytes:
    """The content of a gzip or zstd file, read as the restore reads it."""
    with open(path, "rb") as raw:
        compression = "gzip" if path.name.endswith(".gz") else "zstd"
        return decompressing(HashingReader(raw), compression).read()


def _check_database_restores(sql: Path, expected_rows: dict[str, int], manifest: dict) -> None:
    facts = manifest["components"]["database"]["facts"]
    assert facts["tables"] == expected_rows
    assert facts["complete"] is True
    target = f"vq_restore_{int(time.time() * 1000)}"
    with pg_connect() as conn:
        conn.execute(f'CREATE DATABASE "{target}"')
    try:
        subprocess.run(
            [
                "psql",
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-h",
                PG_HOST,
                "-p",
                str(PG_PORT),
                "-U",
                PG_USER,
                "-d",
                target,
                "-f",
                str(sql),
            ],
            check=True,
            capture_output=True,
        )
        with pg_connect(target) as conn:
            for table, rows in expected_rows.items():
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == rows, table
    finally:
        with pg_connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')


def _check_rdb_loads(rdb: Path, source, tmp_path: Path, manifest: dict) -> None:
    facts = manifest["components"]["redis"]["facts"]
    assert facts["keys"] == {"0": 8, "1": 8}
    assert facts["crc64_checked"] is True
    with start_redis(tmp_path / "loaded", rdb_file=rdb) as loaded:
        for db in (0, 1):
            original, copy = source.client(db), loaded.client(db)
            keys = sorted(original.keys("*"))
            assert sorted(copy.keys("*")) == keys
            for key in keys:
                assert redis_value(copy, key) == redis_value(original, key)
            assert 3500 < copy.ttl(f"session:{db}") <= 3600


def _check_config_archive(archive: Path, layout: dict[str, Path]) -> None:
    with open_tar_stream(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
    root = str(layout["config"]).lstrip("/")
    assert members[f"{root}/current.yaml"].issym()
    assert members[f"{root}/current.yaml"].linkname == "app.yaml"
    assert stat.S_IMODE(members[f"{root}/conf.d/tls.conf"].mode) == 0o640
    assert members[f"{root}/app.yaml"].isfile()


def test_unreachable_postgres_fails_cleanly_and_emails(base_env, layout, start_worker, smtp):
    port, mailbox = smtp
    env = {
        **base_env,
        "DB_PORT": str(free_port()),
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "BACKUP_ALERT_EMAIL": "oncall@example.com",
        "BACKUP_ALERT_ON_FAILURE": "true",
    }
    worker = start_worker(env)

    _, result = run_backup(env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert "FAILED database" in result.stderr and "unreachable" in result.stderr

    assert stored_files(layout["storage"]) == []  # no manifest, no bundle, nothing
    assert not any(layout["staging"].iterdir()) if layout["staging"].exists() else True
    messages = mailbox.wait_for(1)
    assert len(messages) == 1
    mail = messages[0]
    assert mail["To"] == "oncall@example.com"
    assert "FAILED" in mail["Subject"] and "database" in mail["Subject"]
    body = mail.get_content()
    assert "virtualqueue_backup_" in body and "Failed: database" in body
    assert "unreachable" in body
    assert "will retry" in worker.log_text()  # transient: retried with backoff first
    for secret in SECRETS:
        assert secret not in body + worker.log_text() + result.stderr


def test_two_backups_at_once_make_exactly_one(base_env, database, layout, start_worker, monkeypatch):
    fill_database(database, customers=50)
    start_worker(base_env, concurrency=4)
    for name, value in base_env.items():
        monkeypatch.setenv(name, value)
    from vq_tasks.settings import load_settings
    from vq_tasks.worker.app import create_app

    client = create_app(load_settings())
    first = client.send_task("vq_tasks.backup", kwargs={"origin": "cli"})
    second = client.send_task("vq_tasks.backup", kwargs={"origin": "cli"})
    outcomes = []
    for result in (first, second):
        deadline = time.monotonic() + 60
        while not result.ready() and time.monotonic() < deadline:
            time.sleep(0.2)
        outcome = result.result
        outcomes.append(str(outcome) if isinstance(outcome, BaseException) else outcome["backup_id"])
        unsubscribe(result)
    client.close()
    refused = [o for o in outcomes if "already running" in o]
    started = [o for o in outcomes if o.startswith("virtualqueue_backup_")]
    assert len(refused) == 1 and len(started) == 1, outcomes
    deadline = time.monotonic() + 120
    manifest = layout["storage"] / f"{started[0]}_manifest.json"
    while not manifest.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [n for n in stored_files(layout["storage"]) if n.endswith("_manifest.json")] == [manifest.name]


def test_uncompressed_backup_stores_plain_tar(base_env, database, layout, start_worker):
    fill_database(database, customers=20)
    env = {**base_env, "COMPRESSION_ENABLED": "false"}
    start_worker(env)
    backup_id, result = run_backup(env)
    assert result.returncode == 0, result.stderr
    names = stored_files(layout["storage"])
    assert names == sorted([f"{backup_id}.tar", f"{backup_id}_logs.tar", f"{backup_id}_manifest.json"])
    listing = subprocess.run(
        ["tar", "-tf", str(layout["storage"] / f"{backup_id}.tar")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listing.stdout.split() == ["database.sql", "globals.sql", "redis.rdb", "config.tar"]


def test_missing_database_is_permanent_and_not_retried(base_env, layout, start_worker, smtp):
    port, mailbox = smtp
    env = {
        **base_env,
        "DB_NAME": "vq_no_such_database",
        "BACKUP_RETRY_MAX": "3",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "BACKUP_ALERT_EMAIL": "oncall@example.com",
    }
    worker = start_worker(env)
    _, result = run_backup(env)
    assert result.returncode == 1
    assert 'database "vq_no_such_database" does not exist' in result.stderr
    assert "will retry" not in worker.log_text()
    assert "vq_no_such_database" in mailbox.wait_for(1)[0].get_content()
    assert stored_files(layout["storage"]) == []
