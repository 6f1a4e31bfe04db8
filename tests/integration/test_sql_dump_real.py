"""Row counts read from real pg_dump output equal count(*), for tables built to confuse a reader:
COPY-looking text inside literals, newlines and parentheses in names, no columns at all."""

from __future__ import annotations

import subprocess

import pytest

from tests.integration.conftest import PG_HOST, PG_PORT, PG_USER, pg_connect
from vq_tasks.clients.sql_dump import SqlDumpInspector

pytestmark = pytest.mark.integration

TRICKY = r"""
CREATE TABLE a (id int);
INSERT INTO a SELECT generate_series(1, 5);
COMMENT ON TABLE a IS E'first\nCOPY public.ghost (id) FROM stdin;\nlast\n\\.\n';
CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$ SELECT E'\n-- Data for Name: x; Type: TABLE DATA; \n' $$;
CREATE TABLE b (id int, note text DEFAULT E'x\nCOPY b FROM stdin;\n');
INSERT INTO b (id) SELECT generate_series(1, 7);
CREATE TABLE "new
line" (id int);
INSERT INTO "new
line" VALUES (1), (2), (3);
CREATE TABLE "weird (name)" ("col (1)" int);
INSERT INTO "weird (name)" VALUES (1);
CREATE TABLE nocols ();
INSERT INTO nocols DEFAULT VALUES;
INSERT INTO nocols DEFAULT VALUES;
CREATE TABLE empty (id int);
CREATE TABLE texts (t text);
INSERT INTO texts VALUES (E'back\\slash'), (E'\\.'), (E'tab\there'), (E'new\nline'), (NULL);
"""


def test_counts_match_count_star(database):
    with pg_connect(database) as conn:
        conn.execute(TRICKY)
        tables = conn.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
        expected = {name: conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0] for (name,) in tables}
    dump = subprocess.run(
        ["pg_dump", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", database],
        capture_output=True,
        check=True,
    ).stdout
    for size in (len(dump), 7, 1):
        inspector = SqlDumpInspector()
        for i in range(0, len(dump), size):
            inspector.feed(dump[i : i + size])
        assert inspector.tables == expected, size
        assert inspector.complete
