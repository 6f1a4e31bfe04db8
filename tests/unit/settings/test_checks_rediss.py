"""A rediss:// URL for Celery's Redis must name ssl_cert_reqs in the words kombu and redis-py both read."""

from __future__ import annotations

import pytest

from vq_tasks.settings.checks import rediss_problems


@pytest.mark.parametrize(
    ("query", "ok"),
    [("ssl_cert_reqs=required&ssl_ca_certs=/ca.pem", True), ("ssl_cert_reqs=none", False),
     ("ssl_cert_reqs=optional", False), ("ssl_cert_reqs=CERT_REQUIRED", False), ("", False),
     ("ssl_ca_certs=/ca.pem", False)],
)  # fmt: skip
def test_rediss_needs_ssl_cert_reqs_in_lower_case(query, ok):
    problems = rediss_problems("CELERY_BROKER_URL", f"rediss://:secret@redis:6380/0?{query}")
    assert (problems == []) is ok
    assert all("secret" not in p for p in problems)


def test_plain_redis_urls_are_not_concerned():
    assert rediss_problems("CELERY_BROKER_URL", "redis://:secret@redis:6379/0") == []
