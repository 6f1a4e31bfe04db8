"""The alert of a suspicious backup: one incident while the latest backup is suspicious, resolved
by the next good one or by `vq-backup accept`."""

from __future__ import annotations

from vq_tasks.manifest import Anomaly, Manifest
from vq_tasks.monitoring.alerts import AlertEvent


def suspicious_event(manifest: Manifest, accepted: bool = False) -> AlertEvent:
    """Return the observation of a complete backup's verdict: a problem naming each drop, or
    healthy when it has none or was ``accepted``. What fell and how (gone, fell sharply) identifies
    the incident; the counts (``table public.queue_entries: 1,204,331 → 12 rows``) are in its
    summary, so that the next backup with the same drops and other counts is the same incident."""
    anomalies = [] if accepted else manifest.anomalies
    failures = {_what(a): "gone" if a.after is None else "fell sharply" for a in anomalies}
    summary = {_what(a): a.text.partition(": ")[2] for a in anomalies}
    if failures:
        summary["compared with"] = ", ".join(manifest.compared_with)
    return AlertEvent(
        condition="suspicious",
        backup_id=manifest.backup_id,
        failures=failures,
        summary=summary,
        observed_at=manifest.finished_at,
    )


def verdict(manifest: Manifest, accepted: bool = False) -> str:
    """One line: the anomaly verdict of a complete backup."""
    if not manifest.compared_with and not manifest.anomalies:
        return "not compared (no good backup before it)"
    if not manifest.anomalies:
        return f"no anomaly against {len(manifest.compared_with)} good backups"
    what = "; ".join(a.text for a in manifest.anomalies)
    return f"accepted as intended: {what}" if accepted else f"SUSPICIOUS: {what}"


def _what(anomaly: Anomaly) -> str:
    """What an anomaly is about, as its sentence names it (``table public.queues``, ``redis db0``)."""
    return anomaly.text.partition(": ")[0]
