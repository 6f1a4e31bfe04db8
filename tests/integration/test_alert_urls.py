"""Alerts and summaries to Apprise URLs beside the mail: a real HTTP server on 127.0.0.1 takes the
JSON of Apprise's json:// scheme, a real SMTP server (aiosmtpd) the mail, and the incidents live in
a real Redis. One notice per incident on every channel; a webhook that is down is retried and does
not stop the mail; a notice no channel took stays owed; a URL's secrets appear nowhere."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.integration.conftest import Mailbox
from tests.integration.test_alerts import alert_settings, subjects, text  # noqa: F401 (a fixture)
from tests.servers import free_port
from vq_tasks import coordination
from vq_tasks.errors import TransientError
from vq_tasks.monitoring import channels
from vq_tasks.monitoring.alerts import AlertEvent, deliver, send_owed

pytestmark = pytest.mark.integration
PREFIX = "virtualqueue_backup"
PROBLEM = AlertEvent(
    condition="backup",
    backup_id=f"{PREFIX}_20261101_020000",
    failures={"database": f"pg_dump: {PREFIX}_20261101_020000 connection refused"},
)


@dataclass
class Webhook:
    """A JSON webhook: records every request and answers each with the next of ``answers``, then
    with ``status``."""

    answers: list[int]
    status: int = 200
    hits: list[tuple[str, dict[str, str], dict]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def received(self) -> list[dict]:
        """The JSON bodies of the requests answered with success."""
        return [body for _, _, body in self.hits if body.get("_status") == 200]

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    @property
    def label(self) -> str:
        """How its URLs are named: scheme and host (Apprise's privacy form), no path."""
        return f"json://127.0.0.1:{self.port}/..."

    def url(self, path: str = "/hook", userinfo: str = "", query: str = "") -> str:
        return f"json://{userinfo}127.0.0.1:{self.port}{path}{query}"

    def answer(self) -> int:
        return self.answers.pop(0) if self.answers else self.status


def _handler(hook: Webhook) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status = hook.answer()
            hook.hits.append((self.path, dict(self.headers), {**body, "_status": status}))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def webhooks() -> Iterator[Callable[..., Webhook]]:
    """Start webhooks (http.server on a free port, in a thread); all stopped afterwards."""
    started: list[ThreadingHTTPServer] = []

    def start(answers: tuple[int, ...] = (), status: int = 200) -> Webhook:
        hook = Webhook(list(answers), status)
        hook.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hook))
        threading.Thread(target=hook.server.serve_forever, daemon=True).start()
        started.append(hook.server)
        return hook

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch):
    """The same attempts as in production, without seconds of waiting between them."""
    monkeypatch.setattr(channels, "BACKOFF", (0.05, 0.1))


def audited(settings) -> list[dict]:
    return [json.loads(line) for line in settings.backup_audit_log.read_text().splitlines()]


def event(failures: dict[str, str], night: int) -> AlertEvent:
    return AlertEvent(condition="backup", backup_id=f"{PREFIX}_202611{night:02d}_020000", failures=failures)


def test_an_incident_reaches_the_webhook_and_the_mail_once_when_opened_changed_and_resolved(
    alert_settings,  # noqa: F811
    smtp: tuple[int, Mailbox],
    webhooks,
):
    _, mailbox = smtp
    hook = webhooks()
    settings = alert_settings(backup_alert_urls=hook.url())
    assert deliver(settings, PROBLEM) == f"opened notice sent to oncall@example.com, {hook.label}"
    assert deliver(settings, PROBLEM).startswith("no alert sent: nothing new")
    same = event({"database": f"pg_dump: {PREFIX}_20261102_020000 connection refused"}, 2)
    assert deliver(settings, same).startswith("no alert sent: nothing new")
    assert len(hook.hits) == 1 and len(mailbox.messages) == 1

    assert "changed notice sent" in deliver(settings, event({"redis": "authentication failed"}, 3))
    assert "resolved notice sent" in deliver(settings, event({}, 4))
    assert deliver(settings, event({}, 5)).startswith("no alert sent: nothing new")
    assert [body["title"] for body in hook.received] == subjects(mailbox)
    assert [body["type"] for body in hook.received] == ["failure", "warning", "success"]
    assert [body["message"] for body in hook.received] == [text(m).strip() for m in mailbox.messages]
    sent = [entry for entry in audited(settings) if entry["outcome"] == "sent"]
    assert [entry["notice"] for entry in sent] == ["opened", "changed", "resolved"]
    assert all(entry["to"] == ["oncall@example.com", hook.label] for entry in sent)


def test_a_success_summary_goes_to_notification_urls_without_any_smtp_server(
    alert_settings,  # noqa: F811
    webhooks,
):
    hook = webhooks()
    settings = alert_settings(
        smtp_port=free_port(),  # nothing listens: URLs alone need no SMTP server
        notification_email=None,
        backup_alert_email=None,
        notification_urls=hook.url("/summaries"),
    )
    summary = AlertEvent(
        condition="success", backup_id=f"{PREFIX}_20261104_020000", summary={"kind": "daily"}
    )
    assert deliver(settings, summary) == f"summary notice sent to {hook.label}"
    assert deliver(settings, summary) == "no summary sent: sent already"
    assert [(b["title"], b["type"]) for b in hook.received] == [
        (f"[VQ Backup] OK: {PREFIX}_20261104_020000", "success")
    ]
    assert "kind: daily" in hook.received[0]["message"]
    nobody = "no alert sent: BACKUP_ALERT_EMAIL is not set, nor BACKUP_ALERT_URLS"
    assert deliver(settings, PROBLEM).startswith(nobody)


def test_a_webhook_that_fails_twice_is_retried_and_takes_the_notice(
    alert_settings,  # noqa: F811
    smtp,
    webhooks,
    caplog,
):
    _, mailbox = smtp
    hook = webhooks(answers=(503, 503))
    settings = alert_settings(backup_alert_urls=hook.url())
    assert "opened notice sent to oncall@example.com, json://" in deliver(settings, PROBLEM)
    assert [body["_status"] for _, _, body in hook.hits] == [503, 503, 200]
    assert len(mailbox.messages) == 1
    assert "did not reach" not in caplog.text
    assert [entry["outcome"] for entry in audited(settings)] == ["sent"]


@pytest.mark.parametrize("down", ["nothing-listening", "always-503"])
def test_a_webhook_that_stays_down_does_not_stop_the_mail_and_gets_no_second_notice(
    alert_settings,  # noqa: F811
    smtp,
    webhooks,
    caplog,
    down,
):
    _, mailbox = smtp
    hook = webhooks(status=503)
    port = hook.port if down == "always-503" else free_port()
    settings = alert_settings(backup_alert_urls=f"json://127.0.0.1:{port}/hook")
    with caplog.at_level(logging.WARNING):
        assert deliver(settings, PROBLEM) == "opened mail sent to oncall@example.com"
    reason = "error=503" if down == "always-503" else "A Connection error occurred"  # Apprise's words
    label = f"json://127.0.0.1:{port}/..."
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "vq_tasks.monitoring.alerts"]
    assert warning.startswith(f"the backup opened notice did not reach {label} after 3 attempt(s): ")
    assert reason in warning
    failed, sent = audited(settings)
    assert (failed["outcome"], failed["channel"], failed["attempts"]) == ("failed", label, 3)
    assert (sent["outcome"], sent["to"]) == ("sent", ["oncall@example.com"])
    assert deliver(settings, PROBLEM).startswith("no alert sent: nothing new")  # sent: not owed
    assert len(mailbox.messages) == 1
    assert len(hook.hits) == (3 if down == "always-503" else 0)


def test_a_notice_no_channel_took_stays_owed_and_the_next_try_sends_it(
    alert_settings,  # noqa: F811
    smtp,
    webhooks,
):
    _, mailbox = smtp
    down, up = webhooks(status=503), webhooks()
    with pytest.raises(TransientError, match=r"SMTP 127\.0\.0\.1"):  # the mail's own error
        deliver(alert_settings(smtp_port=free_port(), backup_alert_urls=down.url()), PROBLEM)
    urls_only = alert_settings(backup_alert_email=None, backup_alert_urls=down.url())
    with pytest.raises(TransientError, match=r"reached no channel \(json://127\.0\.0\.1:\d+/\.\.\.: .*=503"):
        deliver(urls_only, PROBLEM)
    assert len(down.hits) == 6 and mailbox.messages == []

    working = alert_settings(backup_alert_urls=up.url())
    sent = f"backup: opened notice sent to oncall@example.com, {up.label}"
    assert send_owed(working, origin="exporter") == [sent]
    assert deliver(working, PROBLEM).startswith("no alert sent: nothing new")
    assert len(up.received) == 1 and len(mailbox.messages) == 1


def test_a_url_s_password_and_tokens_appear_in_no_log_error_audit_or_event(
    alert_settings,  # noqa: F811
    webhooks,
    caplog,
):
    hook = webhooks(status=503)
    url = hook.url("/alerts/T0ken4242", userinfo="hookuser:Pa55w0rdXY@", query="?+X-Token=HeaderSecret99")
    settings = alert_settings(backup_alert_email=None, backup_alert_urls=url)
    caplog.set_level(logging.INFO)  # the worker's level (and its log lines are redacted besides)
    caplog.set_level(logging.DEBUG, logger="apprise")  # Apprise's own lines, even at DEBUG: none pass
    with pytest.raises(TransientError) as failed:
        deliver(settings, PROBLEM)
    hook.status = 200
    outcome = deliver(settings, PROBLEM)
    label = f"json://***:****@127.0.0.1:{hook.port}/..."
    assert outcome == f"opened notice sent to {label}" and label in caplog.text
    payload = PROBLEM.model_dump_json()  # what crosses the broker (the alert task's argument, in Flower)
    stored = coordination.open_incident(coordination.client(settings), "backup") or ""
    path, headers, _ = hook.hits[-1]  # the secrets did their work
    assert (path, headers["X-Token"], headers["Authorization"]) == (
        "/alerts/T0ken4242",
        "HeaderSecret99",
        "Basic aG9va3VzZXI6UGE1NXcwcmRYWQ==",
    )
    seen = "\n".join([caplog.text, str(failed.value), settings.backup_audit_log.read_text(), stored, payload])
    for secret in ("hookuser", "Pa55w0rdXY", "T0ken4242", "HeaderSecret99", url):
        assert secret not in seen
