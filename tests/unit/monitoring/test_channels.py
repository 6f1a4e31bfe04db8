"""The Apprise URLs of BACKUP_ALERT_URLS and NOTIFICATION_URLS without a network: how they are split,
which of their parts are secrets, how a URL is named, Apprise's logging kept to ourselves, and the
start-up check. Sending to them is tested against a real HTTP server (integration/test_alert_urls.py)."""

from __future__ import annotations

import logging

import apprise
import pytest

from vq_tasks.monitoring import channels
from vq_tasks.settings import ConfigError, load_settings
from vq_tasks.settings.checks import quiet_apprise
from vq_tasks.settings.secrets import split_urls, url_secret_parts

OK = {"celery_broker_url": "redis://127.0.0.1:6390/0"}
SLACK = "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ/#backups"
TELEGRAM = "tgram://123456789:AAEbotTOKENxyz123456/987654321"
WEBHOOK = "json://hookuser:Pa55w0rdXY@hooks.example.com:8443/alerts/T0ken4242?+X-Token=HeaderSecret99"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(("BACKUP_", "NOTIFICATION_", "SMTP_", "CELERY_")):
            monkeypatch.delenv(name)


def test_urls_are_separated_by_commas_or_whitespace():
    assert split_urls(f" {SLACK},{TELEGRAM}\n  {WEBHOOK} ,, ") == [SLACK, TELEGRAM, WEBHOOK]
    assert split_urls("") == []


@pytest.mark.parametrize(
    ("url", "secret", "public"),
    [
        (SLACK, ["T1JJ3T3L2", "A1BRTD4JD", "TIiajkdnlazkcOXrIdevi7FQ"], ["backups"]),
        (TELEGRAM, ["123456789:AAEbotTOKENxyz123456", "AAEbotTOKENxyz123456", "987654321"], []),
        (WEBHOOK, ["hookuser", "Pa55w0rdXY", "T0ken4242", "HeaderSecret99"], ["hooks.example.com", "alerts"]),
        ("json://127.0.0.1:8080/webhooks/", [], ["127.0.0.1", "webhooks", "8080"]),
        ("json://localhost/hook?secret=a%2Fb%20c123", ["a%2Fb%20c123", "a/b c123"], ["localhost"]),
        (
            "discord://4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js",
            ["4174216298", "JHMHI8qBe7bk2ZwO5U711o3dV_js"],
            [],
        ),
    ],
)
def test_the_secret_parts_of_a_url_are_its_tokens_and_passwords_not_its_words(url, secret, public):
    parts = url_secret_parts(url)
    assert set(secret) <= set(parts)
    assert not set(public) & set(parts)
    assert all(len(part) >= 6 for part in parts)  # shorter ones would be replaced in every message


def test_secret_values_hold_every_url_whole_and_its_secret_parts(tmp_path, monkeypatch):
    file = tmp_path / "urls"
    file.write_text(f"{SLACK}\n{TELEGRAM}\n")
    monkeypatch.setenv("BACKUP_ALERT_URLS_FILE", str(file))
    settings = load_settings(**OK, notification_urls=WEBHOOK)
    found = set(settings.secret_values())
    assert {
        SLACK,
        TELEGRAM,
        WEBHOOK,
        "TIiajkdnlazkcOXrIdevi7FQ",
        "AAEbotTOKENxyz123456",
        "Pa55w0rdXY",
    } <= found
    assert channels.urls_for(settings, "backup") == [SLACK, TELEGRAM]
    assert channels.urls_for(settings, "success") == [WEBHOOK]
    quiet = load_settings(**OK, notification_urls=WEBHOOK, backup_alert_on_failure=False)
    assert channels.urls_for(quiet, "backup") == []


def test_a_url_is_named_by_apprise_s_privacy_form_with_its_secrets_redacted():
    settings = load_settings(**OK, backup_alert_urls=f"{WEBHOOK} {SLACK}")
    secrets = settings.secret_values()
    webhook, slack = (channels.label(apprise.Apprise.instantiate(url), secrets) for url in (WEBHOOK, SLACK))
    assert (webhook, slack) == ("json://***:****@hooks.example.com:8443/...", "slack://T...2/...")


def test_no_handler_sees_apprise_s_logging_and_its_last_warning_is_kept_without_urls(caplog):
    caplog.set_level(logging.DEBUG)
    guard = quiet_apprise()
    assert quiet_apprise() is guard  # one guard, however often it is asked for
    apprise.Apprise.instantiate("msteams://abcdefg@T1JJ3T3L2/TIiajkdnlazkcOXrIdevi7FQ/")  # "Unparseable URL"
    assert guard.take() == "Unparseable URL msteams://..."
    logging.getLogger("apprise").warning("could not reach %s (%s)", WEBHOOK, "refused")
    assert caplog.records == []  # pytest attaches its handler to Apprise's logger too: none got through
    assert guard.take() == "could not reach json://... (refused)"
    assert guard.take() == ""


def test_start_up_names_each_unusable_url_by_position_and_scheme_only():
    urls = f"{WEBHOOK}, slak://T1JJ3T3L2/TIiajkdnlazkcOXrIdevi7FQ slack://OnlyOneToken99 not-a-url-Secret77"
    with pytest.raises(ConfigError) as caught:
        load_settings(
            **OK, backup_alert_urls=urls, notification_urls=f"{SLACK} https://nowhere.example.com/x"
        )
    unknown = "Apprise knows no such scheme (slack, workflows, tgram, json, ...)"
    assert caught.value.problems == [
        f"BACKUP_ALERT_URLS: URL 2 (slak://): {unknown}",
        "BACKUP_ALERT_URLS: URL 3 (slack://) is not one Apprise can use: a token or part of it is missing "
        "or malformed",
        "BACKUP_ALERT_URLS: URL 4 is no URL (scheme://...): see https://github.com/caronc/apprise/wiki for "
        "the forms",
        f"NOTIFICATION_URLS: URL 2 (https://): {unknown}",
    ]
    text = str(caught.value)
    for secret in ("T1JJ3T3L2", "TIiajkdnlazkcOXrIdevi7FQ", "OnlyOneToken99", "Secret77", "nowhere"):
        assert secret not in text


def test_usable_urls_pass_the_start_up_check():
    settings = load_settings(**OK, backup_alert_urls=f"{SLACK},{TELEGRAM}", notification_urls=WEBHOOK)
    assert settings.backup_alert_urls is not None
