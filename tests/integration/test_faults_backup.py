"""Faults during a backup, each against real processes: the pool process running each step
SIGKILLed, a whole worker SIGKILLed, PostgreSQL ending pg_dump's session, the application's Redis
restarted mid-transfer or down, the staging disk full, the storage gone mid-upload and back.

Each test checks which of the two allowed outcomes it ended in: one complete backup (its manifest,
the files it lists, staging cleaned, one success mail and no alert), or a clear failure (one alert
naming it, nothing stored, staging cleaned). docs/RELIABILITY.md lists them with what was lost.
The broker and beat faults are in test_faults.py, the restore's in test_faults_restore.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import Worker, fill_database, pg_connect, run_cli
from tests.integration.test_faults import (
    MIB,
    assert_clear_failure,
    assert_one_complete_backup,
    mail_env,
    pg_dumps_waiting,
    restart_server,
    start_run,
    stored,
    table_locked,
    wait_until,
)
from tests.servers import free_port, tmpfs

pytestmark = pytest.mark.integration
STEPS = [("dump_database", "dump_redis"), ("archive_config", "archive_logs"), ("finalize_backup",)]
COMPONENT_OF = {
    "dump_database": "database",
    "dump_redis": "redis",
    "archive_config": "config",
    "archive_logs": "logs",
}


def pool_children(worker: Worker) -> list[psutil.Process]:
    return psutil.Process(worker.process.pid).children()


def holding(process: psutil.Process, predicate: Callable[[Path], bool]) -> bool:
    try:
        return any(predicate(Path(f.path)) for f in process.open_files())
    except psutil.Error:
        return False


def child_holding(worker: Worker, predicate: Callable[[Path], bool]) -> psutil.Process | None:
    """The pool process of ``worker`` that has a file open that ``predicate`` accepts."""
    return next((child for child in pool_children(worker) if holding(child, predicate)), None)


def staging_temporary(component: str) -> Callable[[Path], bool]:
    """The hidden temporary file a dump task writes its part into (staging.stage_part)."""
    return lambda path: path.name.startswith(f".{component}.") and path.name.endswith(".tmp")


def storage_partial(path: Path) -> bool:
    """The hidden partial file Local storage writes an object into (storage/local.py)."""
    return ".partial-" in path.name


# ---- a pool process SIGKILLed in the middle of each step ------------------------------------------


def big_text_file(path: Path, size: int) -> None:
    """Write ``size`` bytes of text that compresses slowly (base64 of random bytes)."""
    import base64

    with open(path, "wb") as out:
        for _ in range(size // MIB):
            out.write(base64.b64encode(os.urandom(MIB * 3 // 4)))


@pytest.mark.parametrize("steps", STEPS, ids="+".join)
def test_a_pool_process_killed_in_each_step_is_redelivered_and_one_backup_is_made(
    steps, base_env, database, source_redis, layout, start_worker, smtp, tmp_path
):
    """Fault: the pool processes running ``steps`` are SIGKILLed half way (two at once, one in
    each of the worker's two pool processes): pg_dump waiting on a table lock and the
    application's Redis stopped (SIGSTOP) before it answers SYNC; 24 MB of config and of logs
    being compressed; the bundle being written to the storage. Expected: the worker's main
    process sees each child lost and requeues its message at once (acks_late,
    reject_on_worker_lost); new pool processes run the steps again; the run ends with exactly
    one complete backup, one success mail, no alert, staging cleaned (a killed finalize leaves
    only a hidden partial file in the storage, which prune removes after its grace)."""
    fill_database(database, customers=50)
    env = {**base_env, **mail_env(smtp[0]), "COMPRESSION_THREADS": "1"}
    if "archive_config" in steps:
        big_text_file(layout["config"] / "big.yaml", 24 * MIB)
        big_text_file(layout["logs"] / "big.log", 24 * MIB)
    if "finalize_backup" in steps:
        (layout["config"] / "big.bin").write_bytes(os.urandom(40 * MIB))
        env["COMPRESSION_THREADS"] = "2"
    worker = start_worker(env)
    with table_locked(database) if "dump_database" in steps else contextlib.nullcontext():
        if "dump_redis" in steps:
            os.kill(source_redis.process.pid, signal.SIGSTOP)
        try:
            run = start_run(env, tmp_path)
            victims = [catch_finalize(worker, layout)] if "finalize_backup" in steps else []
            for step in steps if not victims else ():
                predicate = staging_temporary(COMPONENT_OF[step])
                found = wait_until(
                    lambda p=predicate: child_holding(worker, p), f"{step} never ran", every=0.01
                )
                found.suspend()  # held in the middle of its step while the other one is caught
                victims.append(found)
            for victim in victims:
                victim.kill()
            if "dump_database" in steps:  # the lost one's session still waits, and the new one
                wait_until(lambda: pg_dumps_waiting(database) == 2, "dump_database was not run again")
        finally:
            if "dump_redis" in steps:
                os.kill(source_redis.process.pid, signal.SIGCONT)
    code, output = run.finish()

    log = worker.log_text()
    assert code == 0, output + log
    assert log.count("WorkerLostError('Worker exited prematurely: signal 9") == len(steps), log
    for step in steps:
        assert log.count(f"vq_tasks.{step}[") >= 3, log  # received, received again, succeeded
    assert_one_complete_backup(layout, run.backup_id, smtp[1])
    wait_until(lambda: not pg_dumps_of(database), "the killed task's pg_dump never ended", timeout=20)
    partials = stored(layout, hidden=True)  # the killed finalize's unfinished write
    assert len(partials) == ("finalize_backup" in steps), partials


def pg_dumps_of(database: str) -> list[psutil.Process]:
    """The pg_dump processes dumping ``database`` (its name is on their command line)."""
    return [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "pg_dump" and database in (p.info["cmdline"] or [])
    ]


def catch_finalize(worker: Worker, layout: dict[str, Path]) -> psutil.Process:
    """Stop the pool processes as soon as a partial file appears in the storage; resume all but
    the one writing it, and return that one."""
    folder = layout["storage"]

    def partial_seen() -> bool:
        return folder.exists() and any(storage_partial(Path(e.name)) for e in os.scandir(folder))

    wait_until(partial_seen, "finalize_backup never wrote to the storage", every=0.002)
    children = pool_children(worker)
    for child in children:
        child.suspend()
    victim = next((c for c in children if holding(c, storage_partial)), None)
    for child in children:
        if child is not victim:
            child.resume()
    assert victim is not None, f"no pool process is writing to the storage: {os.listdir(folder)}"
    return victim


# ---- PostgreSQL and the application's Redis ---------------------------------------------------


def test_postgres_ending_the_dump_session_is_retried_and_one_backup_is_made(
    base_env, database, layout, start_worker, smtp, tmp_path
):
    """Fault: PostgreSQL ends pg_dump's session half way (pg_terminate_backend, as a server
    restart or a failover does to every session; the machine's shared server is not restarted).
    Expected: the dump fails as transient ("server closed the connection unexpectedly"), is
    retried after the backoff and succeeds; exactly one complete backup and one mail."""
    fill_database(database, customers=50)
    env = {**base_env, **mail_env(smtp[0])}
    worker = start_worker(env)
    with table_locked(database):
        run = start_run(env, tmp_path)
        wait_until(lambda: pg_dumps_waiting(database) == 1, "dump_database never ran")
        with pg_connect() as admin:
            ended = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND application_name = 'pg_dump'",
                (database,),
            ).fetchone()[0]
        assert ended == 1
    code, output = run.finish()
    assert code == 0, output + worker.log_text()
    assert "will retry" in worker.log_text() and "server closed the connection" in worker.log_text()
    assert_one_complete_backup(layout, run.backup_id, smtp[1])


def test_source_redis_restarted_mid_transfer_is_retried_and_one_backup_is_made(
    base_env, database, source_redis, layout, start_worker, smtp, tmp_path
):
    """Fault: the application's Redis dies (SIGKILL) while dump_redis waits for its RDB, and comes
    back at once on the same port with its data (its last save). Expected: the transfer fails as
    transient, is retried after the backoff against the restarted server and succeeds; exactly
    one complete backup whose RDB holds every key (8 in db0, 8 in db1), one mail."""
    fill_database(database, customers=50)
    source_redis.client().save()  # what it loads when it comes back
    env = {**base_env, **mail_env(smtp[0])}
    worker = start_worker(env)
    os.kill(source_redis.process.pid, signal.SIGSTOP)  # the transfer waits: caught half way
    try:
        run = start_run(env, tmp_path)
        wait_until(lambda: child_holding(worker, staging_temporary("redis")), "dump_redis never ran")
    finally:
        argv = source_redis.process.args
        source_redis.process.kill()
        source_redis.process.wait()
        restart_server(source_redis, argv)
    code, output = run.finish()
    assert code == 0, output + worker.log_text()
    assert "will retry" in worker.log_text()
    manifest = assert_one_complete_backup(layout, run.backup_id, smtp[1])
    assert manifest["components"]["redis"]["facts"]["keys"] == {"0": 8, "1": 8}


def test_source_redis_down_fails_clearly_with_one_alert(base_env, layout, start_worker, smtp, tmp_path):
    """Fault: nothing listens on REDIS_PORT for the whole run. Expected: dump_redis fails as
    transient, is retried once, then the run fails: `vq-backup run --wait` exits 1 naming it, one
    alert names redis, nothing is stored and staging is cleaned."""
    env = {**base_env, **mail_env(smtp[0]), "REDIS_PORT": str(free_port())}
    worker = start_worker(env)
    run = start_run(env, tmp_path)
    code, output = run.finish()
    assert code == 1 and "FAILED redis" in output and "Traceback" not in output, output
    assert "will retry" in worker.log_text()
    assert_clear_failure(layout, smtp[1], "Failed: redis")


# ---- the staging disk full -----------------------------------------------------------------------


@pytest.fixture
def small_staging(tmp_path) -> Iterator[Path]:
    """A real 4 MiB tmpfs for BACKUP_STAGING_DIR (the tests run as root, as in CI)."""
    with tmpfs(tmp_path / "small-staging", "4m") as mount:
        yield mount


def test_a_full_staging_disk_fails_clearly_and_staging_is_cleaned(
    base_env, layout, start_worker, smtp, small_staging, tmp_path
):
    """Fault: BACKUP_STAGING_DIR is a 4 MiB disk and the logs to back up are 8 MiB that do not
    compress (ENOSPC half way through staging them). Expected: a permanent failure, not
    retried: `vq-backup run --wait` exits 1 naming the staging area and "No space left on
    device", one alert says the same, nothing is stored, and the disk is empty again."""
    (layout["logs"] / "big.log").write_bytes(os.urandom(8 * MIB))
    env = {**base_env, **mail_env(smtp[0]), "BACKUP_STAGING_DIR": str(small_staging)}
    start_worker(env)
    run = start_run(env, tmp_path)
    code, output = run.finish()
    assert code == 1 and "FAILED logs" in output and "No space left on device" in output, output
    assert f"staging area {small_staging}" in output
    body = assert_clear_failure({**layout, "staging": small_staging}, smtp[1], "No space left on device")
    assert "Failed: logs" in body
    assert shutil.disk_usage(small_staging).used < MIB


# ---- the storage gone in the middle of an upload, and back -------------------------------------


def test_storage_gone_mid_upload_and_back_is_retried_and_one_backup_is_made(
    base_env, layout, start_worker, smtp, s3, tmp_path
):
    """Fault: S3 (moto) stops answering (SIGSTOP) once 15 MB of a 60 MB upload went through a
    proxy, and answers again 4 s later. Expected: the stalled upload times out
    (BACKUP_STORAGE_TIMEOUT=2) and is retried (by the storage client, then by finalize's own
    retry) until the store answers; exactly one complete backup whose stored files verify, one
    mail. The store that does not come back is test_cloud_backup.py's
    test_storage_stopped_mid_upload_retries_then_alerts_and_prune_clears (clear failure)."""
    from tests.emulators import CountingProxy, create_bucket, storage_env

    bucket = f"vq-test-{uuid.uuid4().hex[:8]}"
    create_bucket("AWS_S3", s3, bucket)
    with open(layout["logs"] / "big.log", "wb") as out:
        for _ in range(60):
            out.write(os.urandom(MIB))
    thaw = threading.Timer(4, s3.thaw)
    proxy = CountingProxy(s3.port, 15 * MIB, lambda: (s3.freeze(), thaw.start()))
    env = {
        **base_env,
        **mail_env(smtp[0]),
        **storage_env("AWS_S3", s3, bucket, "prod/vq", endpoint=proxy.endpoint),
        "COMPRESSION_ENABLED": "false",
        "BACKUP_UPLOAD_PART_SIZE_MB": "5",
        "BACKUP_STORAGE_TIMEOUT": "2",
        "BACKUP_STORAGE_RETRIES": "2",
        "BACKUP_RETRY_MAX": "3",
    }
    worker = start_worker(env)
    try:
        run = start_run(env, tmp_path)
        code, output = run.finish(timeout=180)
        wait_until(lambda: re.search(r"vq_tasks\.prune\[\S+\] (succeeded|raised)", worker.log_text()),
                   "prune did not run after the backup")  # fmt: skip
    finally:
        thaw.cancel()
        s3.thaw()
        proxy.close()
    assert proxy.sent >= 15 * MIB and thaw.finished.is_set()
    assert code == 0, output + worker.log_text()
    log = worker.log_text()
    assert _finalize_seconds(log) > 3, log  # it waited the outage out (in the client, or by a retry)
    verified = run_cli({**env, **storage_env("AWS_S3", s3, bucket, "prod/vq")}, "verify", run.backup_id)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    messages = smtp[1].wait_for(1, timeout=30)
    time.sleep(1)
    assert len(messages) == 1 and "FAILED" not in str(messages[0]["Subject"]), [
        m["Subject"] for m in messages
    ]


def _finalize_seconds(log: str) -> float:
    """Seconds from finalize_backup's first delivery to its success, by the worker log's times
    (a stalled upload may be waited out by the storage client or by finalize's own retry)."""
    stamp = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]*\] Task vq_tasks\.finalize_backup\[\S+\] "
    received = re.search(stamp + "received", log)
    succeeded = re.search(stamp + "succeeded", log)
    assert received and succeeded, log
    moments = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in (received, succeeded)]
    return (moments[1] - moments[0]).total_seconds()
