"""The operators' guide's commands, kept as wrappers (compose/scripts, /scripts in the image), run
for real: backup.sh takes a backup through a real worker; restore.sh FILE prints the plan and
changes nothing; restore.sh FILE --force brings the database and Redis back; bad arguments exit 2
with the usage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import fill_database, pg_connect
from tests.servers import redis_server_binary

pytestmark = pytest.mark.integration
SCRIPTS = Path(__file__).resolve().parents[2] / "compose" / "scripts"
BACKUP_SH, RESTORE_SH = SCRIPTS / "backup.sh", SCRIPTS / "restore.sh"
SECRETS = ("db-secret-pw", "redis-secret-pw", "broker-secret-pw")


def wrapper(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run a wrapper as `docker exec backup-service /scripts/NAME ARGS` would: by its path, with
    the image's tools (here the venv's vq-backup) on PATH and no terminal."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        [str(script), *args],
        env={**os.environ, **env, "PATH": path},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )


def row_counts(database: str) -> dict[str, int]:
    with pg_connect(database) as conn:
        tables = conn.execute(
            "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables"
        ).fetchall()
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for (t,) in sorted(tables)}


@pytest.fixture
def env(base_env) -> dict[str, str]:
    return {**base_env, "REDIS_SERVER_BIN": redis_server_binary()}


def test_the_wrappers_are_executable_shell_scripts():
    for script in (BACKUP_SH, RESTORE_SH):
        assert os.access(script, os.X_OK), f"{script} is not executable"
        assert script.read_text().startswith("#!/bin/sh\n")
        done = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "FILE is missing"),
        (("--force",), "FILE is missing"),
        (("--yes", "virtualqueue_backup_20240115_020000.tar.gz"), "unknown option --yes"),
        (("a.tar.gz", "b.tar.gz"), "more than one FILE given"),
        (("notes.txt",), "notes.txt is not a backup file name or id"),
        (("virtualqueue_backup_2024011_020000.tar.gz",), "is not a backup file name or id"),
    ],
)
def test_restore_sh_explains_its_usage_and_exits_2_on_bad_arguments(args, message):
    done = wrapper(RESTORE_SH, {}, *args)  # refused before anything is read or started
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "usage: " in done.stderr and "FILE [--force]" in done.stderr
    assert done.stdout == ""


def test_help_of_both_wrappers():
    for script in (BACKUP_SH, RESTORE_SH):
        done = wrapper(script, {}, "--help")
        assert done.returncode == 0 and done.stdout.startswith("usage: "), done.stderr


def test_backup_sh_then_restore_sh_plan_and_force(
    env, database, derived_databases, source_redis, layout, start_worker
):
    expected = fill_database(database, customers=120)
    start_worker(env)

    made = wrapper(BACKUP_SH, env)
    assert made.returncode == 0, made.stdout + made.stderr
    backup_id = made.stdout.strip().splitlines()[-1]
    bundle = layout["storage"] / f"{backup_id}.tar.gz"
    assert bundle.is_file() and (layout["storage"] / f"{backup_id}_manifest.json").is_file()
    assert "database" in made.stdout and "redis" in made.stdout  # each component's progress

    # Without --force: the plan, for the bundle's path, its name, the manifest's name, its id.
    before = row_counts(database), source_redis.client(0).get("queue:0:counter")
    for file in (str(bundle), bundle.name, f"{backup_id}_manifest.json", backup_id, "latest"):
        planned = wrapper(RESTORE_SH, env, file)
        assert planned.returncode == 0, planned.stdout + planned.stderr
        assert f"verifying {backup_id}" in planned.stdout, file
        assert "nothing was changed" in planned.stdout
    assert (row_counts(database), source_redis.client(0).get("queue:0:counter")) == before

    with pg_connect(database) as conn:
        conn.execute("DELETE FROM events")
    source_redis.client(0).delete("queue:0:counter")
    source_redis.client(0).set("added:after", "x")
    assert row_counts(database)["public.events"] == 0

    restored = wrapper(RESTORE_SH, env, bundle.name, "--force")  # no terminal: no question asked
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"{backup_id}: restored database, redis, config" in restored.stdout
    assert "integrity OK" in restored.stdout
    assert row_counts(database) == expected
    assert source_redis.client(0).get("queue:0:counter") == b"42"
    assert source_redis.client(0).get("added:after") is None

    missing = wrapper(RESTORE_SH, env, "virtualqueue_backup_19990101_000000.tar.gz", "--force")
    assert missing.returncode == 1 and "no complete backup" in missing.stderr
    for done in (made, planned, restored, missing):
        for secret in SECRETS:
            assert secret not in done.stdout + done.stderr
