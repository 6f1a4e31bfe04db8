"""Alerts and summaries to chat and webhooks: the Apprise URLs of BACKUP_ALERT_URLS and
NOTIFICATION_URLS (Slack, Teams, Telegram, a JSON webhook, ...), beside the mail (alerts.py decides
what to send and when; this module sends it).

Each URL is tried ATTEMPTS times, BACKOFF seconds apart (Apprise's own throttle between them off:
three requests are no flood), and reports what became of it; one that stays down does not hold up
the others for long: all of a notice's URLs share DEADLINE seconds (a worker's task or the
exporter's reading waits for them), after which the rest are not tried again. A URL holds tokens,
so it is named only by its label: the scheme and host of Apprise's privacy form, every secret
redacted (``json://host:8080/...``). Apprise's own logging names URLs whole; no handler sees it
(settings.checks.quiet_apprise), and its last warning, URLs cut to their scheme, becomes the
reason a URL failed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vq_tasks.errors import redact
from vq_tasks.settings.checks import URL_SCHEME, quiet_apprise, without_urls
from vq_tasks.settings.secrets import split_urls

if TYPE_CHECKING:
    from apprise import NotifyBase

    from vq_tasks.settings import Settings
    from vq_tasks.settings.checks import AppriseLogGuard

ATTEMPTS = 3
BACKOFF = (1.0, 2.0)  # seconds before the second and the third attempt
DEADLINE = 30.0  # seconds for all URLs of one notice (an attempt may take Apprise's 4 s + 4 s timeouts)
NOTIFY_TYPES = {"opened": "failure", "changed": "warning", "resolved": "success", "summary": "success"}


@dataclass(frozen=True)
class ChannelResult:
    """What became of one URL: its label, whether it took the notice, after how many attempts,
    and why not (redacted)."""

    label: str
    delivered: bool
    attempts: int
    reason: str = ""


def urls_for(settings: Settings, condition: str) -> list[str]:
    """Return the URLs that should hear of ``condition``: NOTIFICATION_URLS for a success summary,
    else BACKUP_ALERT_URLS when BACKUP_ALERT_ON_FAILURE (an empty list: none, by configuration)."""
    if condition == "success":
        value = settings.notification_urls
    else:
        value = settings.backup_alert_urls if settings.backup_alert_on_failure else None
    return split_urls(value.get_secret_value()) if value is not None else []


def notify(
    urls: list[str], title: str, body: str, notice: str, secrets: Iterable[str]
) -> list[ChannelResult]:
    """Send ``title`` and ``body`` to every URL of ``urls``; return what became of each. ``notice``
    (opened, changed, resolved, summary) sets the kind Apprise shows (failure, warning, success);
    ``secrets`` are redacted from labels and reasons. Without URLs Apprise is not even imported
    (its import costs a worker tens of MiB)."""
    if not urls:
        return []
    guard = quiet_apprise()  # before the import: Apprise logs as it loads
    import apprise

    secrets = list(secrets)
    results = []
    deadline = time.monotonic() + DEADLINE
    for url in urls:
        plugin = apprise.Apprise.instantiate(url)
        if plugin is None:  # the start-up check keeps this from happening
            results.append(ChannelResult(_scheme_only(url), False, 0, "Apprise cannot load this URL"))
            continue
        plugin.request_rate_per_sec = 0  # our own backoff spaces the attempts
        results.append(_send(plugin, title, body, NOTIFY_TYPES[notice], secrets, guard, deadline))
    return results


def _send(
    plugin: NotifyBase,
    title: str,
    body: str,
    kind: str,
    secrets: list[str],
    guard: AppriseLogGuard,
    deadline: float,
) -> ChannelResult:
    """Try ``plugin`` up to ATTEMPTS times, sleeping BACKOFF between, while ``deadline`` (a
    time.monotonic()) allows; return what became of it."""
    name = label(plugin, secrets)
    reason = f"not tried: the {DEADLINE:.0f} s for this notice's URLs had run out"
    for attempt in range(1, ATTEMPTS + 1):
        pause = BACKOFF[min(attempt - 2, len(BACKOFF) - 1)] if attempt > 1 else 0.0
        if time.monotonic() + pause >= deadline:
            return ChannelResult(name, False, attempt - 1, redact(reason, secrets))
        time.sleep(pause)
        guard.take()
        try:
            if plugin.notify(body=body, title=title, notify_type=kind):
                return ChannelResult(name, True, attempt)
            reason = guard.take() or "Apprise reported a failure"
        except Exception as exc:  # a plugin's bug must not stop the other channels
            reason = f"{type(exc).__name__}: {without_urls(str(exc))}"
    return ChannelResult(name, False, ATTEMPTS, redact(reason, secrets))


def label(plugin: NotifyBase, secrets: Iterable[str]) -> str:
    """Return how the URL of ``plugin`` is named in logs, audit entries, errors and results: the
    scheme and host of Apprise's privacy form (tokens shortened, passwords masked) then ``/...``,
    with every one of ``secrets`` redacted. Never the URL itself: it is a secret value, which
    redaction would turn into ``***`` wherever it stood."""
    scheme, _, rest = plugin.url(privacy=True).partition("://")
    return redact(f"{scheme}://{re.split(r'[/?#]', rest, maxsplit=1)[0]}/...", secrets)


def _scheme_only(url: str) -> str:
    """Return ``url`` cut to its scheme, for a URL Apprise cannot load."""
    scheme = URL_SCHEME.match(url)
    return f"{scheme[1]}://..." if scheme else "(not a URL)"
