"""The TOC of a plain dump: entries found only where SQL could start a comment, COPY data skipped,
session settings followed, and anything uncertain refused (the restore then uses one psql)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vq_tasks.clients import sql_toc
from vq_tasks.clients.sql_toc import TocError, line_number, read_toc

PREAMBLE = (
    "--\n-- PostgreSQL database dump\n--\n\n\\restrict abcDEF123\n\n"
    "-- Dumped from database version 15.20\n-- Dumped by pg_dump version 15.20\n\n"
    "SET statement_timeout = 0;\nSET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\n"
    "SELECT pg_catalog.set_config('search_path', '', false);\n\n"
)
CLOSING = "--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abcDEF123\n\n"


def entry(kind: str, name: str, sql: str, schema: str = "public", data: bool = False) -> str:
    prefix = "Data for " if data else ""
    return f"--\n-- {prefix}Name: {name}; Type: {kind}; Schema: {schema}; Owner: app\n--\n\n{sql}\n\n\n"


FUNCTION = entry(
    "FUNCTION",
    "f()",
    "CREATE FUNCTION public.f() RETURNS text\n    LANGUAGE sql\n    AS $_$SELECT '\n--\n-- Name: x; Type: "
    "TABLE; Schema: public; Owner: app\n--\n\n'::text$_$;",
)
TABLE = entry("TABLE", "t", "CREATE TABLE public.t (\n    id integer,\n    note text\n);")
ROWS = "1\t--\n2\t-- Name: y; Type: INDEX; Schema: public; Owner: app\n3\t\\N\n"
DATA = entry("TABLE DATA", "t", f"COPY public.t (id, note) FROM stdin;\n{ROWS}\\.", data=True)
INDEX = entry("INDEX", "t_id", "CREATE INDEX t_id ON public.t USING btree (id);")
FAKE = "\n--\n-- Name: q; Type: TABLE; Schema: s; Owner: o\n--\n\n"
COMMENT = entry(
    "COMMENT", "INDEX t_id", "COMMENT ON INDEX public.t_id IS 'it''s\n--\n-- Name: z; Type: TABLE;';"
)


def write(tmp_path: Path, *parts: str, preamble: str = PREAMBLE, closing: str = CLOSING) -> Path:
    path = tmp_path / "database.sql"
    path.write_bytes((preamble + "".join(parts) + closing).encode())
    return path


def kinds(path: Path) -> list[tuple[str, str]]:
    return [(e.kind, e.name) for e in read_toc(path).entries]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_entries_are_found_at_any_chunk_size_and_never_inside_quotes_or_copy_data(
    tmp_path, monkeypatch, chunk
):
    monkeypatch.setattr(sql_toc, "CHUNK", chunk)
    path = write(tmp_path, FUNCTION, TABLE, DATA, INDEX, COMMENT)
    toc = read_toc(path)
    assert [(e.kind, e.name) for e in toc.entries] == [
        ("FUNCTION", "f()"),
        ("TABLE", "t"),
        ("TABLE DATA", "t"),
        ("INDEX", "t_id"),
        ("COMMENT", "INDEX t_id"),
    ]
    text = path.read_bytes()
    data = toc.entries[2].copy
    assert data is not None and data.statement == b"COPY public.t (id, note) FROM stdin"
    assert text[data.start : data.end] == ROWS.encode()
    assert b"\\restrict" not in toc.preamble and toc.preamble.startswith(b"--\n-- PostgreSQL database dump")
    function = toc.entries[0]
    assert text[function.start : function.end].strip().endswith(b"'::text$_$;")


def test_each_entry_is_its_sql_alone(tmp_path):
    path = write(tmp_path, TABLE, INDEX)
    text, toc = path.read_bytes(), read_toc(path)
    assert [text[e.start : e.end].strip() for e in toc.entries] == [
        b"CREATE TABLE public.t (\n    id integer,\n    note text\n);",
        b"CREATE INDEX t_id ON public.t USING btree (id);",
    ]
    assert (
        line_number(path, toc.entries[1].header) + 1 == text[: text.index(b"-- Name: t_id")].count(b"\n") + 1
    )


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT 'a'; /* outer /* inner */ still a comment{FAKE}*/",
        f"SELECT E'it\\'s{FAKE}';",
        f'CREATE TABLE "a{FAKE}" (id int);',
        "CREATE FUNCTION f(int) RETURNS int AS $$ SELECT $1 $$ LANGUAGE sql; SELECT a$b$c FROM t;",
        f"SELECT $tag$ $${FAKE}$tag$;",
    ],
)
def test_text_shaped_like_a_header_inside_sql_is_not_one(tmp_path, sql):
    path = write(tmp_path, entry("FUNCTION", "f", sql), INDEX)
    assert kinds(path) == [("FUNCTION", "f"), ("INDEX", "t_id")]


def test_session_settings_between_entries_are_followed(tmp_path):
    space = "SET default_tablespace = fast;\n\n"
    path = write(tmp_path, TABLE.rstrip("\n") + "\n\n" + space, INDEX, COMMENT)
    table, index, comment = read_toc(path).entries
    assert table.state == () and table.state_after == ((b"default_tablespace", b"fast"),)
    assert index.state == comment.state == ((b"default_tablespace", b"fast"),)


def test_long_lists_of_statements_are_cut_between_statements(tmp_path, monkeypatch):
    monkeypatch.setattr(sql_toc, "CUT_SIZE", 100)
    writes = "".join(f"SELECT pg_catalog.lowrite(0, '\\x{'ab' * 40}');\n" for _ in range(10))
    blobs = entry(
        "BLOBS", "BLOBS", f"BEGIN;\n\nSELECT pg_catalog.lo_open('1', 131072);\n{writes}COMMIT;", "-", True
    )
    path = write(tmp_path, blobs)
    (found,) = read_toc(path).entries
    text = path.read_bytes()
    pieces = [text[a:b] for a, b in found.pieces()]
    assert len(pieces) > 3 and b"".join(pieces) == text[found.start : found.end]
    assert all(piece.endswith(b";\n") for piece in pieces[:-1])


@pytest.mark.parametrize(
    ("parts", "closing", "preamble", "why"),
    [
        ([entry("TABLE", "x; Type: INDEX; Schema: y", "CREATE TABLE x ();")], CLOSING, PREAMBLE, "ambiguous"),
        ([TABLE], "", PREAMBLE, "closing line was not found"),
        ([TABLE], CLOSING + "DROP TABLE t;\n", PREAMBLE, "text follows"),
        ([TABLE], CLOSING, PREAMBLE + "\\! touch /tmp/x\n", "backslash command"),
        (
            [TABLE],
            CLOSING,
            PREAMBLE + "SET standard_conforming_strings = off;\n",
            "standard_conforming_strings",
        ),
        ([entry("FUNCTION", "f", "SELECT $$ never closed;")], CLOSING, PREAMBLE, "does not end"),
        (
            [entry("TABLE DATA", "t", "COPY public.t (id) FROM stdin;\n1\n", data=True)],
            CLOSING,
            PREAMBLE,
            "terminator",
        ),
    ],
)
def test_what_cannot_be_read_with_certainty_is_refused(tmp_path, parts, closing, preamble, why):
    path = write(tmp_path, *parts, preamble=preamble, closing=closing)
    with pytest.raises(TocError, match=why):
        read_toc(path)


def test_an_entry_too_long_to_send_whole_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sql_toc, "ENTRY_LIMIT", 64)
    path = write(tmp_path, entry("VIEW", "v", "CREATE VIEW public.v AS SELECT " + "1, " * 40 + "1;"))
    with pytest.raises(TocError, match="in one piece"):
        read_toc(path)


def test_a_real_dump_is_read_with_a_small_window(tmp_path, monkeypatch):
    """The window trims behind the scan: a dump far longer than CHUNK + LOOKBEHIND reads the same."""
    rows = "".join(f"{n}\tnote {n}\n" for n in range(20000))
    parts = [
        TABLE,
        entry("TABLE DATA", "t", f"COPY public.t (id, note) FROM stdin;\n{rows}\\.", data=True),
        INDEX,
    ]
    path = write(tmp_path, *parts)
    whole = read_toc(path)
    monkeypatch.setattr(sql_toc, "CHUNK", 512)
    monkeypatch.setattr(sql_toc, "LOOKBEHIND", 256)
    assert read_toc(path) == whole
    data = whole.entries[1].copy
    assert data is not None and path.read_bytes()[data.start : data.end] == rows.encode()


def test_a_quoted_name_holding_the_copy_statements_end_is_read_whole(tmp_path):
    statement = 'COPY public.t ("a FROM stdin;\nb", "c""d") FROM stdin'
    path = write(tmp_path, entry("TABLE DATA", "t", f"{statement};\n1\t2\n\\.", data=True), INDEX)
    data, index = read_toc(path).entries
    assert data.copy is not None and data.copy.statement == statement.encode() and index.kind == "INDEX"


def test_a_block_comment_ends_where_it_ends_after_a_long_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(sql_toc, "CHUNK", 256)
    monkeypatch.setattr(sql_toc, "LOOKBEHIND", 64)
    rows = "".join(f"{n}\tx\n" for n in range(5000))
    table = entry("TABLE", "t", "/* a comment */ CREATE TABLE public.t (id int, note text);")
    data = entry("TABLE DATA", "t", f"COPY public.t (id, note) FROM stdin;\n{rows}\\.", data=True)
    comment = entry("COMMENT", "TABLE t", "COMMENT ON TABLE public.t IS 'not the end: */';")
    assert kinds(write(tmp_path, table, data, comment)) == [
        ("TABLE", "t"),
        ("TABLE DATA", "t"),
        ("COMMENT", "TABLE t"),
    ]


def test_a_run_of_backslashes_longer_than_the_window_is_refused(tmp_path):
    literal = "E'" + "\\" * (sql_toc.LOOKBEHIND + 1) + "'"
    path = write(tmp_path, entry("VIEW", "v", f"CREATE VIEW public.v AS SELECT {literal}{FAKE}';"), INDEX)
    with pytest.raises(TocError, match="backslashes"):
        read_toc(path)


def test_session_authorization_between_entries_is_left_to_psql(tmp_path):
    path = write(tmp_path, TABLE.rstrip("\n") + "\n\nSET SESSION AUTHORIZATION 'app';\n\n", INDEX)
    with pytest.raises(TocError, match="use-set-session-authorization"):
        read_toc(path)
