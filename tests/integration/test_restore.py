"""Restore of a real backup made by a real worker: `vq-backup restore` without --force changes
nothing and prints the plan; the vq_tasks.restore task with force brings the database, Redis and
config files back and checks them; a corrupted bundle, an unknown id, `../x`, a running restore
and an unconfirmed restore are refused with nothing changed; `vq-backup extract` writes a checked
component."""

from __future__ import annotations

import hashlib
import json
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import fill_database, pg_connect, redis_value, run_backup, run_cli
from tests.servers import RedisServer, redis_server_binary
from vq_tasks.cli.run import unsubscribe

pytestmark = pytest.mark.integration
SECRETS = ("db-secret-pw", "redis-secret-pw", "broker-secret-pw")
TABLES = ("public.queues", "public.customers", "public.tickets", "public.events")


@pytest.fixture
def env(base_env) -> dict[str, str]:
    """The backup's settings, and the redis-server of the target's version for the restore."""
    return {**base_env, "REDIS_SERVER_BIN": redis_server_binary()}


def make_backup(env: dict[str, str], storage: Path) -> tuple[str, dict[str, Any]]:
    backup_id = run_backup(env)
    return backup_id, json.loads((storage / f"{backup_id}_manifest.json").read_text())


def call_restore(env: dict[str, str], monkeypatch, **kwargs: Any) -> Any:
    """Send vq_tasks.restore to the worker; return its result or the exception it failed with."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from vq_tasks.settings import load_settings
    from vq_tasks.worker.app import create_app

    client = create_app(load_settings())
    result = client.send_task("vq_tasks.restore", kwargs=kwargs)
    deadline = time.monotonic() + 240
    while not result.ready() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert result.ready(), "no worker ran vq_tasks.restore"
    outcome = result.result
    unsubscribe(result)
    client.close()
    return outcome


def row_counts(database: str) -> dict[str, int]:
    with pg_connect(database) as conn:
        tables = conn.execute(
            "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables ORDER BY 1"
        ).fetchall()
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for (t,) in tables}


def redis_contents(server: RedisServer) -> dict[int, dict[bytes, object]]:
    contents = {}
    for db in range(4):
        client = server.client(db)
        contents[db] = {key: redis_value(client, key) for key in client.keys("*")}
    return contents


def config_state(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under ``folder``: its mode and its content (or link target)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            content = f"-> {path.readlink()}"
        elif path.is_file():
            content = path.read_text()
        else:
            content = "folder"
        state[str(path.relative_to(folder))] = (stat.S_IMODE(st.st_mode), content)
    return state


def other_databases(database: str) -> list[str]:
    with pg_connect() as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (f"{database}_",)
        ).fetchall()
    return [name for (name,) in rows]


def snapshot(database: str, server: RedisServer, config: Path) -> tuple:
    return row_counts(database), redis_contents(server), config_state(config), other_databases(database)


def change_everything(database: str, server: RedisServer, config: Path) -> None:
    with pg_connect(database) as conn:
        conn.execute("DELETE FROM events WHERE id % 2 = 0")
        conn.execute("INSERT INTO queues (name) VALUES ('added after the backup')")
        conn.execute("CREATE TABLE added_later (id int)")
    db0, db1 = server.client(0), server.client(1)
    db0.delete("queue:0:counter", f"ticket:{0}:1")
    db0.set("open:0", "a string where the backup has a set")
    db0.set("extra:0", "not in the backup")
    db1.flushdb()
    server.client(3).set("db3:only", "x")
    (config / "app.yaml").write_text("queues: 99\n")
    (config / "conf.d" / "tls.conf").chmod(0o600)
    (config / "current.yaml").unlink()


def test_plan_changes_nothing_then_a_forced_restore_brings_everything_back(
    env, database, derived_databases, source_redis, layout, start_worker, monkeypatch
):
    expected_rows = fill_database(database, customers=200)
    worker = start_worker(env)
    backup_id, manifest = make_backup(env, layout["storage"])
    assert manifest["components"]["database"]["facts"]["tables"] == expected_rows
    before = snapshot(database, source_redis, layout["config"])

    planned = run_cli(env, "restore", backup_id)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert f"verifying {backup_id}" in planned.stdout and "database.sql" in planned.stdout
    assert (
        f"database {database}: now 4 tables, 1003 rows; the backup has 4 tables, 1003 rows" in planned.stdout
    )
    assert "public.tickets: 200 rows now, 200 in the backup" in planned.stdout
    assert "the backup has db0=8, db1=8; replaced db0=8, db1=8" in planned.stdout
    assert "config: 2 files into /, 0 would change" in planned.stdout
    assert "nothing was changed" in planned.stdout
    assert snapshot(database, source_redis, layout["config"]) == before

    change_everything(database, source_redis, layout["config"])
    assert snapshot(database, source_redis, layout["config"]) != before
    outcome = call_restore(env, monkeypatch, backup_id="latest", force=True)
    assert isinstance(outcome, dict), outcome
    assert outcome["backup_id"] == backup_id and outcome["components"] == ["database", "redis", "config"]
    assert outcome["verify_ok"] and outcome["ok"] and outcome["integrity"]["ok"], outcome["integrity"]
    checks = {c["check"]: c for c in outcome["integrity"]["checks"]}
    assert set(checks) == {"database rows", "redis keys", "redis keys vs manifest", "config files"}
    assert all(c["ok"] for c in checks.values())

    counts, contents, config, others = snapshot(database, source_redis, layout["config"])
    assert counts == {t: expected_rows[t] for t in TABLES}
    assert contents == before[1]
    assert 3000 < source_redis.client(0).ttl("session:0") <= 3600
    assert config == before[2]
    previous = outcome["results"]["database"]["previous_name"]
    assert others == [previous] and previous.startswith(f"{database}_before_")
    assert row_counts(previous)["public.added_later"] == 0  # the replaced database, kept
    assert outcome["results"]["redis"]["removed"] == {"0": 1, "1": 0, "3": 1}
    assert not [p for p in layout["staging"].iterdir() if p.name.startswith(".restore-")]
    audit = [json.loads(line) for line in Path(env["BACKUP_AUDIT_LOG"]).read_text().splitlines()]
    restores = [line for line in audit if line["operation"] == "restore"]
    assert [line["outcome"] for line in restores] == ["succeeded"]  # the plan is no operation
    assert restores[0]["backup_id"] == backup_id and restores[0]["integrity"]["ok"]
    assert restores[0]["origin"] == "celery" and restores[0]["task_id"]
    everything = json.dumps(outcome) + worker.log_text() + planned.stdout + planned.stderr
    everything += Path(env["BACKUP_AUDIT_LOG"]).read_text()
    for secret in SECRETS:
        assert secret not in everything


def test_extract_and_every_refusal_leave_everything_as_it_was(
    env, database, derived_databases, source_redis, layout, start_worker, broker, tmp_path, monkeypatch
):
    fill_database(database, customers=50)
    start_worker(env)
    backup_id, manifest = make_backup(env, layout["storage"])

    dump = tmp_path / "dump.sql"
    extracted = run_cli(env, "extract", backup_id, "database.sql", "-o", str(dump))
    assert extracted.returncode == 0, extracted.stdout + extracted.stderr
    content = manifest["components"]["database"]["content"]
    assert hashlib.sha256(dump.read_bytes()).hexdigest() == content["sha256"]
    assert dump.stat().st_size == content["size"] and dump.stat().st_mode & 0o777 == 0o600
    again = run_cli(env, "extract", backup_id, "database.sql", "-o", str(dump))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr

    before = snapshot(database, source_redis, layout["config"])
    for bad in ("virtualqueue_backup_19990101_000000", "../x"):
        for args in (
            ("restore", bad, "--force", "--yes"),
            ("extract", bad, "redis.rdb", "-o", str(tmp_path / "y")),
        ):
            refused = run_cli(env, *args)
            assert refused.returncode == 1, refused.stdout
            assert "no complete backup" in refused.stderr or "not a backup id" in refused.stderr
            assert "Traceback" not in refused.stderr
    assert not (tmp_path / "y").exists()

    unconfirmed = run_cli(env, "restore", backup_id, "--force")  # no one types the id
    assert unconfirmed.returncode == 1 and "cancelled: nothing was changed" in unconfirmed.stderr
    assert "type the backup id to continue" in unconfirmed.stdout

    lock = broker.client(0)
    lock.set(
        "vq:restore:lock", "restore-other virtualqueue_backup_20240101_000000 2024-01-01T00:00:00", ex=60
    )
    busy = run_cli(env, "restore", backup_id, "--force", "--yes")
    assert busy.returncode == 1 and "a restore of virtualqueue_backup_20240101_000000" in busy.stderr
    lock.delete("vq:restore:lock")

    bundle = layout["storage"] / f"{backup_id}.tar.gz"
    with open(bundle, "r+b") as f:
        f.seek(bundle.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    corrupted = run_cli(env, "restore", backup_id, "--force", "--yes")
    assert corrupted.returncode == 1 and "failed verification, nothing was restored" in corrupted.stderr
    outcome = call_restore(env, monkeypatch, backup_id=backup_id, force=True)
    assert isinstance(outcome, Exception) and "failed verification" in str(outcome)
    assert f"{backup_id}.tar.gz cannot be read to its end" in str(outcome)
    assert snapshot(database, source_redis, layout["config"]) == before
    assert lock.get("vq:restore:lock") is None  # released after the refusal


def test_database_and_redis_restore_together_and_a_failure_names_what_was_restored(
    env, database, derived_databases, source_redis, layout, start_worker, tmp_path
):
    """The database and Redis are restored at the same time; Redis fails (REDIS_SERVER_BIN is no
    redis-server) while the database is restored: the message names both."""
    fill_database(database, customers=20)
    start_worker(env)
    backup_id, _ = make_backup(env, layout["storage"])
    broken = {**env, "REDIS_SERVER_BIN": str(tmp_path / "no-redis-server")}
    args = ("restore", backup_id, "--force", "--yes", "--component", "database", "--component", "redis")
    failed = run_cli(broken, *args)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "redis restore failed" in failed.stderr and "restored: database" in failed.stderr, failed.stderr
    assert "restoring database" in failed.stdout and "restoring redis" in failed.stdout
