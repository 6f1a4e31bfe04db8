"""No secret anywhere: a backup, a failed backup, verify and a restore through real workers, with
every process's argv sampled while they run, then a search of everything they left behind: worker
logs, CLI output, Celery's Redis (task arguments and results, what Flower shows, run records),
manifests, audit lines and alert mails."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import BROKER_PASSWORD, run_cli
from vq_tasks.crypto.signing import new_signing_key

pytestmark = pytest.mark.integration
WRONG_REDIS_PASSWORD = "wrong-redis-pw-4711"


class ArgvSampler:
    """Collect the command lines of every process on the machine, every 20 ms, while running."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for process in psutil.process_iter(["cmdline"]):
                self.seen.add(" ".join(process.info["cmdline"] or []))
            time.sleep(0.02)

    def __enter__(self) -> ArgvSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def redis_contents(client) -> str:
    """Every key and value in a Redis, as text."""
    parts = []
    for key in client.scan_iter(count=500):
        kind = client.type(key)
        value = {
            b"string": client.get,
            b"hash": client.hgetall,
            b"list": lambda k: client.lrange(k, 0, -1),
            b"set": client.smembers,
            b"zset": lambda k: client.zrange(k, 0, -1),
        }.get(kind, lambda k: b"")(key)
        parts.append(f"{key!r} {value!r}")
    return "\n".join(parts)


def test_no_secret_in_argv_logs_celery_state_manifests_audit_or_mail(
    base_env, broker, layout, start_worker, smtp, tmp_path
):
    port, mailbox = smtp
    signing_key = tmp_path / "signing.pem"
    new_signing_key(signing_key)
    env = {
        **base_env,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "BACKUP_ALERT_EMAIL": "oncall@example.com",
        "NOTIFICATION_EMAIL": "team@example.com",
        "BACKUP_SIGNING_KEY_FILE": str(signing_key),
    }
    secrets = [
        "db-secret-pw",
        "redis-secret-pw",
        BROKER_PASSWORD,
        WRONG_REDIS_PASSWORD,
        signing_key.read_text().splitlines()[1],  # the key's base64 body
    ]
    outputs = []
    with ArgvSampler() as argv:
        worker = start_worker(env)
        done = run_cli(env, "run", "--wait")
        assert done.returncode == 0, done.stderr
        backup_id = done.stdout.strip().splitlines()[-1]
        outputs += [done.stdout, done.stderr]
        for command in (
            ("verify", backup_id),
            ("restore", backup_id, "--force", "--yes"),
            ("audit", "-n", "50"),
        ):
            finished = run_cli(env, *command)
            assert finished.returncode == 0, finished.stdout + finished.stderr
            outputs += [finished.stdout, finished.stderr]
        worker.stop()
        failing = {**env, "REDIS_PASSWORD": WRONG_REDIS_PASSWORD}
        worker = start_worker(failing, name="failing")
        time.sleep(1.1)  # a new second: a new backup id
        failed = run_cli(failing, "run", "--wait")
        assert failed.returncode == 1 and "redis" in failed.stderr.lower()
        outputs += [failed.stdout, failed.stderr]
        mailbox.wait_for(2)

    left_behind = {
        "argv": "\n".join(argv.seen),
        "cli output": "\n".join(outputs),
        "worker logs": "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("worker-*.log")),
        "Celery's Redis": redis_contents(broker.client(0)),
        "stored files": "\n".join(
            p.read_text(errors="replace") for p in layout["storage"].glob("*_manifest.json*")
        ),  # the manifests and their detached signatures
        "audit log": Path(env["BACKUP_AUDIT_LOG"]).read_text(),
        "mails": "\n".join(m.as_string() for m in mailbox.messages),
    }
    assert "vq_tasks.dump_database" in left_behind["Celery's Redis"]  # task records were searched
    assert any("pg_dump" in line for line in argv.seen)  # the sampler saw the dump run
    assert len(mailbox.messages) >= 2 and list(layout["storage"].glob("*_manifest.json.sig"))  # signed
    for where, text in left_behind.items():
        for secret in secrets:
            assert secret not in text, f"a secret in the {where}"
