"""A dump is in its database's encoding (pg_dump's ``SET client_encoding`` line): table names are read
in it, whatever the chunking; SQL_ASCII's bytes are read as UTF-8, as the restore's connections read
them (issue 15)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vq_tasks.clients.sql_dump import SqlDumpInspector, dump_encoding, python_codec, table_name


def dump_in(encoding: str, name: bytes) -> bytes:
    return (
        b"--\n-- PostgreSQL database dump\n--\n\n"
        b"-- Dumped from database version 15.20\n-- Dumped by pg_dump version 15.20\n\n"
        b"SET statement_timeout = 0;\nSET client_encoding = '" + encoding.encode() + b"';\n"
        b"SET standard_conforming_strings = on;\n\n"
        b"--\n-- Data for Name: t; Type: TABLE DATA; Schema: public; Owner: postgres\n--\n\n"
        b'COPY public."' + name + b'" (v) FROM stdin;\nZo\xeb\n\xff\xfe\n\\.\n\n\n'
        b"--\n-- PostgreSQL database dump complete\n--\n\n"
    )


LATIN1_DUMP = dump_in("LATIN1", "Straße (ü)".encode("latin-1"))


def test_the_encoding_is_read_from_the_header():
    assert dump_encoding(LATIN1_DUMP) == "LATIN1"
    assert dump_encoding(b"--\n-- PostgreSQL database dump\n--\n") is None


@pytest.mark.parametrize(
    ("encoding", "codec"),
    [("UTF8", "utf-8"), ("LATIN1", "iso8859-1"), ("LATIN9", "iso8859-15"), ("WIN1252", "cp1252"),
     ("EUC_JP", "euc-jp"), ("SQL_ASCII", "utf-8"), ("MULE_INTERNAL", "utf-8"), (None, "utf-8")],
)  # fmt: skip
def test_python_codecs(encoding, codec):
    assert python_codec(encoding) == codec


@given(st.lists(st.integers(min_value=1, max_value=len(LATIN1_DUMP)), max_size=30))
def test_a_latin1_dump_names_its_tables_in_latin1_in_any_chunking(cuts):
    points = sorted(set(cuts))
    inspector = SqlDumpInspector()
    for a, b in zip([0, *points], [*points, len(LATIN1_DUMP)], strict=True):
        inspector.feed(LATIN1_DUMP[a:b])
    assert inspector.tables == {'public."Straße (ü)"': 2} and inspector.complete


def test_a_sql_ascii_dump_names_utf8_names_as_utf8():
    inspector = SqlDumpInspector()
    inspector.feed(dump_in("SQL_ASCII", "東京".encode()))
    assert inspector.tables == {'public."東京"': 2}


def test_table_name_decodes_with_the_codec():
    assert table_name('public."Zoë" (a, b)'.encode("latin-1"), "iso8859-1") == 'public."Zoë"'
    assert table_name('public."Zoë"'.encode()) == 'public."Zoë"'
