"""Workers on separate hosts (tests/hosts.py: network, mount and UTS namespaces on this machine),
sharing only the broker, the services they back up and the staging volume, which each host mounts
at /srv/vq-staging as it would a shared volume or NFS: the chord spans the hosts and makes one
backup; a host that does not see the shared staging fails the run clearly; a host cut off the
network in the middle of a dump is a dead worker, whose step another host takes over."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.hosts import Host, hosts, netns_available
from tests.integration.conftest import PG_PORT, WORKER_READY_TIMEOUT, Worker, fill_database
from tests.integration.test_faults import (
    assert_one_complete_backup,
    start_run,
    stored,
    wait_until,
)
from tests.integration.test_faults_workers import (
    assert_taken_over,
    fault_mid_dump,
    kill_whole,
    lost_after_env,
)
from tests.integration.test_rabbitmq import on_rabbitmq
from tests.servers import rabbitmq_available, rabbitmq_vhost

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(netns_available() is not None, reason=f"no test hosts here: {netns_available()}"),
]
STAGING = Path("/srv/vq-staging")


@pytest.fixture(params=["redis", "rabbitmq"])
def env(request, base_env, broker, smtp) -> Iterator[dict[str, str]]:
    """A working backup's settings, with Celery's Redis or RabbitMQ (a virtual host) as the broker."""
    env = lost_after_env(base_env, smtp)
    if request.param == "redis":
        yield env
        return
    if not rabbitmq_available():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672 (.ci/run starts one)")
    with rabbitmq_vhost() as url:
        yield on_rabbitmq(env, broker, url)


@pytest.fixture
def two_hosts() -> Iterator[list[Host]]:
    with hosts(2) as made:
        yield made


def on_host(host: Host, env: dict[str, str]) -> dict[str, str]:
    """``env`` as seen from ``host``: every service at the host's gateway, relayed to 127.0.0.1."""
    ports = [int(env["REDIS_PORT"]), PG_PORT, int(env["SMTP_PORT"])]
    for url in {env["CELERY_BROKER_URL"], env.get("CELERY_RESULT_BACKEND", "")} - {""}:
        ports.append(int(re.search(r":(\d+)/", url).group(1)))
    host.forward(*ports)
    moved = {k: v.replace("127.0.0.1", host.gateway) for k, v in env.items()}
    return {**moved, "DB_HOST": host.gateway, "BACKUP_STAGING_DIR": str(STAGING)}


def start_worker_on(host: Host, env: dict[str, str], staging: Path, log: Path, *queues: str) -> Worker:
    """Start a real worker on ``host`` with ``staging`` mounted at /srv/vq-staging; return once ready."""
    argv = [sys.executable, "-m", "celery", "-A", "vq_tasks", "worker", "--pool=prefork", "--concurrency=2"]
    argv += ["--loglevel=INFO", f"--hostname=worker@{host.name}", "--without-gossip", "--without-mingle"]
    if queues:
        argv.append(f"--queues={','.join(queues)}")
    full_env = {**os.environ, **on_host(host, env), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        process = host.popen(
            argv, env=full_env, stdout=out, stderr=subprocess.STDOUT, binds={staging: STAGING}
        )
    worker = Worker(process, log, full_env)
    wait_until(lambda: " ready." in worker.log_text() or process.poll() is not None,
               lambda: f"worker not ready:\n{worker.log_text()}", timeout=WORKER_READY_TIMEOUT)  # fmt: skip
    assert process.poll() is None, worker.log_text()
    return worker


def shared_staging(env: dict[str, str], layout: dict[str, Path]) -> dict[str, str]:
    """The client's settings: the staging folder is the shared volume the hosts mount."""
    layout["staging"].mkdir(parents=True, exist_ok=True)
    return {**env, "BACKUP_STAGING_DIR": str(layout["staging"])}


def test_the_chord_spans_two_hosts_and_makes_one_backup(env, database, layout, smtp, two_hosts, tmp_path):
    fill_database(database, customers=50)
    env = shared_staging(env, layout)
    a, b = (start_worker_on(h, env, layout["staging"], tmp_path / f"{h.name}.log") for h in two_hosts)
    run = start_run(env, tmp_path)
    code, output = run.finish()
    assert code == 0, output + a.log_text() + b.log_text()
    manifest = assert_one_complete_backup(layout, run.backup_id, smtp[1])
    dumped_on = {c["worker"] for c in manifest.get("components", {}).values() if "worker" in c}
    steps_on = {h.name for h, w in zip(two_hosts, (a, b), strict=True) if "Task vq_tasks." in w.log_text()}
    assert steps_on == {h.name for h in two_hosts}, (dumped_on, a.log_text(), b.log_text())


def test_a_host_that_does_not_see_the_shared_staging_fails_the_run_clearly(
    env, database, layout, smtp, two_hosts, tmp_path
):
    """The dumps run on a host that mounts the shared staging; finalize on one that mounts a
    folder of its own: it finds none of the staged parts and the run fails with one alert saying
    that BACKUP_STAGING_DIR must be shared, nothing stored."""
    fill_database(database, customers=20)
    env = shared_staging(env, layout)
    own = tmp_path / "not-shared"
    own.mkdir()
    dumps, finalize = two_hosts
    start_worker_on(dumps, env, layout["staging"], tmp_path / "dumps.log", "vq.dump", "vq.maintenance")
    start_worker_on(finalize, env, own, tmp_path / "finalize.log", "vq.backup")
    run = start_run(env, tmp_path)
    code, output = run.finish()
    assert code == 1, output
    messages = smtp[1].wait_for(1, timeout=60)
    time.sleep(1)  # a second mail, were one sent, would come now
    assert len(messages) == 1 and "FAILED" in str(messages[0]["Subject"])
    body = messages[0].get_content()
    assert "every worker shares" in body and f"on {finalize.name}" in body, body
    assert stored(layout) == [] and stored(layout, hidden=True) == []
    # the clean-up ran on the host that does not see the shared staging either: the parts stay
    # there until prune removes stale staging folders (retention/prune.py)


def on_two_hosts(env: dict[str, str], layout, hosts_: list[Host], tmp_path: Path) -> Callable[[str], Worker]:
    """Start "doomed" on the first host, "heir" on the second, both with the shared staging."""

    def start(name: str) -> Worker:
        host = hosts_[0] if name == "doomed" else hosts_[1]
        return start_worker_on(host, env, layout["staging"], tmp_path / f"{name}.log")

    return start


def test_a_host_cut_off_mid_dump_loses_its_step_to_another_host(
    env, database, layout, smtp, two_hosts, tmp_path
):
    """The host running dump_database (pg_dump waiting on a table lock) is cut off the network:
    it renews neither its deliveries nor its lease; the other host takes the dump over within
    BACKUP_WORKER_LOST_AFTER plus a sweep; one backup, one mail. The cut-off worker, still alive,
    finishes its dump once it is back and then commits nothing: its lease was taken."""
    env = shared_staging(env, layout)
    doomed_host = two_hosts[0]
    doomed: list[Worker] = []

    def cut(worker: Worker) -> float:
        doomed.append(worker)
        doomed_host.cut()
        return time.monotonic()

    start = on_two_hosts(env, layout, two_hosts, tmp_path)
    takeover = fault_mid_dump(env, database, tmp_path, start, cut)
    assert_taken_over(takeover, "host cut off mid-dump", env, layout, smtp[1])
    doomed_host.reconnect()
    log = doomed[0].log_text
    ended = lambda: "database was taken over by" in log()  # noqa: E731
    wait_until(ended, lambda: f"the cut-off dump never ended:\n{log()}", timeout=150)
    assert_one_complete_backup(layout, takeover.run.backup_id, smtp[1])  # still one, nothing new
    assert doomed[0].process.poll() is None


def test_a_worker_killed_mid_dump_loses_its_step_to_another_host(
    env, database, layout, smtp, two_hosts, tmp_path
):
    """As a container killed on one machine: the whole worker SIGKILLed on one host while its
    pg_dump waits; the other host cannot tell its processes ended, so it waits for the lease."""
    env = shared_staging(env, layout)
    start = on_two_hosts(env, layout, two_hosts, tmp_path)
    takeover = fault_mid_dump(env, database, tmp_path, start, kill_whole)
    assert_taken_over(takeover, "worker killed mid-dump, other host", env, layout, smtp[1])
