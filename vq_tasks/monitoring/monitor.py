"""The checks that no task can make for itself, run by the exporter after each reading of the
state: alert mails still owed (their task gave up or died), stale backups (no complete backup
within BACKUP_STALE_AFTER_HOURS: beat or every worker is dead, so no task would notice) and
storage nearly full. Each check is an observation for the alerting (alerts.deliver), which mails
once per incident and again when it changes or ends.

The mails go straight from the exporter's process, not through the broker: the broker being down
is one of the things this must survive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import cast

from vq_tasks import coordination
from vq_tasks.monitoring.alerts import AlertEvent, deliver, send_owed
from vq_tasks.monitoring.status import Status
from vq_tasks.settings import Settings

logger = logging.getLogger(__name__)
WATCH_SINCE_KEY = "vq:monitor:since"


def observe(settings: Settings, status: Status, watching_since: datetime | None = None) -> list[AlertEvent]:
    """Given a reading of the state, return the observations of the stale and storage conditions
    (a problem or the all-clear). A condition that the reading could not judge (its storage could
    not be read) is left out: an unknown is neither a problem nor a resolution. With no complete
    backup at all, staleness counts from ``watching_since`` (when monitoring began)."""
    events = []
    stale = stale_event(settings, status, watching_since)
    if stale is not None:
        events.append(stale)
    storage = storage_event(settings, status)
    if storage is not None:
        events.append(storage)
    return events


def stale_event(settings: Settings, status: Status, watching_since: datetime | None) -> AlertEvent | None:
    """Return the stale observation, or None when the primary storage could not be read."""
    primary = status.destinations.get("primary")
    if primary is None or primary.error:
        return None
    window = timedelta(hours=settings.backup_stale_after_hours)
    newest = primary.newest_success
    reference = newest or watching_since
    if reference is None or status.taken_at - reference <= window:
        return AlertEvent(condition="stale", observed_at=status.taken_at)
    hours = settings.backup_stale_after_hours
    if newest is None:
        began = f"{reference:%Y-%m-%d %H:%M} UTC"
        problem = f"no complete backup in {primary.description} since monitoring began {began}"
    else:
        problem = f"the newest complete backup finished {newest:%Y-%m-%d %H:%M} UTC, over {hours:g} h ago"
    summary = {"BACKUP_STALE_AFTER_HOURS": f"{hours:g}", "backup running now": str(status.running).lower()}
    if status.last_run is not None and status.last_run.failures:
        summary["last run"] = f"{status.last_run.backup_id}: failed ({', '.join(status.last_run.failures)})"
    return AlertEvent(
        condition="stale", failures={"primary": problem}, summary=summary, observed_at=status.taken_at
    )


def storage_event(settings: Settings, status: Status) -> AlertEvent | None:
    """Return the storage observation over every destination whose free space is known, or None
    when a destination could not be read (its share might be what changed)."""
    if any(d.error for d in status.destinations.values()):
        return None
    threshold = settings.backup_storage_min_free_percent
    failures, summary = {}, {}
    for role, d in sorted(status.destinations.items()):
        share = d.free_percent
        if share is None or d.free_bytes is None or d.capacity_bytes is None:  # a share implies both
            continue
        summary[f"{role} free"] = (
            f"{share:.1f}% ({_gib(d.free_bytes)} of {_gib(d.capacity_bytes)}) in {d.description}"
        )
        if share < threshold:
            failures[role] = f"free space under BACKUP_STORAGE_MIN_FREE_PERCENT={threshold:g}%"
    return AlertEvent(condition="storage", failures=failures, summary=summary, observed_at=status.taken_at)


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"


def watching_since(settings: Settings, now: datetime) -> datetime | None:
    """Return when monitoring began (kept in Celery's Redis, set by the first call); None if that
    Redis cannot be reached."""
    try:
        r = coordination.client(settings)
        r.set(WATCH_SINCE_KEY, now.isoformat(), nx=True)
        since = cast("str | None", r.get(WATCH_SINCE_KEY))  # the coordination client decodes replies
        return datetime.fromisoformat(since or now.isoformat())
    except Exception as exc:
        logger.warning("could not read when monitoring began: %s", exc)
        return None


def alert_on(settings: Settings) -> Callable[[Status], None]:
    """Return the exporter's callback: observe each reading and deliver what it calls for. A mail
    that cannot be sent is logged; the incident still owes it and the next reading sends it."""

    def check(status: Status) -> None:
        try:
            for outcome in send_owed(settings, origin="exporter"):
                logger.info("%s", outcome)
        except Exception as exc:  # Celery's Redis unreachable: /healthz says so
            logger.warning("could not look for owed alert mails: %s", exc)
        for event in observe(settings, status, watching_since(settings, status.taken_at)):
            try:
                outcome = deliver(settings, event, origin="exporter")
            except Exception as exc:
                logger.error(
                    "%s alert not sent (tried again after the next reading): %s", event.condition, exc
                )
                continue
            if " sent to " in outcome:
                logger.info("%s: %s", event.condition, outcome)

    return check
