"""pg_dump's messages become transient or permanent errors that say what to fix."""

import pytest

from vq_tasks.clients.pg_tools import classify_pg_error, pg_environment
from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.settings import load_settings

SETTINGS = load_settings(celery_broker_url="redis://127.0.0.1:1/0", db_password="pw-123", db_host="db")


@pytest.mark.parametrize(
    ("stderr", "kind", "fragment"),
    [
        (
            'pg_dump: error: connection to server at "db" (10.0.0.5), port 5432 failed: Connection refused\n'
            "\tIs the server running on that host and accepting TCP/IP connections?",
            TransientError,
            "unreachable",
        ),
        (
            'pg_dump: error: connection to server at "db", port 5432 failed: FATAL:  password authentication '
            'failed for user "postgres"',
            PermanentError,
            "password authentication failed",
        ),
        (
            'pg_dump: error: connection to server at "db", port 5432 failed: '
            'FATAL:  database "vq" does not exist',
            PermanentError,
            "does not exist",
        ),
        (
            "pg_dump: error: connection to server on socket failed: "
            "FATAL:  the database system is starting up",
            TransientError,
            "starting up",
        ),
        (
            "pg_dump: error: aborting because of server version mismatch\n"
            "pg_dump: detail: server version: 18.1; pg_dump version: 15.20 (Debian 15.20-0+deb12u1)",
            PermanentError,
            "pg_dump 15.20 is older than the PostgreSQL server 18.1",
        ),
        (
            "pg_dump: error: query failed: ERROR:  permission denied for table secrets",
            PermanentError,
            "permission",
        ),
        ("pg_dump: error: something new with pw-123 inside", PermanentError, "***"),
    ],
)
def test_classification(stderr, kind, fragment):
    error = classify_pg_error(stderr, SETTINGS)
    assert type(error) is kind
    assert fragment in str(error)
    assert "pw-123" not in str(error)


def test_password_goes_through_the_environment_only():
    env = pg_environment(SETTINGS)
    assert env["PGPASSWORD"] == "pw-123" and env["PGHOST"] == "db" and env["LC_MESSAGES"] == "C"
