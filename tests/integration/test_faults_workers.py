"""A whole worker dies (SIGKILL of its main process, its pool and their children: what `docker
kill`, a container's OOM kill or a lost host do) in each step of a run, while another worker is
alive or once a new one starts. Expected: the live worker takes the step over within about
BACKUP_WORKER_LOST_AFTER seconds (here 8) plus the step's own work, and the run ends in one
complete backup and one mail; a long step of a live worker is never handed out twice.

With the Redis broker these rest on the renewal of deliveries (vq_tasks.worker.liveness), with
RabbitMQ (tests/integration/test_rabbitmq.py) on its redelivery when a connection closes; both on
the step leases (vq_tasks.worker.leases). docs/RELIABILITY.md lists the times measured with the
default of 60 s.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import Worker, fill_database
from tests.integration.test_faults import (
    MIB,
    Run,
    assert_one_complete_backup,
    launch_worker,
    mail_env,
    manifests,
    pg_dumps_waiting,
    start_run,
    table_locked,
    wait_until,
)
from tests.integration.test_faults_backup import catch_finalize, pg_dumps_of, storage_partial

pytestmark = pytest.mark.integration
LOST_AFTER = int(os.environ.get("VQ_TEST_WORKER_LOST_AFTER", "8"))  # 60 to measure the default
# a step is taken over within LOST_AFTER of the death, plus a sweep (LOST_AFTER / 6) with the
# Redis broker; the rest is the step's own work and the run's next steps on a busy 2-core machine
TAKEOVER_BOUND = LOST_AFTER + 2 + 25


def report(what: str, env: dict[str, str], took: float) -> None:
    """Print a measured time to recovery (shown with pytest -s; docs/RELIABILITY.md lists them)."""
    broker = env["CELERY_BROKER_URL"].split(":", 1)[0]
    print(f"\nrecovery: {what}, {broker} broker, BACKUP_WORKER_LOST_AFTER={LOST_AFTER}: {took:.1f} s")


def kill_whole(worker: Worker) -> float:
    """SIGKILL ``worker``'s main process, pool and their children at once; return when (monotonic)."""
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait()
    return time.monotonic()


def freeze_pool(worker: Worker) -> list[psutil.Process]:
    """Stop (SIGSTOP) ``worker``'s pool processes: its main process still takes messages, which
    then wait in a pool process that cannot start them."""
    children = psutil.Process(worker.process.pid).children()
    for child in children:
        child.suspend()
    return children


def received(worker: Worker, task: str) -> int:
    return len(re.findall(rf"Task vq_tasks\.{task}\[[^\]]+\] received", worker.log_text()))


def succeeded(worker: Worker, task: str) -> bool:
    return re.search(rf"Task vq_tasks\.{task}\[[^\]]+\] succeeded", worker.log_text()) is not None


def celery_call(env: dict[str, str], task: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "celery", "-A", "vq_tasks", "call", f"vq_tasks.{task}"],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def env(base_env, smtp) -> dict[str, str]:
    return lost_after_env(base_env, smtp)


def lost_after_env(base_env: dict[str, str], smtp) -> dict[str, str]:
    """A working backup's settings, alerts mailed to ``smtp``, workers lost after LOST_AFTER s."""
    return {**base_env, **mail_env(smtp[0]), "BACKUP_WORKER_LOST_AFTER": str(LOST_AFTER)}


@dataclass
class Takeover:
    """A fault in the middle of dump_database (pg_dump waiting on a table lock): the run, the
    worker that took the dump over, and when (monotonic) the fault struck."""

    run: Run
    heir: Worker
    struck: float


def fault_mid_dump(
    env: dict[str, str],
    database: str,
    tmp_path: Path,
    start: Callable[[str], Worker],
    fault: Callable[[Worker], float],
    heir_first: bool = True,
) -> Takeover:
    """Start the doomed worker (``start("doomed")``), a backup, and, once pg_dump waits, the heir
    (before the fault, or after it without ``heir_first``); strike with ``fault(doomed)``."""
    fill_database(database, customers=50)
    doomed = start("doomed")
    with table_locked(database):
        run = start_run(env, tmp_path)
        wait_until(lambda: pg_dumps_waiting(database) == 1, "dump_database never ran")
        heir = start("heir") if heir_first else None
        struck = fault(doomed)
    return Takeover(run, heir or start("heir"), struck)


def assert_taken_over(takeover: Takeover, what: str, env: dict[str, str], layout, mailbox) -> None:
    """The heir ran dump_database once, within TAKEOVER_BOUND of the fault; one backup, one mail."""
    code, output = takeover.run.finish()
    took = time.monotonic() - takeover.struck
    assert code == 0, output + takeover.heir.log_text()
    assert received(takeover.heir, "dump_database") == 1, takeover.heir.log_text()
    report(what, env, took)
    assert took < TAKEOVER_BOUND, took
    assert_one_complete_backup(layout, takeover.run.backup_id, mailbox)


def launcher(env: dict[str, str], tmp_path: Path, workers: list[Worker]) -> Callable[[str], Worker]:
    """Start a named worker on this machine (stopped with the test's ``workers``)."""

    def start(name: str) -> Worker:
        workers.append(launch_worker(env, tmp_path / f"worker-{name}.log", name))
        return workers[-1]

    return start


def test_a_worker_killed_mid_dump_is_taken_over_by_the_live_one(
    env, database, layout, workers, smtp, tmp_path
):
    """The doomed worker's pg_dump waits on a table lock when the whole worker is killed; the
    heir, alive all along, runs dump_database once the doomed worker's deliveries are no longer
    renewed; an operator's `vq-backup run` right after the backup is accepted."""
    takeover = fault_mid_dump(env, database, tmp_path, launcher(env, tmp_path, workers), kill_whole)
    assert_taken_over(
        takeover, "worker killed mid-dump, another alive (backup complete)", env, layout, smtp[1]
    )
    second = start_run(env, tmp_path, wait=False)  # no dead run's lock in the way
    assert second.finish()[0] == 0, second.output()


def test_a_worker_killed_mid_dump_is_taken_over_by_one_started_later(
    env, database, layout, workers, smtp, tmp_path
):
    """No other worker is alive when the whole worker dies; one started afterwards finds the dead
    worker's delivery at its first sweep, once it is older than BACKUP_WORKER_LOST_AFTER."""
    start = launcher(env, tmp_path, workers)
    takeover = fault_mid_dump(env, database, tmp_path, start, kill_whole, heir_first=False)
    what = "worker killed mid-dump, a new one started (backup complete)"
    assert_taken_over(takeover, what, env, layout, smtp[1])


def test_a_live_workers_long_dump_is_never_handed_out_twice(env, database, layout, workers, smtp, tmp_path):
    """pg_dump waits on a table lock for three times BACKUP_WORKER_LOST_AFTER while a second
    worker is idle and sweeping: the live worker's delivery stays its own (renewed), the step's
    lease too; one pg_dump, one backup."""
    fill_database(database, customers=50)
    busy = launch_worker(env, tmp_path / "worker-busy.log", "busy")
    workers.append(busy)
    with table_locked(database):
        run = start_run(env, tmp_path)
        wait_until(lambda: pg_dumps_waiting(database) == 1, "dump_database never ran")
        idle = launch_worker(env, tmp_path / "worker-idle.log", "idle")
        workers.append(idle)
        time.sleep(3 * LOST_AFTER)
        assert len(pg_dumps_of(database)) == 1
    code, output = run.finish()
    assert code == 0, output + busy.log_text()
    assert received(busy, "dump_database") + received(idle, "dump_database") == 1
    assert "is being worked on by" not in busy.log_text() + idle.log_text()
    assert_one_complete_backup(layout, run.backup_id, smtp[1])


def test_a_worker_killed_while_it_writes_the_bundle_is_taken_over(
    env, database, layout, workers, smtp, tmp_path
):
    """finalize_backup is writing the bundle to the storage when its worker dies; the heir writes
    it again and then the manifest; the dead write's hidden partial file is left for prune."""
    fill_database(database, customers=50)
    (layout["config"] / "big.bin").write_bytes(os.urandom(40 * MIB))
    doomed = launch_worker(env, tmp_path / "worker-doomed.log", "doomed")
    workers.append(doomed)
    run = start_run(env, tmp_path)
    catch_finalize(doomed, layout)
    heir = launch_worker(env, tmp_path / "worker-heir.log", "heir")
    workers.append(heir)
    killed = kill_whole(doomed)
    code, output = run.finish()
    assert code == 0, output + heir.log_text()
    assert received(heir, "finalize_backup") == 1, heir.log_text()
    report("worker killed writing the bundle (backup complete)", env, time.monotonic() - killed)
    assert time.monotonic() - killed < TAKEOVER_BOUND
    assert_one_complete_backup(layout, run.backup_id, smtp[1])


def test_a_worker_killed_mid_offsite_copy_is_taken_over(env, database, layout, workers, smtp, tmp_path):
    """copy_offsite is writing the bundle to the off-site copy when its worker dies; the heir
    copies the backup, checked, manifest last."""
    fill_database(database, customers=50)
    (layout["config"] / "big.bin").write_bytes(os.urandom(40 * MIB))
    offsite = tmp_path / "offsite"
    env = {**env, "BACKUP_OFFSITE_PROVIDER": "Local", "BACKUP_OFFSITE_PATH": str(offsite)}
    doomed = launch_worker(env, tmp_path / "worker-doomed.log", "doomed")
    workers.append(doomed)
    run = start_run(env, tmp_path)
    catch_finalize(doomed, {"storage": offsite})
    heir = launch_worker(env, tmp_path / "worker-heir.log", "heir")
    workers.append(heir)
    killed = kill_whole(doomed)
    assert run.finish()[0] == 0, run.output()
    copied = lambda: manifests({"storage": offsite}) == [run.backup_id]  # noqa: E731
    wait_until(copied, "the off-site copy never completed", timeout=TAKEOVER_BOUND)
    assert received(heir, "copy_offsite") == 1, heir.log_text()
    report("worker killed mid off-site copy (copy complete)", env, time.monotonic() - killed)
    assert time.monotonic() - killed < TAKEOVER_BOUND
    assert_one_complete_backup(layout, run.backup_id, smtp[1])
    assert [p.name for p in offsite.iterdir() if storage_partial(p)]  # the dead copy's partial file


@pytest.mark.parametrize("task", ["prune", "restore_drill"])
def test_a_worker_killed_holding_a_maintenance_step_loses_it_to_the_live_one(
    task, env, database, layout, workers, smtp, tmp_path
):
    """The worker that took the prune (or drill) message dies before it has run it: the heir runs
    it once the dead worker's delivery is no longer renewed."""
    fill_database(database, customers=20)
    doomed = launch_worker(env, tmp_path / "worker-doomed.log", "doomed")
    workers.append(doomed)
    run = start_run(env, tmp_path)
    assert run.finish()[0] == 0, run.output()
    wait_until(lambda: succeeded(doomed, "prune"), "the backup's prune never ran")
    freeze_pool(doomed)
    celery_call(env, task)
    wait_until(
        lambda: received(doomed, task) == (2 if task == "prune" else 1),
        f"{task} never reached the doomed worker",
    )
    heir = launch_worker(env, tmp_path / "worker-heir.log", "heir")
    workers.append(heir)
    killed = kill_whole(doomed)
    wait_until(lambda: succeeded(heir, task), lambda: f"{task} was not taken over:\n{heir.log_text()}",
               timeout=TAKEOVER_BOUND + 60)  # fmt: skip
    assert received(heir, task) == 1
    report(f"worker killed holding {task} ({task} done)", env, time.monotonic() - killed)
    assert time.monotonic() - killed < TAKEOVER_BOUND + (30 if task == "restore_drill" else 0)
    assert manifests(layout) == [run.backup_id]
