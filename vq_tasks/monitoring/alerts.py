"""Alerts, one per incident: a notice when a problem opens, another only when it changes or is
resolved, by mail to BACKUP_ALERT_EMAIL and to the chat and webhook URLs of BACKUP_ALERT_URLS
(channels.py). A success summary of each backup goes to NOTIFICATION_EMAIL and NOTIFICATION_URLS.
A notice is sent once it reached one channel at least; one that reached none stays owed.

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
import logging
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
from vq_tasks.errors import BackupError, PermanentError, TransientError, redact
from vq_tasks.monitoring import channels
from vq_tasks.settings import Settings

logger = logging.getLogger(__name__)

Condition = Literal[
    "backup",
    "offsite",
    "drill",
    "storage",
    "retention",
    "stale",
    "authorization",
    "integrity",
    "suspicious",
    "success",
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
    "suspicious": "SUSPICIOUS BACKUP",
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
    "suspicious": "Backup {backup} is complete, but much smaller than the good backups before it: data may "
    "have been deleted (a bad migration, a DROP, a flushed Redis). Retention keeps the last good backups "
    "while this lasts. If the change was intended, mark it so: vq-backup accept {backup} --reason '...'.",
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
    "suspicious": "the latest backup is not suspicious, or was accepted as intended",
}
SUBJECT_PARTS = 5  # failed parts named in a subject (the body names them all)
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
    """Return the mail addresses that should get ``event`` (its URLs: channels.urls_for)."""
    if event.condition == "success":
        target = settings.notification_email
    else:
        target = settings.backup_alert_email if settings.backup_alert_on_failure else None
    return [address.strip() for address in (target or "").split(",") if address.strip()]


def deliver(settings: Settings, event: AlertEvent, origin: str = "celery", task_id: str | None = None) -> str:
    """Send the notice ``event`` calls for, if any, to every channel (mail and URLs): the opening,
    change or resolution of its incident, or a success summary (once per backup). Return what
    happened. Raise TransientError when no channel took the notice now (the mail's PermanentError
    when the SMTP server refused our login) or another sender is sending this incident's notice:
    the notice stays owed and a retry (the alert task's, the exporter's next reading) sends it.
    ``task_id`` makes a redelivered task the same sender as before."""
    to, urls = recipients(settings, event), channels.urls_for(settings, event.condition)
    if not to and not urls:
        if event.condition == "success":
            return "no summary sent: NOTIFICATION_EMAIL is not set, nor NOTIFICATION_URLS"
        return (
            "no alert sent: BACKUP_ALERT_EMAIL is not set, nor BACKUP_ALERT_URLS, or BACKUP_ALERT_ON_FAILURE "
            "is false"
        )
    if event.condition == "success":
        return _deliver_summary(settings, event, to, urls, origin, task_id)
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
        reached = send_everywhere(settings, event, notice, to, urls, origin, task_id)
    except Exception:
        coordination.incident_sent(r, event.condition, fingerprint, holder, sent=False)
        raise
    coordination.incident_sent(r, event.condition, fingerprint, holder)
    _audit_sent(settings, event, notice, reached, origin, task_id, time.monotonic() - started)
    return _sent_line(notice, reached, to)


def _deliver_summary(
    settings: Settings, event: AlertEvent, to: list[str], urls: list[str], origin: str, task_id: str | None
) -> str:
    r = coordination.client(settings)
    claim = f"alert:success:{event.backup_id}"
    if not coordination.claim_once(r, claim):
        return "no summary sent: sent already"
    started = time.monotonic()
    try:
        reached = send_everywhere(settings, event, "summary", to, urls, origin, task_id)
    except Exception:
        coordination.release_claim(r, claim)
        raise
    _audit_sent(settings, event, "summary", reached, origin, task_id, time.monotonic() - started)
    return _sent_line("summary", reached, to)


def _sent_line(notice: str, reached: list[str], to: list[str]) -> str:
    """Return what deliver says it did: "opened mail sent to ..." when only mail went out."""
    kind = "mail" if set(reached) <= set(to) else "notice"
    return f"{notice} {kind} sent to {', '.join(reached)}"


def send_everywhere(
    settings: Settings, event: AlertEvent, notice: str, to: list[str], urls: list[str], origin: str,
    task_id: str | None,
) -> list[str]:  # fmt: skip
    """Send ``notice`` of ``event`` by mail to ``to`` and to every one of ``urls``, each URL tried a
    few times; return the channels that took it (addresses, URL labels). Each channel that failed
    gets a warning line and an audit entry. Raise when none took it: the mail's error, else
    TransientError naming the URLs by label."""
    title, text = render(settings, event, notice)
    reached: list[str] = []
    failed: list[channels.ChannelResult] = []
    mail_error: BackupError | None = None
    if to:
        try:
            send(settings, compose(settings, event, notice, to))
            reached += to
        except Exception as exc:  # a mail that cannot even be composed must not stop the URLs
            mail_error = _mail_error(settings, exc)
            failed.append(channels.ChannelResult(f"mail to {', '.join(to)}", False, 1, str(mail_error)))
    for result in channels.notify(urls, title, text, notice, settings.secret_values()):
        if result.delivered:
            reached.append(result.label)
        else:
            failed.append(result)
    for result in failed:
        _report_failed(settings, event, notice, result, origin, task_id)
    if reached:
        return reached
    if mail_error is not None:
        raise mail_error
    reasons = "; ".join(f"{result.label}: {result.reason}" for result in failed)
    raise TransientError(f"the {event.condition} {notice} notice reached no channel ({reasons})")


def _mail_error(settings: Settings, exc: Exception) -> BackupError:
    """The error of a mail that failed: ours as raised, anything else (a header it could not
    make) as a PermanentError, redacted."""
    if isinstance(exc, BackupError):
        return exc
    return PermanentError(f"the mail could not be made: {redact(str(exc), settings.secret_values())}")


def _report_failed(
    settings: Settings, event: AlertEvent, notice: str, result: channels.ChannelResult, origin: str,
    task_id: str | None,
) -> None:  # fmt: skip
    """Log one warning line and write one audit entry for a channel that did not take a notice."""
    logger.warning(
        "the %s %s notice did not reach %s after %d attempt(s): %s",
        event.condition, notice, result.label, result.attempts, result.reason,
    )  # fmt: skip
    audit(settings, "alert", "failed", condition=event.condition, notice=notice, backup_id=event.backup_id,
          channel=result.label, attempts=result.attempts, reason=result.reason, origin=origin,
          task_id=task_id)  # fmt: skip


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
    title, text = render(settings, event, notice)
    message = EmailMessage()
    message["From"] = settings.smtp_from
    message["To"] = ", ".join(to)
    message["Subject"] = title
    message.set_content(text)
    return message


def render(settings: Settings, event: AlertEvent, notice: str) -> tuple[str, str]:
    """Return the title and text of the notice: the mail's subject and body, and what every URL
    gets; secrets redacted."""
    text = redact("\n".join(body(event, notice)), settings.secret_values()) + "\n"
    return f"[VQ Backup] {subject(event, notice)}", text


def subject(event: AlertEvent, notice: str) -> str:
    """Return the subject line (without the [VQ Backup] tag)."""
    about = f": {event.backup_id}" if event.backup_id else ""
    if notice == "summary":
        return f"OK{about}"
    if notice == "resolved":
        return f"RESOLVED: {RESOLVED[event.condition]}{about}"
    names = [" ".join(name.split()) for name in sorted(event.failures)]  # one line, whatever a name holds
    parts = ", ".join(names[:SUBJECT_PARTS]) + (
        f" and {len(names) - SUBJECT_PARTS} more" if len(names) > SUBJECT_PARTS else ""
    )
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
