"""Database restore, the parts that need no server: names, CREATE DATABASE options, carried-over
settings, the role scan of a dump, and psql's messages turned into errors that say what to fix."""

import io
import json
from pathlib import Path

import pytest

from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.restore.postgres import (
    DatabaseRestorePlan,
    DatabaseRestoreResult,
    locale_options,
    new_database_options,
    restore_database,
)
from vq_tasks.restore.postgres_connect import psql_failure
from vq_tasks.restore.postgres_roles import referenced_roles, roles_in_statement
from vq_tasks.restore.postgres_swap import derived_name, setting_statement
from vq_tasks.settings import load_settings

SETTINGS = load_settings(
    celery_broker_url="redis://127.0.0.1:1/0", db_password="pw-123", db_host="db", db_name="vq", db_user="app"
)


def render(composable) -> str:
    return composable.as_string(None)


def test_derived_names_fit_in_63_bytes():
    assert derived_name("virtualqueue", "restore", "20240115020000") == "virtualqueue_restore_20240115020000"
    assert derived_name("vq", "before", "20240115020000") == "vq_before_20240115020000"
    long = derived_name("é" * 40, "restore", "20240115020000")
    assert len(long.encode()) <= 63 and long.endswith("_restore_20240115020000")
    long.encode().decode()  # no character cut in half


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {
                "encoding_name": "UTF8",
                "datcollate": "en_US.UTF-8",
                "datctype": "en_US.UTF-8",
                "datlocprovider": "c",
            },
            "ENCODING 'UTF8' LC_COLLATE 'en_US.UTF-8' LC_CTYPE 'en_US.UTF-8'",
        ),
        (
            {"encoding_name": "LATIN1", "datcollate": "C", "datctype": "C"},  # before PostgreSQL 15
            "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'",
        ),
        (
            {
                "encoding_name": "UTF8",
                "datcollate": "C",
                "datctype": "C",
                "datlocprovider": "i",
                "daticulocale": "de",
            },
            "ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' LOCALE_PROVIDER icu ICU_LOCALE 'de'",
        ),
        (
            {
                "encoding_name": "UTF8",
                "datcollate": "C",
                "datctype": "C",
                "datlocprovider": "b",
                "datlocale": "C.UTF-8",
            },
            "ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' LOCALE_PROVIDER builtin BUILTIN_LOCALE 'C.UTF-8'",
        ),
    ],
)
def test_locale_options_copy_encoding_and_locale(row, expected):
    assert " ".join(render(option) for option in locale_options(row)) == expected


TEMPLATE0 = {"encoding_name": "UTF8", "datcollate": "C.UTF-8", "datctype": "C.UTF-8", "datlocprovider": "c"}


@pytest.mark.parametrize(
    ("template", "encoding", "expected"),
    [
        (TEMPLATE0, "UTF8", ""),  # the server's default is the dump's: as it was
        (TEMPLATE0, None, ""),
        (TEMPLATE0, "SQL_ASCII", "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'"),
        (  # template0 of the ICU provider: the C locale is libc's
            {**TEMPLATE0, "datlocprovider": "i"},
            "LATIN1",
            "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' LOCALE_PROVIDER libc",
        ),
        (  # a SQL_ASCII server, before PostgreSQL 15
            {"encoding_name": "SQL_ASCII", "datcollate": "C", "datctype": "C"},
            "UTF8",
            "ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'",
        ),
    ],
)
def test_a_new_database_without_a_live_one_takes_the_dumps_encoding(template, encoding, expected):
    assert " ".join(render(option) for option in new_database_options(template, encoding)) == expected


def test_setting_statements():
    assert render(setting_statement("vq_restore_1", None, "work_mem=8MB")) == (
        'ALTER DATABASE "vq_restore_1" SET "work_mem" TO \'8MB\''
    )
    assert render(setting_statement("db", None, 'search_path="$user", public, "Odd One"')) == (
        'ALTER DATABASE "db" SET "search_path" TO "$user", public, "Odd One"'
    )
    assert render(setting_statement("db", '"Reader"', "app.note=it's=fine")) == (
        'ALTER ROLE "Reader" IN DATABASE "db" SET "app.note" TO \'it\'\'s=fine\''
    )


@pytest.mark.parametrize(
    ("line", "roles"),
    [
        ("ALTER TABLE public.tickets OWNER TO app;", {"app"}),
        ('ALTER FUNCTION public.f(a integer, b text) OWNER TO "Odd ""Role""";', {'Odd "Role"'}),
        ("ALTER SCHEMA app OWNER TO App_Owner;", {"app_owner"}),
        ('GRANT SELECT ON TABLE public.t TO reader, "Writer", PUBLIC;', {"reader", "Writer"}),
        ("GRANT ALL ON FUNCTION public.f(x text) TO admin WITH GRANT OPTION;", {"admin"}),
        ("REVOKE ALL ON SCHEMA public FROM PUBLIC;", set()),
        ('GRANT USAGE ON SCHEMA s TO "public";', {"public"}),  # a role that happens to be called public
        (
            "ALTER DEFAULT PRIVILEGES FOR ROLE owner IN SCHEMA public GRANT SELECT ON TABLES TO reader;",
            {"owner", "reader"},
        ),
        ("SET SESSION AUTHORIZATION 'o''brien';", {"o'brien"}),
        ("ALTER TABLE ONLY public.m ATTACH PARTITION public.m1 FOR VALUES FROM ('2024') TO ('2025');", set()),
        (
            "ALTER TABLE ONLY public.t ALTER COLUMN id SET DEFAULT nextval('public.t_id_seq'::regclass);",
            set(),
        ),
        ("ALTER TABLE ONLY public.t ADD CONSTRAINT t_pkey PRIMARY KEY (id);", set()),
    ],
)
def test_roles_named_by_a_statement(line, roles):
    assert roles_in_statement(line) == roles


def test_referenced_roles_skip_copy_data_and_long_lines(tmp_path: Path):
    dump = tmp_path / "database.sql"
    dump.write_bytes(
        b"SET client_encoding = 'UTF8';\n"
        b"CREATE TABLE public.t (note text);\n"
        b"ALTER TABLE public.t OWNER TO owner_a;\n"
        b"COPY public.t (note) FROM stdin;\n"
        b"ALTER TABLE public.t OWNER TO in_the_data;\n"
        b"GRANT ALL ON TABLE x TO " + b"y" * 200_000 + b";\n"
        b"\\.\n"
        b"GRANT ALL ON TABLE x TO " + b"z" * 200_000 + b";\n"
        b'GRANT SELECT ON TABLE public.t TO "Reader B";\n'
        b"REVOKE ALL ON SCHEMA public FROM PUBLIC;\n"
        b"ALTER TABLE public.t OWNER TO no_newline_at_end;"
    )
    assert referenced_roles(dump) == {"owner_a", "Reader B"}


def test_referenced_roles_are_read_in_the_dumps_encoding(tmp_path: Path):
    dump = tmp_path / "database.sql"
    dump.write_bytes(
        "SET client_encoding = 'LATIN1';\n"
        'ALTER TABLE public.t OWNER TO "Zoë";\n'
        'GRANT SELECT ON TABLE public.t TO "Ångström";\n'.encode("latin-1")
    )
    assert referenced_roles(dump) == {"Zoë", "Ångström"}


def test_a_missing_role_is_reported_with_its_name():
    stderr = 'psql:/staging/database.sql:57: ERROR:  role "vq_app" does not exist\n'
    error, missing = psql_failure(SETTINGS, stderr, "vq_restore_1", "database.sql")
    assert missing == ["vq_app"]
    assert isinstance(error, PermanentError)


@pytest.mark.parametrize(
    ("stderr", "kind", "fragments"),
    [
        (
            "psql:/x/database.sql:12: ERROR:  must be owner of table tickets\n",
            PermanentError,
            ["DB_USER app must own table tickets", "or restore as a superuser", "database.sql line 12"],
        ),
        (
            'psql:/x/database.sql:9: ERROR:  must be member of role "queue_owner"\n',
            PermanentError,
            ['may not act as role "queue_owner": GRANT "queue_owner" TO app'],
        ),
        (
            'psql:/x/database.sql:9: ERROR:  must be able to SET ROLE "queue_owner"\n',
            PermanentError,
            ['GRANT "queue_owner" TO app'],
        ),
        (
            "psql:/x/database.sql:3: ERROR:  permission denied for schema public\n",
            PermanentError,
            ["lacks a privilege on schema public"],
        ),
        (
            'psql:/x/database.sql:3: ERROR:  permission denied to create extension "x"\n'
            "HINT:  Must be superuser to create this extension.\n",
            PermanentError,
            ["is not a superuser"],
        ),
        (
            'psql: error: connection to server at "db" (10.0.0.5), port 5432 failed: Connection refused\n',
            TransientError,
            ["db:5432/vq_restore_1", "Connection refused"],
        ),
        (
            "psql:/x/database.sql:4000: FATAL:  terminating connection due to administrator command\n"
            "server closed the connection unexpectedly\n",
            TransientError,
            ["terminating connection"],
        ),
        (
            'psql:/x/database.sql:77: ERROR:  syntax error at or near "pw-123"\n',
            PermanentError,
            ["database.sql line 77: syntax error", "db:5432/vq_restore_1"],
        ),
    ],
)
def test_psql_messages_become_errors_that_say_what_to_fix(stderr, kind, fragments):
    error, missing = psql_failure(SETTINGS, stderr, "vq_restore_1", "database.sql")
    assert type(error) is kind and missing == []
    for fragment in fragments:
        assert fragment in str(error)
    assert "pw-123" not in str(error)


def test_a_missing_dump_file_is_refused_before_any_connection(tmp_path):
    with pytest.raises(PermanentError, match="not a readable file"):
        restore_database(SETTINGS, tmp_path / "database.sql", {})


def test_results_are_json():
    result = DatabaseRestoreResult(
        database="vq",
        previous_name="vq_before_20240115020000",
        swapped=True,
        tables=["public.t"],
        row_counts={"public.t": 3},
        duration_seconds=1.5,
    )
    plan = DatabaseRestorePlan(
        database="vq",
        exists=False,
        tables={},
        expected_tables={"public.t": 3},
        only_in_database=[],
        only_in_backup=["public.t"],
    )
    for model in (result, plan):
        assert type(model).model_validate(json.loads(model.model_dump_json())) == model


def test_psql_gets_the_password_through_its_environment_only(tmp_path, monkeypatch):
    from vq_tasks.restore import postgres_load as restore_pg

    dump = tmp_path / "database.sql"
    dump.write_text("SELECT 1;\n")
    seen = {}

    class FakePsql:
        def __init__(self, argv, **kwargs):
            seen.update(argv=argv, env=kwargs["env"])
            self.stdin = io.BytesIO()
            self.stdin.close = lambda: seen.update(fed=self.stdin.getvalue())

        def wait(self):
            return 0

    monkeypatch.setattr(restore_pg, "knows_restrict", lambda psql: True)
    monkeypatch.setattr(restore_pg.subprocess, "Popen", FakePsql)
    restore_pg.run_psql(SETTINGS, dump, "vq_restore_1", "postgres")
    assert "pw-123" not in " ".join(seen["argv"])
    assert {"-X", "--single-transaction", "ON_ERROR_STOP=1"} <= set(seen["argv"])
    assert seen["argv"][-2:] == ["-f", "-"] and seen["fed"] == b"SELECT 1;\n"  # the dump through stdin
    assert seen["argv"][-3].startswith("\\restrict ")  # restricted mode, under a key of our own
    assert seen["env"]["PGPASSWORD"] == "pw-123" and seen["env"]["PGDATABASE"] == "vq_restore_1"
