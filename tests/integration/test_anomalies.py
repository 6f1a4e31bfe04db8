"""A complete backup that is wrong gets noticed, end to end with a real worker: a backup after rows
were deleted and a Redis database flushed is complete but suspicious (its manifest says what fell,
from what to what), one alert mail says it plainly, a backup of the same state again sends no
second mail, and the next good backup resolves the incident."""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.conftest import fill_database, fill_redis, pg_connect, run_cli, settings_env
from tests.integration.test_restore import make_backup

pytestmark = pytest.mark.integration
REFILL = "INSERT INTO events (ticket_id, kind) SELECT ticket_id, kind FROM events, generate_series(1, 130)"


@pytest.fixture
def env(base_env, smtp) -> dict[str, str]:
    port, _ = smtp
    return {
        **base_env,
        **settings_env(
            smtp_host="127.0.0.1",
            smtp_port=port,
            backup_alert_email="oncall@example.com",
            backup_anomaly_min_rows=100,
            backup_anomaly_min_keys=4,
            backup_anomaly_min_bytes=1024,
        ),
    }


def wait_for_mail(mailbox, count: int, timeout: float = 60) -> list[str]:
    """The subjects of the suspicious-backup mails, once there are ``count`` (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        subjects = [str(m["Subject"]) for m in mailbox.messages]
        found = [s for s in subjects if "SUSPICIOUS" in s or "RESOLVED" in s]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_an_emptied_table_and_a_flushed_redis_make_a_suspicious_backup_said_once_and_resolved(
    env, database, source_redis, layout, start_worker, smtp
):
    _, mailbox = smtp
    fill_database(database, customers=500)  # source_redis is filled already
    start_worker(env)
    first, manifest = make_backup(env, layout["storage"])
    assert manifest["anomalies"] == [] and manifest["compared_with"] == []

    with pg_connect(database) as conn:
        conn.execute("DELETE FROM events WHERE id > 12")
    source_redis.client(0).flushdb()
    second, manifest = make_backup(env, layout["storage"])
    texts = [a["text"] for a in manifest["anomalies"]]
    assert "table public.events: 1,500 → 12 rows" in texts
    assert any(t.startswith("redis db0: ") and t.endswith("→ 0 keys") for t in texts)
    assert manifest["compared_with"] == [first]
    subjects = wait_for_mail(mailbox, 1)
    assert len(subjects) == 1 and subjects[0].startswith(f"[VQ Backup] SUSPICIOUS BACKUP: {second} (")
    assert "public.events" in subjects[0] and "db0" in subjects[0]
    body = next(m for m in mailbox.messages if "SUSPICIOUS" in str(m["Subject"])).get_content()
    assert "table public.events: 1,500 → 12 rows" in body and f"vq-backup accept {second}" in body

    _, manifest = make_backup(env, layout["storage"])  # the same state: compared with the first
    assert manifest["compared_with"] == [first] and manifest["anomalies"]
    time.sleep(3)
    assert len(wait_for_mail(mailbox, 1)) == 1  # the same incident: no second mail

    fill_redis(source_redis)
    with pg_connect(database) as conn:
        conn.execute(REFILL)
    fourth, manifest = make_backup(env, layout["storage"])
    assert manifest["anomalies"] == []
    resolved = wait_for_mail(mailbox, 2)[1]
    assert (
        resolved.startswith("[VQ Backup] RESOLVED: the latest backup is not suspicious")
        and fourth in resolved
    )
    shown = json.loads(run_cli(env, "show", second, "--json").stdout)
    assert shown["anomalies"] and shown["compared_with"] == [first]
