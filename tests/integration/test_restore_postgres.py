"""Database restore against the real PostgreSQL: a dump loads into a new database, is checked, and is
swapped in; any failure before the swap leaves the live database exactly as it was."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from tests.integration.conftest import PG_HOST, PG_PORT, PG_USER, pg_connect
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import DatabaseFacts
from vq_tasks.restore import postgres_swap
from vq_tasks.restore.drill import _Drill
from vq_tasks.restore.postgres import database_row_counts, plan_database_restore, restore_database
from vq_tasks.settings import Settings, load_settings
from vq_tasks.sources.postgres import dump_database

pytestmark = pytest.mark.integration

RICH = r"""
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE SCHEMA "Other Schema";
CREATE SEQUENCE order_numbers START 1000 INCREMENT 7;
CREATE TABLE people (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  name text NOT NULL,
  feeling mood,
  age positive_int,
  tags text[],
  scores numeric(12, 4)[],
  profile jsonb,
  photo bytea,
  balance numeric(20, 6),
  born timestamptz,
  name_length int GENERATED ALWAYS AS (length(name)) STORED,
  order_no bigint DEFAULT nextval('order_numbers')
);
COMMENT ON TABLE people IS 'Personnes, 人々';
COMMENT ON COLUMN people.name IS 'full name';
CREATE INDEX people_profile ON people USING gin (profile);
CREATE UNIQUE INDEX people_name_lower ON people (lower(name));
CREATE TABLE measurements (id int, taken date NOT NULL, value double precision) PARTITION BY RANGE (taken);
CREATE TABLE measurements_2023 PARTITION OF measurements FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE measurements_2024 PARTITION OF measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE visits (
  id serial PRIMARY KEY,
  person_id bigint NOT NULL REFERENCES people ON DELETE CASCADE,
  at timestamptz NOT NULL DEFAULT now(),
  note text
);
CREATE TABLE "Other Schema"."Weird Name" ("Mixed Case" int, "user" text);
CREATE TABLE "user" (id int);
CREATE TABLE empty_one (id int);
CREATE TABLE audit (id bigserial PRIMARY KEY, tbl text, op text, at timestamptz DEFAULT now());
CREATE FUNCTION log_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit (tbl, op) VALUES (TG_TABLE_NAME, TG_OP);
  RETURN NEW;
END $$;
CREATE TRIGGER visits_audit AFTER INSERT OR UPDATE ON visits FOR EACH ROW EXECUTE FUNCTION log_change();
CREATE FUNCTION add(a int, b int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT a + b';
CREATE VIEW happy_people AS SELECT id, name FROM people WHERE feeling = 'happy';
CREATE MATERIALIZED VIEW visit_counts AS SELECT person_id, count(*) AS visits FROM visits GROUP BY person_id;
INSERT INTO people (name, feeling, age, tags, scores, profile, photo, balance, born)
SELECT 'Person ' || i || CASE WHEN i % 5 = 0 THEN ' Zoë Ångström 東京' ELSE '' END,
  (ARRAY['sad', 'ok', 'happy', NULL])[1 + i % 4]::mood,
  CASE WHEN i % 7 = 0 THEN NULL ELSE 1 + i % 90 END,
  CASE WHEN i % 3 = 0 THEN NULL ELSE ARRAY['a' || i, 'b,"quoted"', NULL] END,
  ARRAY[i / 3.0, 1e-4]::numeric(12, 4)[],
  jsonb_build_object('i', i, 'nested', jsonb_build_object('x', ARRAY[1, 2]), 'text', E'tab\there'),
  CASE WHEN i % 4 = 0 THEN NULL ELSE decode(md5(i::text), 'hex') || '\x00ff'::bytea END,
  i * 1234.567891,
  timestamptz '2024-02-29 12:34:56.789+05:30' + i * interval '1 hour 1 second'
FROM generate_series(1, 300) i;
INSERT INTO visits (person_id, note) SELECT 1 + i % 300, CASE WHEN i % 2 = 0 THEN E'line\nbreak \\ back' END
FROM generate_series(1, 600) i;
INSERT INTO measurements SELECT i, date '2023-06-01' + i, i * 0.5 FROM generate_series(1, 400) i;
INSERT INTO "Other Schema"."Weird Name" VALUES (1, 'x'), (NULL, NULL);
INSERT INTO "user" VALUES (1);
REFRESH MATERIALIZED VIEW visit_counts;
SELECT setval('order_numbers', 5000);
"""
CHANGE = "DROP TABLE visits CASCADE; INSERT INTO people (name) VALUES ('added after the backup')"
CONTENTS = r"""SELECT format('%I.%I', n.nspname, c.relname), c.relkind FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm', 'S') AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema' ORDER BY 1"""


@pytest.fixture
def roles() -> Iterator[list[str]]:
    """Roles a test creates (append their names); dropped after the test's databases."""
    made: list[str] = []
    yield made
    with pg_connect() as conn:
        for name in made:
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.fixture
def live(roles) -> Iterator[str]:
    """A unique database name; every database whose name starts with it is dropped afterwards."""
    base = f"vq_rst_{uuid.uuid4().hex[:8]}"
    yield base
    with pg_connect() as conn:
        made = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", [base]
        ).fetchall()
        for (name,) in made:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def settings_for(name: str, **overrides) -> Settings:
    values = dict(db_host=PG_HOST, db_port=PG_PORT, db_user=PG_USER, db_name=name)
    return load_settings(celery_broker_url="redis://127.0.0.1:1/0", **{**values, **overrides})


def create_live(name: str, sql: str = RICH, options: str = "") -> None:
    with pg_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}" {options}')
    with pg_connect(name) as conn:
        conn.execute(sql)


def dump(settings: Settings, path: Path) -> DatabaseFacts:
    with path.open("wb") as out:
        return dump_database(settings, out)


def schema(name: str) -> str:
    """pg_dump --schema-only, without the \\restrict lines (a new random key every run)."""
    text = subprocess.run(
        ["pg_dump", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "--schema-only", "-d", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return "\n".join(
        line for line in text.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))
    )


def checksums(name: str) -> dict[str, str]:
    """An md5 of every table's and materialized view's rows (sorted) and every sequence's state."""
    sums = {}
    with pg_connect(name) as conn:
        for table, kind in conn.execute(CONTENTS).fetchall():
            if kind == "S":
                query = f"SELECT last_value::text || is_called::text FROM {table}"
            else:
                query = f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} t"
            sums[table] = conn.execute(query).fetchone()[0]
    return sums


def snapshot(name: str) -> tuple[str, dict[str, str], bool]:
    with pg_connect() as conn:
        allowed = conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", [name]).fetchone()[
            0
        ]
    return schema(name), checksums(name), allowed


def databases(prefix: str) -> list[str]:
    with pg_connect() as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1", [prefix]
        ).fetchall()
    return [name for (name,) in rows]


def broken_copy(path: Path, tail: str) -> Path:
    bad = path.with_name("broken.sql")
    shutil.copyfile(path, bad)
    with bad.open("a") as out:
        out.write(tail)
    return bad


@dataclass(frozen=True)
class Backup:
    """A dump taken by dump_database: the settings it was taken with (naming the database), the file
    and the rows per table it reported."""

    settings: Settings
    path: Path
    tables: dict[str, int]


@pytest.fixture
def dump_of(live: str, tmp_path: Path) -> Callable[..., Backup]:
    """Return a function that dumps an existing database (the live one unless named) into
    tmp_path/database.sql, with settings_for's settings changed by ``overrides``."""

    def take(name: str = live, **overrides) -> Backup:
        settings = settings_for(name, **overrides)
        path = tmp_path / "database.sql"
        return Backup(settings, path, dump(settings, path).tables)

    return take


@pytest.fixture
def backup_of(live: str, dump_of: Callable[..., Backup]) -> Callable[[str], Backup]:
    """Return a function that creates the live database with ``sql`` in it, and dumps it."""

    def make(sql: str) -> Backup:
        create_live(live, sql)
        return dump_of()

    return make


@pytest.fixture
def backup(backup_of: Callable[[str], Backup]) -> Backup:
    """The live database with RICH in it, and its dump."""
    return backup_of(RICH)


@pytest.fixture
def changed_backup(live: str, backup: Backup) -> Backup:
    """``backup``, then the live database changed after it by CHANGE (visits dropped, a person added)."""
    with pg_connect(live) as conn:
        conn.execute(CHANGE)
    return backup


def test_round_trip_swaps_in_the_backup_and_keeps_the_replaced_database(live, backup):
    assert backup.tables == database_row_counts(backup.settings)  # as pg_dump names them, partitions too
    assert '"Other Schema"."Weird Name"' in backup.tables and "public.measurements" not in backup.tables
    before = snapshot(live)
    with pg_connect(live) as conn:
        conn.execute(CHANGE)
    assert checksums(live) != before[1]

    result = restore_database(backup.settings, backup.path, backup.tables)

    assert snapshot(live) == before
    assert result.database == live and result.swapped
    assert result.previous_name is not None and result.previous_name.startswith(f"{live}_before_")
    assert result.row_counts == backup.tables and result.tables == sorted(backup.tables)
    assert databases(live) == sorted([live, result.previous_name])  # no _restore_ database left
    with pg_connect(result.previous_name) as conn:  # the replaced database, as it was just before
        assert conn.execute("SELECT to_regclass('public.visits')").fetchone()[0] is None
    json.dumps(result.model_dump(mode="json"))


def test_keep_previous_false_drops_the_replaced_database(live, backup_of):
    backup = backup_of("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2);")
    result = restore_database(backup.settings, backup.path, backup.tables, keep_previous=False)
    assert result.previous_name is None and not result.warnings
    assert databases(live) == [live]


def test_a_dump_failing_half_way_leaves_the_live_database_as_it_was(live, changed_backup):
    before = snapshot(live)
    bad = broken_copy(changed_backup.path, "\nSELECT no_such_function(1);\n")

    with pytest.raises(PermanentError) as failure:
        restore_database(changed_backup.settings, bad, changed_backup.tables)

    message = str(failure.value)
    assert "no_such_function" in message and "line " in message and f"{PG_HOST}:{PG_PORT}" in message
    assert snapshot(live) == before
    assert databases(live) == [live]


def test_rows_not_matching_the_backup_fail_and_leave_nothing(live, backup):
    before = snapshot(live)
    wrong = {**backup.tables, "public.people": 299, "public.ghost": 1}

    with pytest.raises(PermanentError, match=r"does not match the backup") as failure:
        restore_database(backup.settings, backup.path, wrong)

    assert "public.people: 300 rows, the backup 299" in str(failure.value)
    assert "public.ghost: missing" in str(failure.value)
    assert snapshot(live) == before
    assert databases(live) == [live]


def test_a_failure_inside_the_swap_rolls_both_renames_back(live, changed_backup, monkeypatch):
    before = snapshot(live)
    real_rename, calls = postgres_swap._rename_one, []

    def rename_then_fail(admin, old, new):
        calls.append((old, new))
        real_rename(admin, old, new)
        if len(calls) == 1:  # the live database is renamed: fail before the new one takes its name
            admin.execute("SELECT 1 / 0")

    monkeypatch.setattr(postgres_swap, "_rename_one", rename_then_fail)
    with pytest.raises(PermanentError, match="division by zero"):
        restore_database(changed_backup.settings, changed_backup.path, changed_backup.tables)

    assert calls[0][0] == live
    assert snapshot(live) == before  # its name back, connections allowed again, contents unchanged
    assert databases(live) == [live]


def test_sessions_on_the_live_database_are_ended_and_the_swap_succeeds(live, changed_backup):
    idle = pg_connect(live)
    locking = pg_connect(live)
    locking.execute("BEGIN")
    locking.execute("LOCK TABLE people IN ACCESS EXCLUSIVE MODE")
    try:
        result = restore_database(changed_backup.settings, changed_backup.path, changed_backup.tables)
        for session in (idle, locking):
            with pytest.raises(psycopg.OperationalError):
                session.execute("SELECT 1")
    finally:
        idle.close()
        locking.close()
    assert result.row_counts == changed_backup.tables
    assert database_row_counts(changed_backup.settings) == changed_backup.tables


def test_an_application_that_reconnects_at_once_does_not_stop_the_swap(live, changed_backup):
    """Two clients reconnect as soon as their session is ended (a connection pool): the swap's
    RENAME holds the database's lock, so they wait for its commit and then find the restored one."""
    stop, sessions = threading.Event(), []

    def keep_connected() -> None:
        while not stop.is_set():
            try:
                with pg_connect(live) as conn:
                    while not stop.is_set():
                        conn.execute("SELECT count(*) FROM people")
                        sessions.append(conn.info.backend_pid)
                        time.sleep(0.01)
            except psycopg.OperationalError:
                continue

    clients = [threading.Thread(target=keep_connected) for _ in range(2)]
    for client in clients:
        client.start()
    try:
        result = restore_database(changed_backup.settings, changed_backup.path, changed_backup.tables)
        seen = len(sessions)
        time.sleep(0.5)
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert result.row_counts == changed_backup.tables
    assert database_row_counts(changed_backup.settings) == changed_backup.tables
    assert len(sessions) > seen and len(set(sessions)) > 2, "the clients did not reconnect"


def test_missing_roles_are_all_listed(live, backup_of, roles):
    gone, never = f"vq_gone_{live[-8:]}", f"Never Made {live[-8:]}"
    roles.append(gone)
    with pg_connect() as conn:
        conn.execute(f'CREATE ROLE "{gone}"')
    backup = backup_of(f'{RICH}; ALTER TABLE people OWNER TO "{gone}"; GRANT SELECT ON visits TO "{gone}";')
    with pg_connect(live) as conn:
        conn.execute(f'REASSIGN OWNED BY "{gone}" TO {PG_USER}; DROP OWNED BY "{gone}"')
    with pg_connect() as conn:
        conn.execute(f'DROP ROLE "{gone}"')
    before = snapshot(live)
    bad = broken_copy(backup.path, f'GRANT SELECT ON TABLE public.people TO "{never}";\n')

    with pytest.raises(PermanentError, match="roles that do not exist") as failure:
        restore_database(backup.settings, bad, backup.tables)

    message = str(failure.value)
    assert f'"{gone}"' in message and f'"{never}"' in message and '"postgres"' not in message
    assert "CREATE ROLE" in message
    assert snapshot(live) == before
    assert databases(live) == [live]


def test_a_user_without_createdb_is_told_before_anything_changes(live, backup_of, roles):
    backup = backup_of("CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
    weak = f"vq_weak_{live[-8:]}"
    roles.append(weak)
    with pg_connect() as conn:
        conn.execute(f'CREATE ROLE "{weak}" LOGIN')
    with pytest.raises(PermanentError, match=f"may not create databases: ALTER ROLE {weak} CREATEDB"):
        restore_database(settings_for(live, db_user=weak), backup.path, backup.tables)
    with pg_connect() as conn:
        conn.execute(f'ALTER ROLE "{weak}" CREATEDB')
    with pytest.raises(PermanentError, match=f"must own database {live}"):
        restore_database(settings_for(live, db_user=weak), backup.path, backup.tables)
    assert databases(live) == [live]


def test_an_owner_without_superuser_restores_and_is_told_what_it_cannot_end(live, dump_of, roles):
    owner, other = f"vq_owner_{live[-8:]}", f"vq_other_{live[-8:]}"
    roles += [owner, other]
    with pg_connect() as conn:
        conn.execute(f'CREATE ROLE "{owner}" LOGIN CREATEDB')
        conn.execute(f'CREATE ROLE "{other}" LOGIN')
        conn.execute(f'CREATE DATABASE "{live}" OWNER "{owner}"')
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=owner, dbname=live, autocommit=True) as conn:
        conn.execute(RICH)
    backup = dump_of(db_user=owner)
    before = snapshot(live)

    with pg_connect(live) as superuser_session:
        with pytest.raises(PermanentError, match="may not end a superuser's session") as failure:
            restore_database(backup.settings, backup.path, backup.tables)
        assert superuser_session.execute("SELECT 1").fetchone() == (1,)
    assert owner in str(failure.value)
    assert snapshot(live) == before and databases(live) == [live]

    with psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=other, dbname=live, autocommit=True
    ) as other_session:
        with pytest.raises(PermanentError, match=f"GRANT pg_signal_backend TO {owner}"):
            restore_database(backup.settings, backup.path, backup.tables)
        assert other_session.execute("SELECT 1").fetchone() == (1,)
        assert snapshot(live) == before and databases(live) == [live]
        with pg_connect() as conn:
            conn.execute(f'GRANT pg_signal_backend TO "{owner}"')
        result = restore_database(backup.settings, backup.path, backup.tables)
        with pytest.raises(psycopg.OperationalError):
            other_session.execute("SELECT 1")

    assert snapshot(live) == before
    with pg_connect() as conn:
        owners = conn.execute(
            "SELECT datname, datdba::regrole::text FROM pg_database WHERE datname IN (%s, %s)",
            [live, result.previous_name],
        ).fetchall()
    assert dict(owners) == {live: owner, result.previous_name: owner}


def test_settings_grants_encoding_and_comment_are_carried_over(live, dump_of, roles):
    reader = f"vq_reader_{live[-8:]}"
    roles.append(reader)
    with pg_connect() as conn:
        conn.execute(f'CREATE ROLE "{reader}" LOGIN')
    options = "TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
    create_live(live, "CREATE TABLE t (name text); INSERT INTO t VALUES ('Zoë'), ('Ångström');", options)
    with pg_connect() as conn:
        conn.execute(f"""ALTER DATABASE "{live}" SET work_mem = '8MB';
            ALTER DATABASE "{live}" SET search_path = "$user", public, "Other Schema";
            ALTER ROLE "{reader}" IN DATABASE "{live}" SET statement_timeout = '5s';
            ALTER DATABASE "{live}" CONNECTION LIMIT 40;
            COMMENT ON DATABASE "{live}" IS 'the queue''s data';
            REVOKE ALL ON DATABASE "{live}" FROM PUBLIC;
            GRANT CONNECT ON DATABASE "{live}" TO "{reader}" WITH GRANT OPTION""")
    backup = dump_of()
    properties = database_properties(live)
    before = checksums(live)

    result = restore_database(backup.settings, backup.path, backup.tables)

    assert not result.warnings
    assert database_properties(live) == properties
    assert properties[0] == "LATIN1" and properties[3] == 40
    assert checksums(live) == before


def database_properties(name: str) -> tuple:
    with pg_connect() as conn:
        return conn.execute(
            """SELECT pg_encoding_to_char(d.encoding), d.datcollate, d.datctype, d.datconnlimit,
                 shobj_description(d.oid, 'pg_database'), d.datacl::text[],
                 (SELECT array_agg(s.setrole::regrole::text || ':' || array_to_string(s.setconfig, ';')
                    ORDER BY s.setrole) FROM pg_db_role_setting s WHERE s.setdatabase = d.oid)
               FROM pg_database d WHERE d.datname = %s""",
            [name],
        ).fetchone()


def test_without_a_live_database_the_restored_one_takes_its_name(live, dump_of):
    source = f"{live}_source"
    create_live(source)
    backup = dump_of(source)
    result = restore_database(settings_for(live), backup.path, backup.tables)
    assert result.previous_name is None and result.database == live
    assert checksums(live) == checksums(source)
    assert databases(live) == sorted([live, source])


def test_a_drill_loads_into_a_new_scratch_database_and_leaves_the_live_one_alone(live, changed_backup):
    settings, path, tables = changed_backup.settings, changed_backup.path, changed_backup.tables
    before = snapshot(live)
    drill = f"{live}_drill"

    result = restore_database(settings, path, tables, target_db=drill, swap=False)

    assert result.database == drill and result.previous_name is None and not result.swapped
    assert database_row_counts(settings, drill) == tables
    assert snapshot(live) == before
    with pytest.raises(PermanentError, match="already exists"):
        restore_database(settings, path, tables, target_db=drill, swap=False)
    assert databases(live) == sorted([live, drill])  # the existing drill database was not dropped
    bad = broken_copy(path, "SELECT 1/0;\n")
    with pytest.raises(PermanentError, match="division by zero"):
        restore_database(settings, bad, tables, target_db=f"{live}_drill2", swap=False)
    assert databases(live) == sorted([live, drill])


def test_plan_reports_the_target_and_changes_nothing(live, changed_backup):
    settings, tables = changed_backup.settings, changed_backup.tables
    before = snapshot(live)
    with pg_connect() as conn:
        everything = conn.execute("SELECT datname, datallowconn FROM pg_database ORDER BY 1").fetchall()

    plan = plan_database_restore(settings, tables)

    assert plan.exists and plan.database == live
    assert plan.tables == database_row_counts(settings)
    assert plan.tables["public.people"] == tables["public.people"] + 1
    assert plan.only_in_backup == ["public.visits"] and plan.only_in_database == []
    assert snapshot(live) == before
    with pg_connect() as conn:
        assert (
            conn.execute("SELECT datname, datallowconn FROM pg_database ORDER BY 1").fetchall() == everything
        )
    absent = plan_database_restore(settings, tables, target_db=f"{live}_absent")
    assert not absent.exists and absent.tables == {} and absent.only_in_backup == sorted(tables)
    json.dumps(plan.model_dump(mode="json"))


def test_the_restored_database_keeps_the_live_owner_and_its_rights(live, dump_of, roles):
    """Restored by the superuser, the database still belongs to the application's role, which can
    still create tables in its public schema (PostgreSQL 15: the schema follows the database owner)."""
    app = f"vq_app_{live[-8:]}"
    roles.append(app)
    with pg_connect() as conn:
        conn.execute(f'CREATE ROLE "{app}" LOGIN')
        conn.execute(f'CREATE DATABASE "{live}" OWNER "{app}"')
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=app, dbname=live, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
    backup = dump_of()
    restore_database(backup.settings, backup.path, backup.tables, keep_previous=False)
    with pg_connect() as conn:
        owner = conn.execute("SELECT datdba::regrole::text FROM pg_database WHERE datname = %s", [live])
        assert owner.fetchone()[0] == app
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=app, dbname=live, autocommit=True) as conn:
        conn.execute("CREATE TABLE after_restore (id int)")
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1


@pytest.mark.parametrize(
    "command",
    [
        "\\! touch {sentinel}\n",
        "SELECT 1 \\g {sentinel}\n",  # a backslash command in the middle of a line
        "\\o {sentinel}\nSELECT 1;\n",
        "\\unrestrict {key}\n\\! touch {sentinel}\n",  # the dump's own key cannot lift our restriction
    ],
)
@pytest.mark.parametrize("before_text", ["SET ", "CREATE TABLE "])  # in the preamble, in an entry
def test_backslash_commands_in_a_dump_never_run(live, backup_of, tmp_path, command, before_text):
    backup = backup_of("CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
    text = backup.path.read_text()
    key = next(line.split()[1] for line in text.splitlines() if line.startswith("\\restrict "))
    sentinel = tmp_path / "owned"
    evil = text.replace(before_text, command.format(sentinel=sentinel, key=key) + before_text, 1)
    (tmp_path / "evil.sql").write_text(evil)
    before = snapshot(live)

    # psql (a line starting with a backslash makes the TOC unreadable) refuses it; sent as SQL by
    # the parallel load (mid-line), PostgreSQL rejects it
    refused = r'backslash commands are restricted|wrong key|syntax error at or near "\\"'
    with pytest.raises(PermanentError, match=refused):
        restore_database(backup.settings, tmp_path / "evil.sql", backup.tables)

    assert not sentinel.exists()
    assert snapshot(live) == before
    assert databases(live) == [live]


def test_a_file_that_is_not_a_pg_dump_is_refused_before_anything_is_created(live, tmp_path):
    create_live(live, "CREATE TABLE t (id int);")
    sentinel = tmp_path / "owned"
    fake = tmp_path / "database.sql"
    fake.write_text(f"\\! touch {sentinel}\nDROP TABLE t;\n--\n-- PostgreSQL database dump complete\n--\n")
    with pytest.raises(PermanentError, match="not a plain dump by pg_dump: it does not start with pg_dump's"):
        restore_database(settings_for(live), fake, {})
    assert not sentinel.exists()
    assert databases(live) == [live]


# Databases in single-byte encodings (issue 15): a SQL_ASCII database holds bytes that no encoding
# is declared for (0x80-0xff, among them Latin-1, CP1252 and UTF-8 text), a LATIN1 database Latin-1
# text. Both back up and restore byte for byte, also on a server whose maintenance database is in
# that encoding too (a cluster initialised without a UTF-8 locale), where psycopg returns bytes for
# the text of a connection in SQL_ASCII.
ENCODED = {
    "SQL_ASCII": [
        b"Zo\xeb \xc5ngstr\xf6m",  # Latin-1
        b"\x80 \x9f",  # CP1252's euro sign, and a byte that is in no Latin-1 text
        "東京 Zoë".encode(),  # UTF-8, as a UTF-8 client would have written it
        b"tab\there, line\nbreak, back\\slash \xff\xfe",  # escaped by COPY
        bytes(range(1, 256)),
    ],
    "LATIN1": [
        "Zoë Ångström, Straße, Ça va ÿ".encode("latin-1"),
        bytes(range(0xA0, 0x100)),  # every printable Latin-1 character beyond ASCII
        "tab\there, line\nbreak, back\\slash é".encode("latin-1"),
        bytes(range(1, 0x80)) + bytes(range(0xA0, 0x100)),
    ],
}
NAME_CODEC = {"SQL_ASCII": "utf-8", "LATIN1": "latin-1"}  # how the table name is written in each
NAMED = {"SQL_ASCII": "東京", "LATIN1": "Straße"}  # a table whose name is not ASCII
COMMENTED = {"SQL_ASCII": b"caf\xe9 \x80", "LATIN1": "café".encode("latin-1")}  # public.t's comment
RAW_CONTENTS = b"""SELECT 'rows'::bytea, id::text::bytea, convert_to(v, getdatabaseencoding()) FROM public.t
UNION ALL SELECT 'tables', convert_to(format('%I.%I', n.nspname, c.relname), getdatabaseencoding()),
  convert_to(coalesce(obj_description(c.oid, 'pg_class'), ''), getdatabaseencoding())
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'
ORDER BY 1, 2"""


def create_encoded(name: str, encoding: str) -> None:
    """Create the database ``name`` in ``encoding`` with the C locale, holding ENCODED's values in
    public.t, a table named NAMED and COMMENTED comment: all sent as bytes, never as Python text."""
    with pg_connect() as conn:
        conn.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING '{encoding}' LOCALE 'C'")
    named = b'"' + NAMED[encoding].encode(NAME_CODEC[encoding]) + b'"'
    statements = [b"CREATE TABLE t (id int PRIMARY KEY, v text)"]
    statements += [
        b"INSERT INTO t VALUES (%d, convert_from('\\x%s'::bytea, getdatabaseencoding()))"
        % (i, v.hex().encode())
        for i, v in enumerate(ENCODED[encoding])
    ]
    statements += [b"CREATE TABLE " + named + b" (v text)", b"INSERT INTO " + named + b" VALUES ('x'), ('y')"]
    statements += [b"COMMENT ON TABLE t IS '" + COMMENTED[encoding] + b"'"]
    with pg_connect(name) as conn:
        for statement in statements:
            conn.execute(statement)


def raw_contents(name: str) -> list[tuple[bytes, ...]]:
    """public.t's values, and the public tables' names and comments, as the bytes the database holds."""
    with pg_connect(name) as conn:
        return conn.execute(RAW_CONTENTS).fetchall()


@pytest.fixture(params=["SQL_ASCII", "LATIN1"])
def encoded(request, live: str, dump_of: Callable[..., Backup]) -> tuple[str, str, Backup]:
    """A server whose databases are in one single-byte encoding: the live database holding
    ENCODED's values (checked to be those bytes), a maintenance database ``<live>_postgres`` in the
    same encoding, and the live database's dump, taken with that maintenance database in the settings."""
    encoding, maintenance = request.param, f"{live}_postgres"
    with pg_connect() as conn:
        conn.execute(f"CREATE DATABASE \"{maintenance}\" TEMPLATE template0 ENCODING '{encoding}' LOCALE 'C'")
    create_encoded(live, encoding)
    rows = [(b"rows", str(i).encode(), value) for i, value in enumerate(ENCODED[encoding])]
    assert [row for row in raw_contents(live) if row[0] == b"rows"] == sorted(rows)
    return encoding, maintenance, dump_of(db_maintenance_db=maintenance)


def test_a_single_byte_encoded_database_restores_byte_for_byte(live, encoded):
    encoding, maintenance, backup = encoded
    assert backup.tables == {"public.t": len(ENCODED[encoding]), f'public."{NAMED[encoding]}"': 2}
    dumped = backup.path.read_bytes()
    assert f"SET client_encoding = '{encoding}';".encode() in dumped  # the database's own bytes
    assert ENCODED[encoding][0] in dumped and COMMENTED[encoding] in dumped
    with pg_connect() as conn:  # what a restore carries over, a comment in UTF-8 among it
        conn.execute(f"""COMMENT ON DATABASE "{live}" IS 'Zoë''s queue';
            ALTER DATABASE "{live}" SET work_mem = '8MB'; ALTER DATABASE "{live}" CONNECTION LIMIT 40""")
    before, properties = raw_contents(live), database_properties(live)
    assert properties[:4] == (encoding, "C", "C", 40)
    with pg_connect(live) as conn:
        conn.execute("DELETE FROM t WHERE id > 0")
    settings = backup.settings
    plan = plan_database_restore(settings, backup.tables, maintenance_db=maintenance)
    assert plan.exists and plan.tables == {**backup.tables, "public.t": 1}
    bad = broken_copy(backup.path, 'GRANT SELECT ON TABLE public.t TO "never made";\n')
    with pytest.raises(PermanentError, match="roles that do not exist") as failure:
        restore_database(settings, bad, backup.tables, maintenance_db=maintenance)
    assert '"never made"' in str(failure.value) and '"postgres"' not in str(failure.value)
    with pg_connect() as conn:
        conn.execute(f'CREATE DATABASE "{live}_restore_20000101000000"')  # left by a killed restore

    result = restore_database(settings, backup.path, backup.tables, maintenance_db=maintenance)

    assert raw_contents(live) == before
    assert database_properties(live) == properties
    assert result.row_counts == backup.tables
    assert result.warnings == [f"dropped {live}_restore_20000101000000, left by a restore that was killed"]
    assert databases(live) == sorted([live, maintenance, str(result.previous_name)])


def test_a_single_byte_encoded_dump_restores_into_a_new_database_in_its_encoding(live, encoded):
    """The drill's way, and a restore with no live database: the new database takes the dump's
    encoding (with the C locale), not the server's default, which could not hold the bytes."""
    encoding, maintenance, backup = encoded
    before = raw_contents(live)
    with pg_connect() as conn:
        conn.execute(f'CREATE DATABASE "{live}_drill_20000101000000"')  # left by a drill that died
    drill = _Drill(backup.settings, lambda line: None, datetime.now(UTC))
    drill._drop_stale_databases()
    assert not drill.warnings and databases(live) == sorted([live, maintenance])

    result = restore_database(
        backup.settings, backup.path, backup.tables, target_db=f"{live}_scratch", swap=False,
        maintenance_db=maintenance,
    )  # fmt: skip

    assert result.row_counts == backup.tables
    assert raw_contents(f"{live}_scratch") == before
    assert database_properties(f"{live}_scratch")[:3] == (encoding, "C", "C")


def test_a_name_that_is_not_utf8_in_a_sql_ascii_database_fails_clearly_and_changes_nothing(live, dump_of):
    """Its bytes restore, but the restore cannot read the name back to check its rows (the limit
    of reading names as UTF-8): it says so, drops the new database and leaves the live one alone."""
    with pg_connect() as conn:
        conn.execute(f"CREATE DATABASE \"{live}\" TEMPLATE template0 ENCODING 'SQL_ASCII' LOCALE 'C'")
    with pg_connect(live) as conn:
        conn.execute(b'CREATE TABLE "caf\xe9" (v text); INSERT INTO "caf\xe9" VALUES (\'x\')')
    backup = dump_of()
    before = raw_contents_of_cafe(live)
    with pytest.raises(PermanentError, match="must be ASCII or UTF-8") as failure:
        restore_database(backup.settings, backup.path, backup.tables)
    assert "invalid byte sequence" in str(failure.value)
    assert raw_contents_of_cafe(live) == before and databases(live) == [live]


def raw_contents_of_cafe(name: str) -> list[tuple]:
    with pg_connect(name) as conn:
        return conn.execute(b'SELECT v FROM "caf\xe9"').fetchall()


# The parallel load where it meets an operator's limits: a role that may open fewer connections
# than BACKUP_RESTORE_JOBS, a failing step that stops the others.

TABLES = "".join(
    f"CREATE TABLE t{n} (id int PRIMARY KEY, v text); INSERT INTO t{n} SELECT g, md5(g::text) "
    f"FROM generate_series(1, 2000) g;"
    for n in range(6)
)


def test_a_role_allowed_fewer_connections_loads_over_those_it_may_open(backup_of, caplog):
    backup = backup_of(TABLES)
    role = f"vq_limited_{uuid.uuid4().hex[:8]}"
    with pg_connect() as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN CREATEDB CONNECTION LIMIT 2')  # not a superuser: enforced
        conn.execute(f'GRANT postgres TO "{role}"')  # the dump's objects are postgres's
    try:
        settings = backup.settings.model_copy(update={"db_user": role, "backup_restore_jobs": 4})
        target = f"{backup.settings.db_name}_limited"
        with caplog.at_level(logging.WARNING, logger="vq_tasks.restore.postgres_parallel"):
            result = restore_database(settings, backup.path, backup.tables, target_db=target, swap=False)
        assert result.split_by_toc and result.jobs == 2
        assert result.row_counts == backup.tables
        assert "loading over 2 connection(s), not 4" in caplog.text
        assert "too many connections" in caplog.text
    finally:
        with pg_connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{backup.settings.db_name}_limited" WITH (FORCE)')
            conn.execute(f'DROP ROLE "{role}"')


def test_a_failing_step_stops_the_load_names_its_line_and_leaves_no_database(backup_of, tmp_path, live):
    backup = backup_of(TABLES)
    text = backup.path.read_text()
    bad_row = "1500\t" + next(line for line in text.splitlines() if line.startswith("1500\t")).split("\t")[1]
    broken = text.replace(bad_row, "not-a-number\tx", 1)
    path = tmp_path / "broken.sql"
    path.write_text(broken)
    line = broken.splitlines().index("not-a-number\tx") + 1
    settings = backup.settings.model_copy(update={"backup_restore_jobs": 3})
    expected = rf"broken.sql line {line} \(TABLE DATA t\d\): invalid input syntax"
    with pytest.raises(PermanentError, match=expected):
        restore_database(settings, path, backup.tables)
    assert databases(live) == [live]
