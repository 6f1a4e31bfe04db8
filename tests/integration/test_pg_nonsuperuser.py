"""A backup user that is not a superuser, against the real PostgreSQL: with pg_read_all_data or as the
schema's owner the backup works and loads back; what it may not read (tables, schemas, row-level
security, large objects) is all named, each with its fix; what pg_dump left out is recorded."""

from __future__ import annotations

import logging
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.conftest import PG_HOST, PG_PORT, PG_USER, pg_connect
from tests.integration.test_restore_postgres import dump, settings_for
from vq_tasks.errors import PermanentError

pytestmark = pytest.mark.integration

APP = """
CREATE SCHEMA app;
CREATE TABLE app.items (id serial PRIMARY KEY, name text NOT NULL, data jsonb);
CREATE SEQUENCE app.counter START 100;
CREATE VIEW app.named AS SELECT id, name FROM app.items WHERE name <> '';
CREATE TABLE public.notes (id int, note text);
INSERT INTO app.items (name, data)
  SELECT 'item ' || i, jsonb_build_object('i', i) FROM generate_series(1, 50) i;
INSERT INTO public.notes SELECT i, 'Zoë ' || i FROM generate_series(1, 20) i;
SELECT setval('app.counter', 4242);
"""
CONTENTS = "SELECT count(*), coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') FROM {} t"


@dataclass
class Sandbox:
    """Roles and databases of one test, with unique names; dropped afterwards."""

    prefix: str = field(default_factory=lambda: f"vq_nsu_{uuid.uuid4().hex[:8]}")
    roles: list[str] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)

    def role(self, suffix: str, attributes: str = "LOGIN") -> str:
        name = f"{self.prefix}_{suffix}"
        with pg_connect() as conn:
            conn.execute(f'CREATE ROLE "{name}" {attributes}')
        self.roles.append(name)
        return name

    def database(self, suffix: str = "db", owner: str | None = None) -> str:
        name = f"{self.prefix}_{suffix}"
        with pg_connect() as conn:
            owned = f' OWNER "{owner}"' if owner else ""
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0{owned}')
        self.databases.append(name)
        return name

    def run(self, dbname: str, sql: str, as_role: str | None = None) -> None:
        """Run ``sql`` as the superuser, or as ``as_role`` (SET ROLE) when given."""
        with pg_connect(dbname) as conn:
            if as_role:
                conn.execute(f'SET ROLE "{as_role}"')
            conn.execute(sql)

    def drop(self) -> None:
        for name in self.databases:
            with pg_connect(name) as conn:  # a database with a subscription cannot be dropped
                subscriptions = conn.execute(
                    "SELECT subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid"
                    " WHERE d.datname = current_database()"
                ).fetchall()
                for (sub,) in subscriptions:
                    conn.execute(f'DROP SUBSCRIPTION "{sub}"')
            with pg_connect() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        with pg_connect() as conn:
            for name in reversed(self.roles):
                conn.execute(f'DROP OWNED BY "{name}"')
                conn.execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    made = Sandbox()
    try:
        yield made
    finally:
        made.drop()


@pytest.fixture
def owned_app(sandbox) -> tuple[str, str]:
    """A database whose schema app and tables, sequence and view are owned by a role that is not a
    superuser (and may not log in); return (database, owner)."""
    owner = sandbox.role("owner", "NOLOGIN")
    name = sandbox.database(owner=owner)
    sandbox.run(name, APP, as_role=owner)
    return name, owner


def reader(sandbox: Sandbox, suffix: str = "reader") -> str:
    """A login role with pg_read_all_data and nothing else."""
    name = sandbox.role(suffix)
    with pg_connect() as conn:
        conn.execute(f'GRANT pg_read_all_data TO "{name}"')
    return name


def contents(dbname: str) -> dict[str, tuple]:
    """Rows (count and digest) of every table of app and public, and the sequence's value."""
    with pg_connect(dbname) as conn:
        tables = conn.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
            " WHERE schemaname IN ('app', 'public') ORDER BY 1"
        ).fetchall()
        found = {t: conn.execute(CONTENTS.format(t)).fetchone() for (t,) in tables}
        found["app.counter"] = conn.execute("SELECT last_value, is_called FROM app.counter").fetchone()
    return found


def load(sandbox: Sandbox, path: Path) -> str:
    """Load a dump into a fresh database as the superuser (psql -f); return its name."""
    name = sandbox.database("loaded")
    server = ["-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", name]
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *server, "-f", str(path)], check=True)
    return name


def refused(settings, tmp_path: Path) -> str:
    """Return the message of the PermanentError the backup raises."""
    with pytest.raises(PermanentError) as caught:
        dump(settings, tmp_path / "refused.sql")
    return str(caught.value)


def test_a_pg_read_all_data_user_backs_up_what_others_own_and_it_loads_back(sandbox, owned_app, tmp_path):
    name, _ = owned_app
    settings = settings_for(name, db_user=reader(sandbox))
    facts = dump(settings, tmp_path / "db.sql")
    assert facts.tables == {"app.items": 50, "public.notes": 20}
    assert facts.skipped == []
    assert contents(load(sandbox, tmp_path / "db.sql")) == contents(name)


def test_the_schema_owner_backs_up_its_own_database(sandbox, tmp_path):
    owner = sandbox.role("owner")
    name = sandbox.database(owner=owner)
    sandbox.run(name, APP + "ALTER TABLE app.items ENABLE ROW LEVEL SECURITY;", as_role=owner)
    facts = dump(settings_for(name, db_user=owner), tmp_path / "db.sql")
    assert facts.tables == {"app.items": 50, "public.notes": 20}  # its own RLS table, all rows
    assert contents(load(sandbox, tmp_path / "db.sql")) == contents(name)


def test_every_table_and_schema_it_may_not_read_is_named_and_the_grant_fixes_it(sandbox, tmp_path):
    owner, user = sandbox.role("owner", "NOLOGIN"), sandbox.role("plain")
    name = sandbox.database(owner=owner)
    sandbox.run(
        name,
        "CREATE SCHEMA s_one; CREATE SCHEMA s_two; CREATE TABLE s_one.t1 (a int);"
        " CREATE TABLE s_two.t2 (a int); CREATE TABLE s_one.open (a int);",
        as_role=owner,
    )
    sandbox.run(name, f'GRANT USAGE ON SCHEMA s_one TO "{user}"; GRANT SELECT ON s_one.open TO "{user}"')
    settings = settings_for(name, db_user=user)
    message = refused(settings, tmp_path)
    assert f"DB_USER {user} may not read all that pg_dump must" in message
    assert "Tables without SELECT: s_one.t1, s_two.t2; schemas without USAGE: s_two." in message
    assert f'GRANT pg_read_all_data TO "{user}"' not in message  # a plain name is not quoted
    assert f"GRANT pg_read_all_data TO {user} (PostgreSQL 14+" in message
    assert "s_one.open" not in message
    assert "pg_dump stopped at: permission denied for" in message
    with pg_connect() as conn:
        conn.execute(f'GRANT pg_read_all_data TO "{user}"')
    assert dump(settings, tmp_path / "db.sql").tables == {"s_one.open": 0, "s_one.t1": 0, "s_two.t2": 0}


@pytest.mark.parametrize("as_owner", [False, True], ids=["pg_read_all_data", "owner-forced"])
def test_a_table_with_row_level_security_is_named_with_bypassrls(sandbox, owned_app, tmp_path, as_owner):
    name, owner = owned_app
    force = "ALTER TABLE app.items FORCE ROW LEVEL SECURITY;" if as_owner else ""
    sandbox.run(
        name,
        "ALTER TABLE app.items ENABLE ROW LEVEL SECURITY; CREATE POLICY mine ON app.items USING (id < 10);"
        + force,
    )
    if as_owner:
        sandbox.run("postgres", f'ALTER ROLE "{owner}" LOGIN')
    user = owner if as_owner else reader(sandbox)
    settings = settings_for(name, db_user=user)
    message = refused(settings, tmp_path)
    assert "Tables with row-level security (pg_dump reads every row): app.items. Fix:" in message
    assert f"ALTER ROLE {user} BYPASSRLS" in message
    assert "public.notes" not in message and "pg_read_all_data TO" not in message
    assert 'row-level security policy for table "items"' in message
    sandbox.run("postgres", f'ALTER ROLE "{user}" BYPASSRLS')
    assert dump(settings, tmp_path / "db.sql").tables["app.items"] == 50


def test_a_large_object_of_another_role_is_named(sandbox, owned_app, tmp_path):
    name, owner = owned_app
    with pg_connect(name) as conn:
        conn.execute(f'SET ROLE "{owner}"')
        (oid,) = conn.execute("SELECT lo_from_bytea(0, 'scan of a ticket')").fetchone()
    user = reader(sandbox)
    settings = settings_for(name, db_user=user)
    message = refused(settings, tmp_path)
    fix = f"Large objects without SELECT: {oid}. Fix: GRANT SELECT ON LARGE OBJECT {oid} TO {user},"
    assert fix in message
    assert "pg_read_all_data TO" not in message and "row-level" not in message
    sandbox.run(name, f'GRANT SELECT ON LARGE OBJECT {oid} TO "{user}"')
    dump(settings, tmp_path / "db.sql")
    with pg_connect(load(sandbox, tmp_path / "db.sql")) as conn:
        assert conn.execute("SELECT lo_get(%s)", [oid]).fetchone() == (b"scan of a ticket",)


def test_when_the_listing_fails_pg_dumps_own_message_is_given(sandbox, owned_app, tmp_path):
    name, _ = owned_app
    sandbox.run(
        name,
        "ALTER TABLE app.items ENABLE ROW LEVEL SECURITY;"
        " REVOKE EXECUTE ON FUNCTION pg_has_role(oid, text) FROM PUBLIC;",  # the listing's, not pg_dump's
    )
    message = refused(settings_for(name, db_user=reader(sandbox)), tmp_path)
    assert 'query would be affected by row-level security policy for table "items"' in message
    assert "Fix:" not in message


def test_what_pg_dump_leaves_out_for_a_user_that_is_not_a_superuser_is_recorded(
    sandbox, owned_app, tmp_path, caplog
):
    name, _ = owned_app
    sandbox.run(
        name,
        "CREATE SUBSCRIPTION s CONNECTION 'host=127.0.0.1 dbname=nowhere' PUBLICATION p"
        " WITH (connect = false, slot_name = NONE)",
    )
    with caplog.at_level(logging.WARNING, logger="vq_tasks.sources.postgres"):
        facts = dump(settings_for(name, db_user=reader(sandbox)), tmp_path / "db.sql")
    assert facts.skipped == ["subscriptions not dumped because current user is not a superuser"]
    assert facts.tables == {"app.items": 50, "public.notes": 20}
    (line,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert line.endswith("pg_dump left out: subscriptions not dumped because current user is not a superuser")
    assert dump(settings_for(name), tmp_path / "super.sql").skipped == []  # a superuser's dump has them
