"""A database restore over BACKUP_RESTORE_JOBS connections (issue 20) gives exactly what
``psql -f database.sql`` gives: schema, owners, grants, rows, sequences, large objects, materialized
views, what triggers wrote and constraint validity. The source database holds every kind of object
whose place in the dump matters: partitions (one partitioned again, one attached with its columns in
another order), inheritance, foreign keys both ways (one deferred), NOT VALID constraints that its
rows break, triggers that would change or add rows if they fired during the load, an event trigger,
generated columns, large objects (one over 1 MiB), extensions, and one table far larger than the
rest. A dump whose TOC cannot be read unambiguously falls back to one psql session, logged; a dump
that fails names the table and the line, and leaves no database behind."""

from __future__ import annotations

import difflib
import logging
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import PG_HOST, PG_PORT, PG_USER, pg_connect
from vq_tasks.errors import PermanentError
from vq_tasks.restore.postgres import restore_database
from vq_tasks.settings import Settings, load_settings
from vq_tasks.sources.postgres import dump_database

pytestmark = pytest.mark.integration

BIG_ROWS = 400_000
PARALLEL_LOGGER = "vq_tasks.restore.postgres_parallel"
AUDITED = 120 + 1 + 24 + 600  # the audit rows: invoices inserted, updated (1, then 24), measurements

# OWNER_ROLE and READER_ROLE are replaced by the module's two roles
SOURCE = r"""
CREATE EXTENSION citext;
CREATE EXTENSION btree_gist;
CREATE SCHEMA app;
CREATE SCHEMA "Odd Schema";
GRANT USAGE ON SCHEMA app TO READER_ROLE, OWNER_ROLE;
CREATE TYPE app.mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN app.positive_int AS integer CHECK (VALUE > 0);
CREATE FUNCTION app.add(a int, b int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT a + b';

CREATE TABLE app.audit (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tbl text NOT NULL,
  op text NOT NULL,
  row_data text
);
CREATE FUNCTION app.audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO app.audit (tbl, op, row_data) VALUES (TG_TABLE_NAME, TG_OP, to_jsonb(NEW)::text);
  RETURN NEW;
END $$;
CREATE FUNCTION app.stamp_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.revision := NEW.revision + 1;
  NEW.stamped := coalesce(NEW.stamped, '') || '*';
  RETURN NEW;
END $$;

-- owned by a role, with grants on the table, a column, a view and row security
CREATE SEQUENCE app.invoice_numbers START 1000 INCREMENT 7;
CREATE SEQUENCE app.never_called START 10;
SELECT setval('app.never_called', 42, false);
CREATE TABLE app.customers (
  id int GENERATED ALWAYS AS IDENTITY (START WITH 100 INCREMENT BY 5) PRIMARY KEY,
  email citext NOT NULL UNIQUE,
  name text NOT NULL,
  feeling app.mood,
  age app.positive_int,
  note text,
  name_length int GENERATED ALWAYS AS (length(name)) STORED,
  CONSTRAINT customers_name_not_blank CHECK (name <> '')
);
ALTER TABLE app.customers OWNER TO OWNER_ROLE;
GRANT SELECT, INSERT ON app.customers TO READER_ROLE;
GRANT UPDATE (note) ON app.customers TO READER_ROLE;
ALTER TABLE app.customers ENABLE ROW LEVEL SECURITY;
CREATE POLICY customers_happy ON app.customers FOR SELECT TO READER_ROLE USING (feeling = 'happy');
CREATE VIEW app.happy_customers AS SELECT id, name, email FROM app.customers WHERE feeling = 'happy';
ALTER VIEW app.happy_customers OWNER TO OWNER_ROLE;
GRANT SELECT ON app.happy_customers TO READER_ROLE;
ALTER DEFAULT PRIVILEGES FOR ROLE OWNER_ROLE IN SCHEMA app GRANT SELECT ON TABLES TO READER_ROLE;

-- foreign keys both ways: departments -> employees deferred, employees -> departments not
CREATE TABLE app.departments (id int PRIMARY KEY, name text NOT NULL UNIQUE, head_id int);
CREATE TABLE app.employees (
  id int PRIMARY KEY,
  name text NOT NULL,
  department_id int NOT NULL,
  boss_id int REFERENCES app.employees
);
ALTER TABLE app.employees ADD CONSTRAINT employees_department_fk
  FOREIGN KEY (department_id) REFERENCES app.departments;
ALTER TABLE app.departments ADD CONSTRAINT departments_head_fk
  FOREIGN KEY (head_id) REFERENCES app.employees DEFERRABLE INITIALLY DEFERRED;
COMMENT ON CONSTRAINT departments_head_fk ON app.departments IS 'deferred: heads come after';
CREATE INDEX employees_name_idx ON app.employees (lower(name));
COMMENT ON INDEX app.employees_name_idx IS 'for lookups by name';
ALTER TABLE app.departments REPLICA IDENTITY USING INDEX departments_name_key;

-- a DEFAULT from a sequence, a generated column, a BEFORE trigger that changes rows, an AFTER one
-- that writes to app.audit, and a disabled one
CREATE TABLE app.invoices (
  number bigint PRIMARY KEY DEFAULT nextval('app.invoice_numbers'),
  customer_id int NOT NULL REFERENCES app.customers,
  handled_by int,
  quantity int NOT NULL CHECK (quantity > 0),
  price numeric(10, 2) NOT NULL,
  total numeric(12, 2) GENERATED ALWAYS AS (quantity * price) STORED,
  revision int NOT NULL DEFAULT 0,
  stamped text
);
ALTER SEQUENCE app.invoice_numbers OWNED BY app.invoices.number;
CREATE TRIGGER invoices_stamp BEFORE INSERT OR UPDATE ON app.invoices
  FOR EACH ROW EXECUTE FUNCTION app.stamp_row();
CREATE TRIGGER invoices_audit AFTER INSERT OR UPDATE ON app.invoices
  FOR EACH ROW EXECUTE FUNCTION app.audit_row();
CREATE TRIGGER invoices_never AFTER INSERT ON app.invoices FOR EACH ROW EXECUTE FUNCTION app.audit_row();
ALTER TABLE app.invoices DISABLE TRIGGER invoices_never;

-- a partitioned table: a PK and an index on the parent, a partition partitioned again, a default
-- partition, one attached with its columns in another order, a trigger on the parent, a foreign key to it
CREATE TABLE app.measurements (
  region text NOT NULL,
  id int NOT NULL,
  taken date NOT NULL,
  value double precision,
  PRIMARY KEY (region, id, taken)
) PARTITION BY LIST (region);
CREATE INDEX measurements_taken_idx ON app.measurements (taken);
CREATE TABLE app.measurements_eu PARTITION OF app.measurements FOR VALUES IN ('eu')
  PARTITION BY RANGE (taken);
CREATE TABLE app.measurements_eu_2023 PARTITION OF app.measurements_eu
  FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE app.measurements_eu_2024 PARTITION OF app.measurements_eu
  FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE app.measurements_us PARTITION OF app.measurements FOR VALUES IN ('us');
CREATE INDEX measurements_us_value_idx ON app.measurements_us (value);
CREATE TABLE app.measurements_asia (
  value double precision, taken date NOT NULL, id int NOT NULL, region text NOT NULL
);
ALTER TABLE app.measurements ATTACH PARTITION app.measurements_asia FOR VALUES IN ('asia');
CREATE TABLE app.measurements_rest PARTITION OF app.measurements DEFAULT;
CREATE TRIGGER measurements_audit AFTER INSERT ON app.measurements
  FOR EACH ROW EXECUTE FUNCTION app.audit_row();
CREATE TABLE app.measurement_flags (
  region text NOT NULL, id int NOT NULL, taken date NOT NULL, flag text,
  FOREIGN KEY (region, id, taken) REFERENCES app.measurements
);

-- inheritance
CREATE TABLE app.vehicles (id int PRIMARY KEY, name text NOT NULL, wheels int NOT NULL CHECK (wheels >= 0));
CREATE TABLE app.trucks (payload_kg int NOT NULL DEFAULT 0) INHERITS (app.vehicles);
CREATE INDEX vehicles_sum_idx ON app.vehicles (app.add(id, wheels));
ALTER TABLE app.vehicles REPLICA IDENTITY FULL;

-- an EXCLUDE constraint (btree_gist), an unlogged table, quoted names, a sequence DEFAULT
CREATE TABLE app.bookings (
  id serial PRIMARY KEY,
  room int NOT NULL,
  during tsrange NOT NULL,
  EXCLUDE USING gist (room WITH =, during WITH &&)
);
CREATE UNLOGGED TABLE app.cache (k text PRIMARY KEY, v text);
CREATE SEQUENCE "Odd Schema"."Weird Seq" START 500;
CREATE TABLE "Odd Schema"."Weird Name" (
  "the id" int PRIMARY KEY DEFAULT nextval('"Odd Schema"."Weird Seq"'),
  "user" text,
  "Mixed Case" int UNIQUE
);

-- large objects, one over 1 MiB, one owned by a role with a grant and a comment
CREATE TABLE app.documents (id int PRIMARY KEY, title text NOT NULL, body oid NOT NULL);

-- the table far larger than the rest
CREATE TABLE app.event_kinds (id smallint PRIMARY KEY, name text NOT NULL);
CREATE TABLE app.events (
  id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  kind_id smallint NOT NULL,
  at timestamptz NOT NULL,
  ticket int NOT NULL,
  note text
);

BEGIN;
INSERT INTO app.customers (email, name, feeling, age, note)
SELECT 'Person' || i || '@Example.com', 'Person ' || i || CASE WHEN i % 5 = 0 THEN ' Zoë 東京' ELSE '' END,
  (ARRAY['sad', 'ok', 'happy', NULL])[1 + i % 4]::app.mood, CASE WHEN i % 7 = 0 THEN NULL ELSE 1 + i % 90 END,
  CASE WHEN i % 2 = 0 THEN E'line\nbreak, tab\t, back\\slash' END
FROM generate_series(1, 200) i;
INSERT INTO app.departments VALUES (1, 'Front desk', 10), (2, 'Back office', 20), (3, 'Empty', NULL);
INSERT INTO app.employees VALUES (10, 'Ada', 1, NULL), (20, 'Bob', 2, 10), (21, 'cleo', 2, 20),
  (22, 'Dan', 2, 20), (11, 'eve', 1, 10);
COMMIT;
ALTER TABLE app.employees ADD CONSTRAINT employees_name_capitalised CHECK (name ~ '^[A-Z]') NOT VALID;
INSERT INTO app.invoices (customer_id, handled_by, quantity, price)
SELECT 100 + 5 * (i % 200), CASE WHEN i % 3 = 0 THEN 10 ELSE 20 END, 1 + i % 9, i * 1.25
FROM generate_series(1, 120) i;
UPDATE app.invoices SET handled_by = 99 WHERE number = 1000;
UPDATE app.invoices SET price = price + 1 WHERE number % 5 = 0;
ALTER TABLE app.invoices ADD CONSTRAINT invoices_handler_fk
  FOREIGN KEY (handled_by) REFERENCES app.employees NOT VALID;
INSERT INTO app.measurements (region, id, taken, value)
SELECT (ARRAY['eu', 'us', 'asia', 'africa'])[1 + i % 4], i, date '2023-06-01' + (i % 400), i * 0.5
FROM generate_series(1, 600) i;
INSERT INTO app.measurement_flags SELECT region, id, taken, 'checked' FROM app.measurements WHERE id % 50 = 0;
INSERT INTO app.vehicles VALUES (1, 'bike', 2), (2, 'car', 4);
INSERT INTO app.trucks VALUES (3, 'truck', 6, 12000), (4, 'lorry', 18, 40000);
INSERT INTO app.bookings (room, during) SELECT 1 + i % 5,
  tsrange(timestamp '2024-01-01' + i * interval '1 day',
          timestamp '2024-01-01' + i * interval '1 day' + interval '3 hours')
FROM generate_series(1, 50) i;
INSERT INTO app.cache VALUES ('a', 'x'), ('b', NULL);
INSERT INTO "Odd Schema"."Weird Name" ("user", "Mixed Case") VALUES ('x', 1), (NULL, 2), ('z', NULL);
INSERT INTO app.documents VALUES
  (1, 'small', lo_from_bytea(0, convert_to('hello, large object', 'UTF8'))),
  (2, 'binary', lo_from_bytea(0, '\x00ff00fe5c2e0a'::bytea)),
  (3, 'big', lo_from_bytea(0, (SELECT decode(string_agg(md5(i::text), ''), 'hex')
                               FROM generate_series(1, 70000) i))),
  (4, 'empty', lo_from_bytea(0, ''::bytea));
DO $$
DECLARE o oid;
BEGIN
  SELECT body INTO o FROM app.documents WHERE id = 1;
  EXECUTE format('ALTER LARGE OBJECT %s OWNER TO OWNER_ROLE', o);
  EXECUTE format('GRANT SELECT ON LARGE OBJECT %s TO READER_ROLE', o);
  EXECUTE format('COMMENT ON LARGE OBJECT %s IS %L', o, 'the small one');
END $$;
INSERT INTO app.event_kinds VALUES (1, 'joined'), (2, 'called'), (3, 'served'), (4, 'left');
INSERT INTO app.events (kind_id, at, ticket, note)
SELECT 1 + i % 4, timestamptz '2024-01-01 00:00+00' + i * interval '7 seconds', i / 3,
  CASE WHEN i % 10 = 0 THEN 'note ' || i END
FROM generate_series(1, BIG_ROWS) i;
ALTER TABLE app.events ADD CONSTRAINT events_kind_fk FOREIGN KEY (kind_id) REFERENCES app.event_kinds;
CREATE INDEX events_ticket_idx ON app.events (ticket);
CREATE INDEX events_kind_at_idx ON app.events (kind_id, at);
ALTER TABLE app.events CLUSTER ON events_kind_at_idx;
SELECT setval('"Odd Schema"."Weird Seq"', 777);
SELECT nextval('app.invoice_numbers') FROM generate_series(1, 3);

-- materialized views: one with a unique index, one over it, one never populated
CREATE MATERIALIZED VIEW app.department_sizes AS
  SELECT d.id, d.name, count(e.id) AS staff FROM app.departments d
  LEFT JOIN app.employees e ON e.department_id = d.id GROUP BY d.id, d.name;
CREATE UNIQUE INDEX department_sizes_id ON app.department_sizes (id);
CREATE MATERIALIZED VIEW app.big_departments AS SELECT id, name FROM app.department_sizes WHERE staff > 2;
CREATE MATERIALIZED VIEW app.unpopulated AS SELECT id FROM app.vehicles WITH NO DATA;
GRANT SELECT ON app.departments, app.employees TO OWNER_ROLE;
ALTER MATERIALIZED VIEW app.department_sizes OWNER TO OWNER_ROLE;

-- an event trigger, last: it logs the DDL run after it but the refreshes of materialized views (pg_dump's
-- come after it: they would add rows the backup does not have)
CREATE TABLE app.ddl_log (id int GENERATED ALWAYS AS IDENTITY, tag text NOT NULL);
CREATE FUNCTION app.log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
  IF tg_tag <> 'REFRESH MATERIALIZED VIEW' THEN
    INSERT INTO app.ddl_log (tag) VALUES (tg_tag);
  END IF;
END $$;
CREATE EVENT TRIGGER log_ddl ON ddl_command_end EXECUTE FUNCTION app.log_ddl();
"""

# A header that reads two ways: the table's name and its schema's both hold "; Type: ...; Schema: "
AMBIGUOUS = r"""
CREATE SCHEMA "s; Type: TABLE; Schema: public";
CREATE TABLE "s; Type: TABLE; Schema: public"."t; Type: INDEX; Schema: x" (
  id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  note text
);
CREATE INDEX "i; Type: TABLE; Schema: public"
  ON "s; Type: TABLE; Schema: public"."t; Type: INDEX; Schema: x" (note);
CREATE TABLE public.plain (id int PRIMARY KEY, t_id int, revision int NOT NULL DEFAULT 0);
CREATE FUNCTION public.bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.revision := NEW.revision + 1; RETURN NEW; END $$;
CREATE TRIGGER plain_bump BEFORE INSERT ON public.plain FOR EACH ROW EXECUTE FUNCTION public.bump();
INSERT INTO "s; Type: TABLE; Schema: public"."t; Type: INDEX; Schema: x" (note)
SELECT 'note ' || i FROM generate_series(1, 300) i;
INSERT INTO public.plain (id, t_id) SELECT i, 1 + i % 300 FROM generate_series(1, 500) i;
ALTER TABLE public.plain ADD FOREIGN KEY (t_id)
  REFERENCES "s; Type: TABLE; Schema: public"."t; Type: INDEX; Schema: x";
"""

# Text that looks like the dump's own structure, inside a function, a comment and COPY rows
GHOST = "-- Data for Name: ghost; Type: TABLE DATA; Schema: public; Owner: postgres"
GHOST_INDEX = "-- Name: ghost_idx; Type: INDEX; Schema: public; Owner: postgres"
LOOKALIKE = rf"""
CREATE FUNCTION public.f() RETURNS text LANGUAGE sql AS $q$
SELECT E'\n--\n{GHOST}\n--\n\nCOPY public.ghost (id) FROM stdin;\n1\n\\.\n'
$q$;
CREATE TABLE public.lines (n int PRIMARY KEY, line text);
COMMENT ON TABLE public.lines IS E'first\n--\n{GHOST}\n--\nCOPY public.ghost (id) FROM stdin;\n\\.\n';
CREATE TABLE public.raw (line text);
INSERT INTO public.raw VALUES ('--'), ('{GHOST}'), ('--'), (''), ('COPY public.ghost (id) FROM stdin;'),
  ('\.'), ('--'), ('{GHOST_INDEX}'), ('--'), ('CREATE INDEX ghost_idx ON public.lines (line);'), (NULL),
  (E'tab\there');
INSERT INTO public.lines SELECT i, 'line ' || i FROM generate_series(1, 1000) i;
CREATE TABLE public."new
line" (id int PRIMARY KEY, "col
two" text);
INSERT INTO public."new
line" VALUES (1, 'a'), (2, E'b\nc');
CREATE INDEX lines_line_idx ON public.lines (line);
"""

USER_RELATIONS = r"""SELECT c.oid, format('%I.%I', n.nspname, c.relname), c.relkind, c.relispopulated
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                  AND d.deptype = 'e')"""
CATALOG_QUERIES = {
    "relations": r"""SELECT format('%I.%I', n.nspname, c.relname), c.relkind, c.relowner::regrole::text,
         c.relacl::text, c.relpersistence, c.relispopulated, c.relrowsecurity, c.relforcerowsecurity,
         c.relreplident, c.relispartition, pg_get_expr(c.relpartbound, c.oid), c.relhastriggers,
         c.relhassubclass, c.relnatts
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
       WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema' ORDER BY 1""",
    "column_acls": r"""SELECT a.attrelid::regclass::text, a.attname, a.attacl::text FROM pg_attribute a
       JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
       WHERE a.attacl IS NOT NULL AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
       ORDER BY 1, 2""",
    "constraints": r"""SELECT conrelid::regclass::text, conname, contype, convalidated, condeferrable,
         condeferred, conislocal, coninhcount, pg_get_constraintdef(oid),
         obj_description(oid, 'pg_constraint')
       FROM pg_constraint WHERE connamespace::regnamespace::text !~ '^pg_'
         AND connamespace::regnamespace::text <> 'information_schema' ORDER BY 1, 2, 9""",
    "indexes": r"""SELECT i.indexrelid::regclass::text, i.indrelid::regclass::text, i.indisunique,
         i.indisprimary, i.indisexclusion, i.indimmediate, i.indisclustered, i.indisvalid, i.indisready,
         i.indislive, i.indisreplident, obj_description(i.indexrelid, 'pg_class'),
         (SELECT inhparent::regclass::text FROM pg_inherits WHERE inhrelid = i.indexrelid)
       FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
       WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema' ORDER BY 1""",
    "triggers": r"""SELECT tgrelid::regclass::text, tgname, tgenabled, tgisinternal, tgparentid <> 0,
         pg_get_triggerdef(oid)
       FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2""",
    "event_triggers": """SELECT evtname, evtevent, evtowner::regrole::text, evtenabled
       FROM pg_event_trigger ORDER BY 1""",
    "inheritance": r"""SELECT inhrelid::regclass::text, inhparent::regclass::text, inhseqno, inhdetachpending
       FROM pg_inherits ORDER BY 1, 2""",
    "extensions": r"""SELECT extname, extversion, extnamespace::regnamespace::text, extowner::regrole::text,
         extconfig::text FROM pg_extension ORDER BY 1""",
    "default_acls": r"""SELECT defaclrole::regrole::text, defaclnamespace::regnamespace::text, defaclobjtype,
         defaclacl::text FROM pg_default_acl ORDER BY 1, 2, 3""",
    "policies": r"""SELECT polrelid::regclass::text, polname, polcmd, polpermissive,
         polroles::regrole[]::text, pg_get_expr(polqual, polrelid) FROM pg_policy ORDER BY 1, 2""",
    "large_objects": r"""SELECT m.oid, m.lomowner::regrole::text, m.lomacl::text,
         obj_description(m.oid, 'pg_largeobject'), md5(lo_get(m.oid)), length(lo_get(m.oid))
       FROM pg_largeobject_metadata m ORDER BY 1""",
    "functions": r"""SELECT p.oid::regprocedure::text, p.proowner::regrole::text, p.proacl::text,
         md5(pg_get_functiondef(p.oid))
       FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
       WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema' AND p.prokind <> 'a'
         AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                         AND d.deptype = 'e')
       ORDER BY 1""",
}


@dataclass(frozen=True)
class Source:
    """A source database, its dump by dump_database (rows per table as it reported them), and the
    database that ``psql -f`` of that dump gave."""

    name: str
    dump: Path
    tables: dict[str, int]
    reference: str


@dataclass(frozen=True)
class World:
    prefix: str
    owner: str
    reader: str
    tmp: Path


def settings_for(name: str, **overrides) -> Settings:
    values = dict(db_host=PG_HOST, db_port=PG_PORT, db_user=PG_USER, db_name=name)
    return load_settings(celery_broker_url="redis://127.0.0.1:1/0", **{**values, **overrides})


def drop_databases(prefix: str) -> None:
    with pg_connect() as conn:
        names = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", [prefix]
        ).fetchall()
        for (name,) in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def databases(prefix: str) -> list[str]:
    with pg_connect() as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1", [prefix]
        ).fetchall()
    return [name for (name,) in rows]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    """Two roles of this module's own (NOLOGIN) and a prefix for its databases; every database with
    that prefix, then the roles, are dropped afterwards, whatever happened."""
    tag = uuid.uuid4().hex[:8]
    made = World(
        f"vq_par_{tag}", f"vq_par_owner_{tag}", f"vq_par_reader_{tag}", tmp_path_factory.mktemp("par")
    )
    try:
        with pg_connect() as conn:
            conn.execute(f'CREATE ROLE "{made.owner}" NOLOGIN')
            conn.execute(f'CREATE ROLE "{made.reader}" NOLOGIN')
        yield made
    finally:
        drop_databases(made.prefix)
        with pg_connect() as conn:
            for role in (made.reader, made.owner):
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def make_source(world: World, suffix: str, sql: str) -> Source:
    """Create the database ``<prefix>_<suffix>`` holding ``sql``, dump it as a backup does, and load
    the dump into ``<prefix>_<suffix>_ref`` with plain ``psql -f``."""
    name = f"{world.prefix}_{suffix}"
    with pg_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    sql = sql.replace("OWNER_ROLE", f'"{world.owner}"').replace("READER_ROLE", f'"{world.reader}"')
    with pg_connect(name) as conn:
        conn.execute(sql.replace("BIG_ROWS", str(BIG_ROWS)))
    path = world.tmp / f"{suffix}.sql"
    with path.open("wb") as out:
        facts = dump_database(settings_for(name), out)
    reference = f"{name}_ref"
    load_with_psql(path, reference)
    return Source(name, path, facts.tables, reference)


def load_with_psql(path: Path, name: str) -> None:
    with pg_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    psql = ["psql", "-X", "-q", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", name]
    subprocess.run(
        [*psql, "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f", str(path)],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def source(world: World) -> Source:
    return make_source(world, "src", SOURCE)


@pytest.fixture
def scratch(world: World) -> Iterator[str]:
    """A unique name for a database a restore creates; whatever starts with it is dropped afterwards."""
    name = f"{world.prefix}_{uuid.uuid4().hex[:6]}"
    yield name
    drop_databases(name)


def schema_dump(name: str) -> str:
    """pg_dump --schema-only, without the lines that change from one run to the next."""
    text = subprocess.run(
        ["pg_dump", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "--schema-only", "-d", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    skipped = ("\\restrict", "\\unrestrict", "-- Dumped from", "-- Dumped by")
    return "\n".join(line for line in text.splitlines() if not line.startswith(skipped))


def contents(name: str) -> dict[str, object]:
    """Rows (count and ordered md5) of every table, partition, child and populated materialized view
    (ONLY that relation), and every sequence's last_value and is_called."""
    found: dict[str, object] = {}
    with pg_connect(name) as conn:
        for _, rel, kind, populated in conn.execute(USER_RELATIONS + " ORDER BY 2").fetchall():
            if kind == "S":
                query = f"SELECT last_value, is_called FROM {rel}"
            elif kind in ("r", "m") and populated:
                only = "ONLY " if kind == "r" else ""
                query = (
                    f"SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) "
                    f"FROM {only}{rel} t"
                )
            else:
                continue
            found[rel] = tuple(conn.execute(query).fetchone())
    return found


def catalogs(name: str) -> dict[str, list[tuple]]:
    with pg_connect(name) as conn:
        return {
            key: [tuple(row) for row in conn.execute(query).fetchall()]
            for key, query in CATALOG_QUERIES.items()
        }


def assert_same_database(restored: str, reference: str) -> None:
    """Everything the comparison looks at, in ``restored`` as in ``reference``; a schema difference
    is shown as a diff of the two schema dumps."""
    got, want = schema_dump(restored), schema_dump(reference)
    if got != want:
        diff = "\n".join(
            difflib.unified_diff(want.splitlines(), got.splitlines(), "psql -f", "restore", lineterm="")
        )
        pytest.fail(f"pg_dump --schema-only differs:\n{diff}")
    got_catalogs, want_catalogs = catalogs(restored), catalogs(reference)
    for key in CATALOG_QUERIES:
        missing = [row for row in want_catalogs[key] if row not in got_catalogs[key]]
        extra = [row for row in got_catalogs[key] if row not in want_catalogs[key]]
        assert got_catalogs[key] == want_catalogs[key], (
            f"{key}: only after psql -f {missing}, only after the restore {extra}"
        )
    got_contents, want_contents = contents(restored), contents(reference)
    assert got_contents.keys() == want_contents.keys()
    differing = {
        rel: (want_contents[rel], got_contents[rel])
        for rel in want_contents
        if got_contents[rel] != want_contents[rel]
    }
    assert not differing, f"rows or sequences differ (psql -f, restore): {differing}"


def restore(source: Source, target: str, jobs: int):
    return restore_database(
        settings_for(source.name, backup_restore_jobs=jobs),
        source.dump,
        source.tables,
        target_db=target,
        swap=False,
    )


def test_the_source_and_its_psql_load_are_what_the_comparison_expects(source: Source):
    """The fixture is what the other tests rely on: the reference holds the source's rows, the
    triggers' writes once, the big table, the large objects and the unpopulated view as they were."""
    want, got = contents(source.name), contents(source.reference)
    assert got == want
    assert got["app.events"][0] == BIG_ROWS
    assert got["app.audit"][0] == AUDITED
    with pg_connect(source.reference) as conn:
        assert conn.execute(
            "SELECT DISTINCT revision, stamped FROM app.invoices WHERE number % 5 <> 0"
        ).fetchall() == [(1, "*")]
        sizes = conn.execute("SELECT max(length(lo_get(oid))) FROM pg_largeobject_metadata").fetchone()[0]
        assert sizes > 1 << 20
        unvalidated = conn.execute(
            "SELECT conname FROM pg_constraint WHERE NOT convalidated ORDER BY 1"
        ).fetchall()
        assert unvalidated == [("employees_name_capitalised",), ("invoices_handler_fk",)]
        assert conn.execute(
            "SELECT relispopulated FROM pg_class WHERE oid = 'app.unpopulated'::regclass"
        ).fetchone() == (False,)
    assert catalogs(source.reference)["large_objects"] == catalogs(source.name)["large_objects"]
    assert "app.measurements_eu_2023" in source.tables and "app.events" in source.tables


@pytest.mark.parametrize("jobs", [1, 2, 4])
def test_a_parallel_restore_gives_what_psql_gives(source: Source, scratch: str, jobs: int):
    result = restore(source, scratch, jobs)

    assert result.database == scratch and not result.swapped
    assert result.row_counts == source.tables
    assert_same_database(scratch, source.reference)
    with pg_connect(scratch) as conn:  # what the triggers wrote, once: they did not fire during the load
        assert conn.execute("SELECT count(*) FROM app.audit").fetchone()[0] == AUDITED
        assert conn.execute(
            "SELECT DISTINCT revision FROM app.invoices WHERE number % 5 <> 0"
        ).fetchall() == [(1,)]
    assert databases(scratch) == [scratch]
    assert result.split_by_toc is True
    assert result.jobs == jobs


def test_text_that_looks_like_the_dumps_structure_does_not_split_it(world: World, scratch: str):
    """TOC-like lines inside a function's body, a comment and COPY rows, and names with newlines
    (their TOC comments say "new line")."""
    tricky = make_source(world, "look", LOOKALIKE)

    result = restore(tricky, scratch, 2)

    assert result.row_counts == tricky.tables
    assert_same_database(scratch, tricky.reference)
    assert result.split_by_toc is True
    assert result.jobs == 2


def test_a_toc_that_reads_two_ways_falls_back_to_one_psql_session(world: World, scratch: str, caplog):
    ambiguous = make_source(world, "amb", AMBIGUOUS)
    header = (
        "-- Name: t; Type: INDEX; Schema: x; Type: TABLE; Schema: s; Type: TABLE; Schema: public; Owner: "
    )
    assert header in ambiguous.dump.read_text()
    caplog.set_level(logging.WARNING, logger=PARALLEL_LOGGER)

    result = restore(ambiguous, scratch, 2)

    assert result.row_counts == ambiguous.tables
    assert_same_database(scratch, ambiguous.reference)
    with pg_connect(scratch) as conn:
        assert conn.execute("SELECT DISTINCT revision FROM public.plain").fetchall() == [(1,)]
    assert result.split_by_toc is False
    assert result.jobs == 1
    warnings = [
        r.getMessage() for r in caplog.records if r.name == PARALLEL_LOGGER and r.levelno == logging.WARNING
    ]
    assert any("one psql session" in message for message in warnings), caplog.text


def test_a_row_that_does_not_load_names_the_table_and_line_and_leaves_no_database(
    source: Source, world: World, scratch: str
):
    lines = source.dump.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("COPY app.employees ("))
    end = next(i for i in range(start, len(lines)) if lines[i] == "\\.")
    fields = lines[start + 1].split("\t")
    assert fields[0].isdigit()  # id, an integer
    lines[start + 1] = "\t".join(["notanumber", *fields[1:]])
    broken = world.tmp / "broken.sql"
    broken.write_text("\n".join(lines))
    before = databases(world.prefix)

    with pytest.raises(PermanentError) as failure:
        restore_database(
            settings_for(source.name, backup_restore_jobs=2),
            broken,
            source.tables,
            target_db=scratch,
            swap=False,
        )

    assert databases(scratch) == []
    assert databases(world.prefix) == before
    message = str(failure.value)
    assert "notanumber" in message and "employees" in message, message
    numbers = [int(n) for n in re.findall(r"broken\.sql line (\d+)", message)]
    assert numbers, message
    assert all(start + 1 <= n <= end + 1 for n in numbers), (message, start + 1, end + 1)
