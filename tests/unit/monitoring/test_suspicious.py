"""The suspicious-backup alert: what fell identifies the incident and the counts go in its summary,
so the next backup with the same drops and other counts is the same incident; every anomaly keeps
a name of its own (Redis' keys in all and redis.rdb's size both drop when Redis is flushed)."""

from __future__ import annotations

from datetime import UTC, datetime

from vq_tasks.manifest import Anomaly, Manifest, StoredFile
from vq_tasks.monitoring.suspicious import suspicious_event

STARTED = datetime(2026, 1, 2, 2, tzinfo=UTC)


def flagged(*anomalies: Anomaly) -> Manifest:
    stored = StoredFile(name="x.tar.gz", md5="0" * 32, sha256="0" * 64, size=1)
    return Manifest(
        backup_id="virtualqueue_backup_20260102_020000", kind="daily", started_at=STARTED,
        finished_at=STARTED, duration_seconds=1.0, tool_version="t", compression="gzip", files=[stored],
        components={}, anomalies=list(anomalies), compared_with=["virtualqueue_backup_20260101_020000"],
    )  # fmt: skip


def rows(after: int) -> Anomaly:
    text = f"table public.queue_entries: 1,204,331 → {after:,} rows"
    return Anomaly(
        kind="table_rows", subject="public.queue_entries", before=1_204_331, after=after, text=text
    )


def test_the_same_drops_with_other_counts_are_the_same_incident():
    first, second = suspicious_event(flagged(rows(12))), suspicious_event(flagged(rows(57)))
    assert first.fingerprint() == second.fingerprint() != ""
    assert first.failures == {"table public.queue_entries": "fell sharply"}
    assert first.summary["table public.queue_entries"] == "1,204,331 → 12 rows"


def test_every_anomaly_keeps_its_own_name_and_an_accepted_backup_is_healthy():
    keys = Anomaly(
        kind="total_keys",
        subject="redis",
        before=50_012,
        after=12,
        text="redis keys in all databases: 50,012 → 12",
    )
    size = Anomaly(
        kind="component_size",
        subject="redis",
        before=40 << 20,
        after=1024,
        text="redis.rdb: 40.0 MiB → 1.0 KiB",
    )
    event = suspicious_event(flagged(keys, size))
    assert set(event.failures) == {"redis keys in all databases", "redis.rdb"}
    assert suspicious_event(flagged(keys, size), accepted=True).problem is False
