"""What DB_USER may not read, as one message: every object named (the first ten of a kind), each kind
with its fix, no secret; pg_dump's stop recognised; its warnings on success kept as what it left out."""

from __future__ import annotations

import pytest

from vq_tasks.clients.pg_tools import (
    NAMES_SHOWN,
    WARNING_LENGTH,
    WARNINGS_KEPT,
    Unreadable,
    access_denied,
    access_error,
    dump_warnings,
    quote_ident,
)
from vq_tasks.errors import PermanentError
from vq_tasks.settings import load_settings

SETTINGS = load_settings(
    celery_broker_url="redis://127.0.0.1:1/0",
    db_host="db",
    db_name="vq",
    db_user="backup",
    db_password="pw-123",
)


@pytest.mark.parametrize(
    ("stderr", "stopped_at"),
    [
        (
            "pg_dump: error: query failed: ERROR:  permission denied for table secrets\n"
            "pg_dump: detail: Query was: LOCK TABLE public.secrets IN ACCESS SHARE MODE",
            "permission denied for table secrets",
        ),
        (
            "pg_dump: error: query failed: ERROR:  permission denied for schema s1",
            "permission denied for schema s1",
        ),
        (
            "pg_dump: error: query failed: ERROR:  permission denied for sequence q",
            "permission denied for sequence q",
        ),
        (
            "pg_dump: error: could not open large object 16404: "
            "ERROR:  permission denied for large object 16404",
            "permission denied for large object 16404",
        ),
        (
            "pg_dump: error: query failed: "
            'ERROR:  query would be affected by row-level security policy for table "r"',
            'query would be affected by row-level security policy for table "r"',
        ),
    ],
)
def test_a_stop_at_an_object_it_may_not_read_is_recognised(stderr, stopped_at):
    assert access_denied(stderr) == stopped_at


@pytest.mark.parametrize(
    "stderr",
    [
        'pg_dump: error: connection to server at "db", port 5432 failed: Connection refused',
        'pg_dump: error: connection to server at "db", port 5432 failed: '
        'FATAL:  permission denied for database "vq"',
        "pg_dump: error: query failed: ERROR:  permission denied for function lo_open",
    ],
)
def test_other_failures_are_not_taken_for_it(stderr):
    assert access_denied(stderr) is None


def test_every_kind_is_named_with_its_fix():
    message = str(
        access_error(
            SETTINGS,
            [
                Unreadable("schema", 1, ("s2",)),
                Unreadable("table", 2, ("s1.t1", "s2.t2")),
                Unreadable("sequence", 1, ("s1.q",)),
                Unreadable("row security", 1, ("public.r",)),
                Unreadable("large object", 2, ("16404", "16405")),
            ],
            "permission denied for schema s2",
        )
    )
    assert message == (
        "PostgreSQL db:5432/vq: DB_USER backup may not read all that pg_dump must. "
        "Tables without SELECT: s1.t1, s2.t2; sequences without SELECT: s1.q; schemas without USAGE: s2. "
        "Fix: GRANT pg_read_all_data TO backup (PostgreSQL 14+; on RDS, Azure or Cloud SQL the admin user "
        "can grant it), or GRANT USAGE ON SCHEMA and SELECT ON those tables and sequences TO backup. "
        "Tables with row-level security (pg_dump reads every row): public.r. Fix: ALTER ROLE backup "
        "BYPASSRLS, or back up as their owner (when they do not FORCE ROW LEVEL SECURITY). "
        "Large objects without SELECT: 16404, 16405. Fix: GRANT SELECT ON LARGE OBJECT 16404 TO backup, "
        "one per object (pg_read_all_data covers them only from PostgreSQL 19), or back up as their owner. "
        "(pg_dump stopped at: permission denied for schema s2)"
    )


def test_only_the_kinds_found_are_spoken_of():
    message = str(access_error(SETTINGS, [Unreadable("row security", 1, ('"Odd Name".t',))], "x"))
    assert 'Tables with row-level security (pg_dump reads every row): "Odd Name".t.' in message
    assert "pg_read_all_data" not in message and "LARGE OBJECT" not in message
    assert "Tables without SELECT" not in message


def test_a_lone_sequence_or_schema_starts_its_sentence_in_capitals():
    message = str(access_error(SETTINGS, [Unreadable("sequence", 1, ("s.q",))], "x"))
    assert "must. Sequences without SELECT: s.q. Fix: GRANT pg_read_all_data TO backup" in message


def test_names_are_capped_with_how_many_more():
    names = tuple(f"public.t{i:02}" for i in range(NAMES_SHOWN))
    message = str(access_error(SETTINGS, [Unreadable("table", 250, names)], "x"))
    assert f"Tables without SELECT: {', '.join(names)} and {250 - NAMES_SHOWN} more. Fix:" in message


def test_an_odd_user_name_is_quoted_in_the_fix_and_no_secret_is_shown():
    settings = SETTINGS.model_copy(update={"db_user": "Backup-User"})
    error = access_error(
        settings, [Unreadable("table", 1, ("public.t",))], "permission denied for table pw-123"
    )
    assert isinstance(error, PermanentError)
    assert 'GRANT pg_read_all_data TO "Backup-User" (' in str(error)
    assert "DB_USER Backup-User may not" in str(error)
    assert "pw-123" not in str(error)


@pytest.mark.parametrize(
    ("name", "quoted"),
    [("backup", "backup"), ("_b$1", "_b$1"), ("Backup", '"Backup"'), ("a b", '"a b"'), ('a"b', '"a""b"')],
)
def test_quote_ident(name, quoted):
    assert quote_ident(name) == quoted


def test_warnings_are_kept_without_their_prefix_with_their_details_once_each():
    stderr = (
        "pg_dump: warning: subscriptions not dumped because current user is not a superuser\n"
        "pg_dump: warning: there are circular foreign-key constraints on this table:\n"
        "pg_dump: detail: orders\n"
        "pg_dump: hint: You might not be able to restore the dump without using --disable-triggers.\n"
        "pg_dump: warning: subscriptions not dumped because current user is not a superuser\n"
        "something else entirely\n"
    )
    assert dump_warnings(stderr, []) == [
        "subscriptions not dumped because current user is not a superuser",
        "there are circular foreign-key constraints on this table: (orders)",
    ]


def test_warnings_are_redacted_and_capped():
    long = "x" * (WARNING_LENGTH + 50)
    stderr = "".join(f"pg_dump: warning: number {i} with pw-123\n" for i in range(WARNINGS_KEPT + 5))
    kept = dump_warnings(f"pg_dump: warning: {long}\n{stderr}", SETTINGS.secret_values())
    assert len(kept) == WARNINGS_KEPT
    assert kept[0] == "x" * (WARNING_LENGTH - 1) + "…"
    assert kept[1] == "number 0 with ***"
    assert not any("pw-123" in k for k in kept)


def test_no_warnings_give_nothing():
    assert dump_warnings("", []) == []
