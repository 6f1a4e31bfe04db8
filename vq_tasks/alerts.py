"""Alert emails: a failed backup or restore drill to BACKUP_ALERT_EMAIL, a success summary to
NOTIFICATION_EMAIL.

Events cross the broker as plain JSON and hold ids, names and redacted error text, never a secret.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from typing import Literal

from pydantic import BaseModel

from vq_tasks.errors import TransientError, redact
from vq_tasks.settings import Settings

FAILURE_EVENTS = ("backup_failed", "drill_failed", "offsite_failed")


class AlertEvent(BaseModel):
    event: Literal["backup_failed", "backup_succeeded", "drill_failed", "offsite_failed"]
    backup_id: str
    failures: dict[str, str] = {}
    summary: dict[str, str] = {}
    run_id: str | None = None  # a drill's run (its task id): one alert per run, however often redelivered

    @property
    def claim_name(self) -> str:
        run = f":{self.run_id}" if self.run_id else ""
        return f"alert:{self.event}:{self.backup_id}{run}"


def recipients(settings: Settings, event: AlertEvent) -> list[str]:
    """Return who should get ``event`` (an empty list: nobody, by configuration)."""
    if event.event in FAILURE_EVENTS:
        target = settings.backup_alert_email if settings.backup_alert_on_failure else None
    else:
        target = settings.notification_email
    return [address.strip() for address in (target or "").split(",") if address.strip()]


def compose(settings: Settings, event: AlertEvent, to: list[str]) -> EmailMessage:
    """Return the email for ``event``: a subject that says what happened, a body that says where."""
    message = EmailMessage()
    message["From"] = settings.smtp_from
    message["To"] = ", ".join(to)
    if event.event == "backup_failed":
        parts = ", ".join(sorted(event.failures)) or "unknown component"
        message["Subject"] = f"[VQ Backup] FAILED: {event.backup_id} ({parts})"
        lines = [f"Backup {event.backup_id} failed. No manifest was written; staging was cleaned.", ""]
        lines += [
            f"Failed component: {name}\nError: {error}\n" for name, error in sorted(event.failures.items())
        ]
    elif event.event == "offsite_failed":
        message["Subject"] = f"[VQ Backup] OFF-SITE COPY FAILED: {event.backup_id}"
        lines = [
            f"Backup {event.backup_id} is complete in the primary storage, but its off-site copy failed.",
            "The off-site destination holds no manifest for it; the next copy tries again.",
            "",
        ]
        lines += [f"Error: {error}\n" for error in event.failures.values()]
    elif event.event == "drill_failed":
        parts = ", ".join(sorted(event.failures)) or "unknown step"
        message["Subject"] = f"[VQ Backup] RESTORE DRILL FAILED: {event.backup_id} ({parts})"
        lines = drill_lines(event)
    else:
        message["Subject"] = f"[VQ Backup] OK: {event.backup_id}"
        lines = [f"Backup {event.backup_id} completed.", ""]
    lines += [f"{key}: {value}" for key, value in event.summary.items()]
    message.set_content(redact("\n".join(lines), settings.secret_values()) + "\n")
    return message


def drill_lines(event: AlertEvent) -> list[str]:
    """Return the body of a failed restore drill's email: what it means, then each failure."""
    removed = (
        "some scratch copies could not be removed: see 'cleanup' below"
        if "cleanup" in event.failures
        else "the scratch copies were removed"
    )
    lines = [
        f"The restore drill of backup {event.backup_id} failed: this backup may not restore.",
        f"The drill restores into a scratch database and a scratch Redis, never the live ones; {removed}.",
        "",
    ]
    return lines + [f"Failed: {name}\nError: {error}\n" for name, error in sorted(event.failures.items())]


def send(settings: Settings, message: EmailMessage) -> None:
    """Send ``message`` through the configured SMTP server. Raise TransientError if it cannot."""
    try:
        if settings.smtp_ssl:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                settings.smtp_host,
                settings.smtp_port,
                timeout=settings.smtp_timeout,
                context=ssl.create_default_context(),
            )
        else:
            smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout)
        with smtp:
            if settings.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if settings.smtp_user and settings.smtp_password is not None:
                smtp.login(settings.smtp_user, settings.smtp_password.get_secret_value())
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        reason = redact(str(exc), settings.secret_values())
        raise TransientError(f"SMTP {settings.smtp_host}:{settings.smtp_port}: {reason}") from None
