"""Roles in the backup (globals.sql) and a restore onto a server that lacks them: a real worker backs
up a database whose objects are owned by and granted to several roles; the restore into a new
cluster (tests/pg_tls.py, reached over its socket) creates the missing roles, leaves an existing
one as it is, and the schema, owners, grants, role attributes, memberships and data come back.
A restoring user that is not a superuser creates what it may and names what it may not."""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.integration.conftest import pg_connect, run_cli, settings_env
from tests.integration.test_restore import make_backup
from tests.pg_tls import ADMIN, Cluster, make_pki, pg, postgres_bin, running_cluster
from vq_tasks.catalog.listing import load_manifest
from vq_tasks.restore.extract import extract_to, globals_file
from vq_tasks.restore.postgres_globals import create_roles, plan_roles
from vq_tasks.settings import load_settings
from vq_tasks.storage import open_storage

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(postgres_bin() is None, reason="no initdb on PATH"),
]
ROLE_QUERY = """SELECT a.rolname, a.rolsuper, a.rolinherit, a.rolcreaterole, a.rolcreatedb, a.rolcanlogin,
  a.rolreplication, a.rolbypassrls, a.rolconnlimit, a.rolpassword, a.rolvaliduntil, r.rolconfig,
  shobj_description(a.oid, 'pg_authid')
FROM pg_authid a JOIN pg_roles r ON r.oid = a.oid WHERE a.rolname = ANY(%s) ORDER BY a.rolname"""
MEMBERS_QUERY = """SELECT r.rolname, m.rolname, a.admin_option FROM pg_auth_members a
JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member
WHERE r.rolname = ANY(%s) OR m.rolname = ANY(%s) ORDER BY 1, 2"""


class Roles:
    """The test's roles on the machine's PostgreSQL, named after one id."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.owner, self.reader, self.writer = (f"vq_{tag}_{r}" for r in ("owner", "reader", "writer"))
        self.mixed = f"VQ Mixed {tag}"  # a name that must be quoted
        self.admin = f"vq_{tag}_super"  # SUPERUSER: a restore never creates it
        self.replicator = f"vq_{tag}_repl"  # REPLICATION: only a superuser may create it
        self.all = [self.owner, self.reader, self.writer, self.mixed, self.admin, self.replicator]


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@pytest.fixture
def roles(database) -> Iterator[Roles]:
    """Several roles owning and granted the objects of the test's database; dropped afterwards."""
    made = Roles()
    o, r, w, m = (quoted(n) for n in (made.owner, made.reader, made.writer, made.mixed))
    with pg_connect() as conn:
        conn.execute(f"CREATE ROLE {o} NOLOGIN")
        conn.execute(f"CREATE ROLE {r} NOLOGIN CONNECTION LIMIT 3")
        conn.execute(f"CREATE ROLE {w} LOGIN PASSWORD 'writer-pw' VALID UNTIL '2099-01-01'")
        conn.execute(f"CREATE ROLE {m} NOLOGIN")
        conn.execute(f"CREATE ROLE {quoted(made.admin)} SUPERUSER NOLOGIN")
        conn.execute(f"CREATE ROLE {quoted(made.replicator)} REPLICATION LOGIN")
        conn.execute(f"GRANT {r} TO {w} WITH ADMIN OPTION")
        conn.execute(f"GRANT {r} TO {m}")  # on the new server m exists already: left as it is
        conn.execute(f"ALTER ROLE {r} SET work_mem TO '8MB'")
        conn.execute(f"COMMENT ON ROLE {r} IS 'reads; the queue''s tables'")
    try:
        with pg_connect(database) as conn:
            conn.execute(f"CREATE SCHEMA app AUTHORIZATION {o}")
            conn.execute(f"GRANT USAGE ON SCHEMA app TO {r}, {w}")
            conn.execute(f"SET ROLE {o}")
            conn.execute("CREATE TABLE app.queues (id serial PRIMARY KEY, name text NOT NULL)")
            conn.execute("INSERT INTO app.queues (name) SELECT 'queue ' || i FROM generate_series(1, 40) i")
            conn.execute(f"GRANT SELECT ON app.queues TO {r}")
            conn.execute(f"GRANT INSERT, UPDATE (name) ON app.queues TO {w}")
            conn.execute(f"GRANT USAGE ON SEQUENCE app.queues_id_seq TO {w}")
            conn.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON TABLES TO {r}")
            conn.execute("RESET ROLE")
            conn.execute(
                f"CREATE VIEW app.names AS SELECT name FROM app.queues; ALTER VIEW app.names OWNER TO {m}"
            )
            conn.execute(f"GRANT SELECT ON app.queues TO {m}")
        yield made
    finally:
        with pg_connect(database) as conn:
            for name in (o, r, w, m):  # one at a time: all at once trips on the default privileges
                conn.execute(f"DROP OWNED BY {name} CASCADE")
        with pg_connect() as conn:
            for name in made.all:
                conn.execute(f"DROP ROLE IF EXISTS {quoted(name)}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def new_cluster(pki) -> Iterator[Cluster]:
    """A new, empty cluster: none of the test's roles exist there."""
    with running_cluster(pki) as cluster:
        yield cluster


def on_cluster(env: dict[str, str], cluster: Cluster, user: str = ADMIN) -> dict[str, str]:
    """The settings of ``env`` with the database on ``cluster``, reached over its socket."""
    return {**env, **settings_env(db_host=cluster.root, db_port=cluster.port, db_user=user)}


def schema(cluster: Cluster | None, database: str) -> str:
    """pg_dump --schema-only (owners and grants included), without its per-run \\restrict key."""
    where = (
        ["-h", str(cluster.root), "-p", str(cluster.port), "-U", ADMIN] if cluster else ["-h", "127.0.0.1"]
    )
    program = pg("pg_dump")[0] if cluster else "pg_dump"
    text = subprocess.run(
        [program, *where, "--schema-only", database], capture_output=True, text=True, check=True
    ).stdout
    return "\n".join(
        line for line in text.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))
    )


def role_rows(conn: psycopg.Connection, names: list[str]) -> tuple[list, list]:
    return (
        conn.execute(ROLE_QUERY, [names]).fetchall(),
        conn.execute(MEMBERS_QUERY, [names, names]).fetchall(),
    )


def data(conn: psycopg.Connection) -> list:
    return conn.execute(
        "SELECT md5(string_agg(id || ':' || name, ',' ORDER BY id)), count(*) FROM app.queues"
    ).fetchall()


def test_a_restore_onto_a_new_server_creates_the_missing_roles_and_everything_comes_back(
    base_env, database, roles, layout, start_worker, new_cluster, tmp_path
):
    start_worker(base_env)
    backup_id, manifest = make_backup(base_env, layout["storage"])
    facts = manifest["components"]["database"]["facts"]["globals"]
    assert facts["member"] == "globals.sql" and facts["passwords"] is True
    assert set(roles.all) <= set(facts["roles"])
    extracted = tmp_path / "globals.sql"
    done = run_cli(base_env, "extract", backup_id, "globals.sql", "-o", str(extracted))
    assert done.returncode == 0, done.stdout + done.stderr
    assert hashlib.sha256(extracted.read_bytes()).hexdigest() == facts["content"]["sha256"]
    assert f'CREATE ROLE "{roles.mixed}";' in extracted.read_text()
    with pg_connect() as conn:
        source_roles = role_rows(conn, roles.all)
    with pg_connect(database) as conn:
        source_data = data(conn)
    with new_cluster.admin() as conn:  # exists already, differently: it must stay as it is
        conn.execute(f"CREATE ROLE {quoted(roles.mixed)} LOGIN CONNECTION LIMIT 7")
        kept = role_rows(conn, [roles.mixed])

    env = on_cluster(base_env, new_cluster)
    planned = run_cli(env, "restore", backup_id, "--component", "database")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    wanted = sorted([roles.owner, roles.reader, roles.writer, roles.replicator])
    assert "roles to create (the server lacks them): " in planned.stdout
    assert all(name in planned.stdout.split("roles to create")[1].splitlines()[0] for name in wanted)
    assert (
        f"role {roles.admin} would NOT be created: SUPERUSER: a restore never creates one" in planned.stdout
    )
    with new_cluster.admin() as conn:
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)", [wanted]).fetchone() == (
            0,
        )

    restored = run_cli(env, "restore", backup_id, "--component", "database", "--force", "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "created roles (from globals.sql)" in restored.stdout
    assert (
        f"existing role {roles.mixed} left as it is: not made a member of {roles.reader}" in restored.stdout
    )

    assert schema(new_cluster, database) == schema(None, database)
    with new_cluster.admin() as conn:
        assert role_rows(conn, wanted) == (
            [row for row in source_roles[0] if row[0] in wanted],
            [row for row in source_roles[1] if row[0] in wanted and row[1] in wanted],
        )
        assert role_rows(conn, [roles.mixed]) == kept  # no membership either
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", [roles.admin]).fetchone() == (
            0,
        )
    with new_cluster.admin(database) as conn:
        assert data(conn) == source_data


def test_a_restoring_user_that_is_not_a_superuser_creates_what_it_may_and_names_the_rest(
    base_env, database, roles, layout, start_worker, new_cluster, tmp_path, monkeypatch
):
    start_worker(base_env)
    backup_id, _ = make_backup(base_env, layout["storage"])
    for name, value in base_env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    storage = open_storage(settings)
    sql_path = tmp_path / "database.sql"
    extract_to(storage, load_manifest(storage, backup_id), {"database": sql_path}, settings=settings)
    path = globals_file(sql_path)
    assert path.is_file()
    with new_cluster.admin() as conn:
        conn.execute("CREATE ROLE vq_restorer LOGIN CREATEROLE CREATEDB")
    restorer = settings.model_copy(
        update={"db_host": str(new_cluster.root), "db_port": new_cluster.port, "db_user": "vq_restorer"}
    )

    plan = plan_roles(restorer, "postgres", path)
    assert "never creates" in plan.not_created[roles.admin]
    assert plan.not_created[roles.replicator] == "it has REPLICATION, which only a superuser may give"
    assert {roles.owner, roles.reader, roles.writer, roles.mixed} <= set(plan.create)
    created, warnings = create_roles(restorer, "postgres", path)
    assert {roles.owner, roles.reader, roles.writer, roles.mixed} <= set(created)
    assert roles.admin not in created and roles.replicator not in created
    assert any(roles.replicator in w and "only a superuser may give" in w for w in warnings)
    assert not any("SCRAM" in w for w in warnings)
    with new_cluster.admin() as conn:
        names = [roles.reader, roles.writer]
        rows, members = role_rows(conn, names)
        assert [(r[0], r[5], r[8], r[11]) for r in rows] == [
            (roles.reader, False, 3, ["work_mem=8MB"]),
            (roles.writer, True, -1, None),
        ]
        assert rows[0][12] == "reads; the queue's tables"
        assert rows[1][9] is not None and rows[1][9].startswith("SCRAM-SHA-256$")  # the hash came back
        assert (roles.reader, roles.writer, True) in members
        for name in created:
            conn.execute(f"DROP ROLE {quoted(name)}")


SETTINGS = "SELECT setrole, setdatabase, setconfig FROM pg_db_role_setting ORDER BY 1, 2"
FORGED = """SET client_encoding = 'UTF8';
CREATE ROLE vq_new;
CREATE ROLE "current_user";
COMMENT ON ROLE vq_new IS $$'$$; ALTER ROLE vq_victim CONNECTION LIMIT 42; --';
ALTER ROLE vq_new SET search_path TO /*'*/ x; ALTER ROLE vq_victim VALID UNTIL '2001-01-01'; --';
ALTER ROLE vq_new SET search_path TO E'\\''; COMMENT ON ROLE vq_victim IS 'pwned'; --';
ALTER ROLE ALL IN DATABASE postgres SET vq.x TO '1';
ALTER ROLE vq_victim WITH SUPERUSER;
CREATE ROLE vq_bad;
ALTER ROLE vq_bad WITH LOGIN PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a2V5:c2VydmVy' NOTANATTRIBUTE;
GRANT vq_new TO current_user;
GRANT vq_new TO vq_victim;
GRANT vq_victim TO vq_new, postgres;
CREATE ROLE vq_victim;
ALTER ROLE vq_victim WITH LOGIN CONNECTION LIMIT 1;
"""


def test_a_tampered_globals_sql_never_reaches_a_role_that_exists(new_cluster, tmp_path):
    """Statements crafted to escape the shapes a restore reads (dollar quotes, block comments, E''
    strings, keywords for names, a role that exists named in CREATE ROLE) change no existing role,
    and no warning shows the password hash."""
    path = tmp_path / "globals.sql"
    path.write_text(FORGED)
    with new_cluster.admin() as conn:
        conn.execute("CREATE ROLE vq_victim NOLOGIN CONNECTION LIMIT 3")
        names = ["vq_victim", ADMIN]
        before = (
            role_rows(conn, names),
            conn.execute("SELECT setrole, setconfig FROM pg_db_role_setting").fetchall(),
        )
    settings = new_cluster.settings(db_host=str(new_cluster.root), db_user=ADMIN)

    created, warnings = create_roles(settings, "postgres", path)
    with new_cluster.admin() as conn:
        after = role_rows(conn, names), conn.execute(SETTINGS).fetchall()
        granted = role_rows(conn, ["vq_new"])[1]
        for name in ("vq_new", "current_user", "vq_bad"):
            conn.execute(f"DROP ROLE IF EXISTS {quoted(name)}")
    assert after == before
    # "current_user" is a role of that name, which the file creates: its grant reaches it, not postgres
    assert created == ["vq_new", "current_user"] and granted == [("vq_new", "current_user", False)]
    assert any("role vq_bad not created: its ALTER ROLE ... WITH holds words" in w for w in warnings)
    assert not any("SCRAM" in w or "c2Fsd" in w for w in warnings)
    assert sum("not applied" in w for w in warnings) == 6  # the six lines of no shape a restore reads
