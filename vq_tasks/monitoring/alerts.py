"""Alert emails, one per incident: a mail when a problem opens, another only when it changes or is
resolved. A success summary of each backup goes to NOTIFICATION_EMAIL.

An event is one observation of a condition: ``failures`` (part -> what is wrong) when there is a
problem, none when the condition is healthy. Its fingerprint is the failures with ids and numbers
that change every run taken out, so the same problem seen again is the same incident. Incidents
live in Celery's Redis (coordination.observe_incident): any number of workers and the exporter
can report the same condition and one mail goes out. Events cross the broker as plain JSON and
hold ids, names and redacted error text, never a secret.
"""

from __future__ import annotations

import hashlib
import json
import re
import smtplib
import ssl
import time
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Literal

from pydantic import BaseModel, Field

from vq_tasks import coordination
from vq_tasks.audit import audit
from vq_tasks.errors import PermanentError, TransientError, redact
from vq_tasks.settings import Settings

Condition = Literal[
    "backup", "offsite", "drill", "storage", "retention", "stale", "authorization", "integrity", "success"
]
TITLES = {
    "backup": "FAILED",
    "offsite": "OFF-SITE COPY FAILED",
    "drill": "RESTORE DRILL FAILED",
    "storage": "STORAGE NEARLY FULL",
    "retention": "RETENTION PROBLEM",
    "stale": "NO RECENT BACKUP",
    "authorization": "DESTRUCTIVE TASK REFUSED",
    "integrity": "BACKUP TAMPERED WITH",
}
INTROS = {
    "backup": "Backup {backup} failed. No manifest was written; staging was cleaned.",
    "offsite": "Backup {backup} is complete in the primary storage, but its off-site copy failed. The "
    "off-site destination holds no manifest for it; the next copy tries again.",
    "drill": "The restore drill of backup {backup} failed: this backup may not restore. The drill "
    "restores into a scratch database and a scratch Redis, never the live ones.",
    "storage": "A backup destination is running out of space: the next backups may fail.",
    "retention": "Retention did not do its work: backups past their retention are still stored, or prune "
    "failed. Storage grows, and backups may be kept longer than policy allows.",
    "stale": "No backup has completed within BACKUP_STALE_AFTER_HOURS: is beat running, are the workers?",
    "authorization": "A destructive task (a prune or a forced restore) was refused: its message carried no "
    "valid authorization by a key in BACKUP_TASK_PUBLIC_KEYS. Nothing was deleted or restored. Someone "
    "who can reach the broker may be trying to run it, or its sender lacks BACKUP_TASK_KEY_FILE.",
    "integrity": "Verify found backup {backup} forged or tampered with: a manifest signature that fails, "
    "objects hidden, overwritten or deleted after the backup was committed, or locked for less time than its "
    "manifest promises. Someone holding the workers' storage credentials may be at work: rotate them. "
    "What was committed is read where the store kept it; run `vq-backup verify` on the other backups.",
}
RESOLVED = {
    "backup": "backups succeed again",
    "offsite": "off-site copies succeed again",
    "drill": "the restore drill passes again",
    "storage": "every destination has enough free space again",
    "retention": "prune ran and left nothing past its retention",
    "stale": "a backup completed within BACKUP_STALE_AFTER_HOURS again",
    "authorization": "an authorized destructive task ran since",
    "integrity": "the backup verifies again",
}
_CHANGING = [
    (re.compile(r"\b[A-Za-z0-9][A-Za-z0-9_-]*_\d{8}_\d{6}\b"), "<backup>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "<id>"),
    (re.compile(r"\d{6,}"), "#"),
]


class AlertEvent(BaseModel):
    """One observation of ``condition``: a problem when ``failures`` is not empty, else healthy."""

    condition: Condition
    failures: dict[str, str] = {}
    backup_id: str | None = None
    summary: dict[str, str] = {}
    observed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def problem(self) -> bool:
        return bool(self.failures)

    def fingerprint(self) -> str:
        """Return what identifies the incident: the failures without ids, times and counts that
        differ from run to run; "" when healthy."""
        if not self.failures:
            return ""
        stable = {part: _stable(text) for part, text in self.failures.items()}
        return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:32]


def _stable(text: str) -> str:
    for pattern, replacement in _CHANGING:
        text = pattern.sub(replacement, text)
    return text


def recipients(settings: Settings, event: AlertEvent) -> list[str]:
    """Return who should get ``event`` (an empty list: nobody, by configuration)."""
    if event.condition == "success":
        target = settings.notification_email
    else:
        target = settings.backup_alert_email if settings.backup_alert_on_failure else None
    return [address.strip() for address in (target or "").split(",") if address.strip()]


def deliver(settings: Settings, event: AlertEvent, origin: str = "celery", task_id: str | None = None) -> str:
    """Send the mail ``event`` calls for, if any: the opening, change or resolution of its
    incident, or a success summary (once per backup). Return what happened. Raise TransientError
    when the mail could not be sent now (PermanentError when the server refused our login) or
    another sender is sending this incident's notice: the notice stays owed and a retry (the
    alert task's, the exporter's next reading) sends it. ``task_id`` makes a redelivered task
    the same sender as before."""
    to = recipients(settings, event)
    if not to:
        if event.condition == "success":
            return "no summary sent: NOTIFICATION_EMAIL is not set"
        return "no alert sent: BACKUP_ALERT_EMAIL is not set or BACKUP_ALERT_ON_FAILURE is false"
    if event.condition == "success":
        return _deliver_summary(settings, event, to, origin, task_id)
    r = coordination.client(settings)
    holder, fingerprint = task_id or f"{origin}-{uuid.uuid4().hex}", event.fingerprint()
    payload = event.model_dump_json()
    notice = coordination.observe_incident(
        r, event.condition, fingerprint, event.observed_at.timestamp(), holder, payload
    )
    if notice == "busy":
        raise TransientError(
            f"the {event.condition} notice is being sent by another process: tried again later"
        )
    if notice in ("none", "stale"):
        return "no alert sent: nothing new since the last mail about this incident"
    started = time.monotonic()
    try:
        send(settings, compose(settings, event, notice, to))
    except Exception:
        coordination.incident_sent(r, event.condition, fingerprint, holder, sent=False)
        raise
    coordination.incident_sent(r, event.condition, fingerprint, holder)
    _audit_sent(settings, event, notice, to, origin, task_id, time.monotonic() - started)
    return f"{notice} mail sent to {', '.join(to)}"


def _deliver_summary(
    settings: Settings, event: AlertEvent, to: list[str], origin: str, task_id: str | None
) -> str:
    r = coordination.client(settings)
    claim = f"alert:success:{event.backup_id}"
    if not coordination.claim_once(r, claim):
        return "no summary sent: sent already"
    started = time.monotonic()
    try:
        send(settings, compose(settings, event, "summary", to))
    except Exception:
        coordination.release_claim(r, claim)
        raise
    _audit_sent(settings, event, "summary", to, origin, task_id, time.monotonic() - started)
    return f"summary mail sent to {', '.join(to)}"


def _audit_sent(
    settings, event: AlertEvent, notice: str, to: list[str], origin: str, task_id, took: float
) -> None:
    audit(settings, "alert", "sent", condition=event.condition, notice=notice, backup_id=event.backup_id,
          to=to, origin=origin, task_id=task_id, duration_seconds=round(took, 3))  # fmt: skip


def send_owed(settings: Settings, origin: str) -> list[str]:
    """Send every incident notice that is still owed (its mail failed, and the task that should
    have sent it gave up or died); return what happened to each. Errors are in the lines."""
    outcomes = []
    for payload, at in coordination.owed_incidents(coordination.client(settings)):
        try:
            event = AlertEvent.model_validate_json(payload)
            event = event.model_copy(update={"observed_at": datetime.fromtimestamp(at, UTC)})
            outcomes.append(f"{event.condition}: {deliver(settings, event, origin=origin)}")
        except Exception as exc:
            outcomes.append(
                f"owed notice not sent (tried again later): {redact(str(exc), settings.secret_values())}"
            )
    return outcomes


def compose(settings: Settings, event: AlertEvent, notice: str, to: list[str]) -> EmailMessage:
    """Return the email for ``event``: a subject that says what happened, a body that says where
    and what to do; ``notice`` is opened, changed, resolved or summary."""
    message = EmailMessage()
    message["From"] = settings.smtp_from
    message["To"] = ", ".join(to)
    message["Subject"] = f"[VQ Backup] {subject(event, notice)}"
    message.set_content(redact("\n".join(body(event, notice)), settings.secret_values()) + "\n")
    return message


def subject(event: AlertEvent, notice: str) -> str:
    """Return the subject line (without the [VQ Backup] tag)."""
    about = f": {event.backup_id}" if event.backup_id else ""
    if notice == "summary":
        return f"OK{about}"
    if notice == "resolved":
        return f"RESOLVED: {RESOLVED[event.condition]}{about}"
    parts = ", ".join(sorted(event.failures))
    prefix = "CHANGED: " if notice == "changed" else ""
    return f"{prefix}{TITLES[event.condition]}{about} ({parts})"


def body(event: AlertEvent, notice: str) -> list[str]:
    """Return the lines of the mail's body."""
    if notice == "summary":
        lines = [f"Backup {event.backup_id} completed.", ""]
    elif notice == "resolved":
        lines = [f"Resolved: {RESOLVED[event.condition]}.", ""]
    else:
        lines = [INTROS[event.condition].format(backup=event.backup_id or "(none)"), ""]
        if notice == "changed":
            lines = ["The problem reported earlier has changed.", *lines]
        lines += [f"Failed: {part}\nError: {text}\n" for part, text in sorted(event.failures.items())]
    lines += [f"{key}: {value}" for key, value in event.summary.items()]
    lines.append(f"observed: {event.observed_at.isoformat(timespec='seconds')}")
    if notice != "summary":
        lines += ["", "One mail per incident: the next one comes when it changes or is resolved."]
    return lines


def send(settings: Settings, message: EmailMessage) -> None:
    """Send ``message`` through the configured SMTP server: TLS from the start (SMTP_SSL) or by
    STARTTLS, the certificate checked against the system's CAs or SMTP_CA_FILE, then a login when
    SMTP_USER is set. Raise TransientError if it cannot be sent."""
    context = ssl.create_default_context(cafile=settings.smtp_ca_file)
    try:
        if settings.smtp_ssl:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout, context=context
            )
        else:
            smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout)
        with smtp:
            if settings.smtp_starttls:
                smtp.starttls(context=context)
            if settings.smtp_user and settings.smtp_password is not None:
                smtp.login(settings.smtp_user, settings.smtp_password.get_secret_value())
            smtp.send_message(message)
    except smtplib.SMTPAuthenticationError:
        raise PermanentError(
            f"SMTP {settings.smtp_host}:{settings.smtp_port} refused the login of SMTP_USER="
            f"{settings.smtp_user}: check SMTP_USER and SMTP_PASSWORD"
        ) from None
    except (OSError, smtplib.SMTPException) as exc:
        reason = redact(str(exc), settings.secret_values())
        raise TransientError(f"SMTP {settings.smtp_host}:{settings.smtp_port}: {reason}") from None


def retention_event(report) -> AlertEvent | None:
    """Given a real prune's report (retention.prune.PruneReport), return its retention observation: each
    destination where prune failed, or that still holds backups past their retention (their ids
    in the summary, so that more of them is still the same incident). None when a destination was
    skipped and none failed: what was not checked cannot be declared healthy."""
    failures, summary = {}, {}
    for d in report.destinations:
        if d.error:
            failures[d.role] = f"prune failed: {d.error}"
        elif d.expired_left:
            failures[d.role] = "backups past their retention are still stored after prune"
            summary[f"{d.role}: past retention"] = ", ".join(d.expired_left)
    if not failures and any(d.skipped for d in report.destinations):
        return None
    return AlertEvent(condition="retention", failures=failures, summary=summary)
