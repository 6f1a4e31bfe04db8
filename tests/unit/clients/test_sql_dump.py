"""Facts read from a plain dump in any chunking equal those of a line-by-line reading."""

from hypothesis import given
from hypothesis import strategies as st

from vq_tasks.clients.sql_dump import SqlDumpInspector

DUMP = b"""--
-- PostgreSQL database dump
--

-- Dumped from database version 15.20 (Debian 15.20-0+deb12u1)
-- Dumped by pg_dump version 15.20 (Debian 15.20-0+deb12u1)

CREATE TABLE public.queues (id integer, name text);
CREATE FUNCTION public.f() RETURNS void AS $$
BEGIN
  RAISE NOTICE 'COPY public.fake FROM stdin;';
END $$ LANGUAGE plpgsql;

--
-- Data for Name: queues; Type: TABLE DATA; Schema: public; Owner: postgres
--

COPY public.queues (id, name) FROM stdin;
1\tfront desk
2\tline with \\\\. and \\n escaped
3\t\\\\.
\\.


--
-- Data for Name: empty; Type: TABLE DATA; Schema: public; Owner: postgres
--

COPY public.empty (id) FROM stdin;
\\.


--
-- Data for Name: T\xc3\xa4ble; Type: TABLE DATA; Schema: Weird Schema; Owner: postgres
--

COPY "Weird Schema"."T\xc3\xa4ble" (id) FROM stdin;
1
2
\\.


--
-- PostgreSQL database dump complete
--

"""


def feed(chunks: list[bytes]) -> SqlDumpInspector:
    inspector = SqlDumpInspector()
    for chunk in chunks:
        inspector.feed(chunk)
    return inspector


def test_whole_dump_facts():
    inspector = feed([DUMP])
    assert inspector.tables == {"public.queues": 3, "public.empty": 0, '"Weird Schema"."T\u00e4ble"': 2}
    assert inspector.server_version == "15.20"
    assert inspector.pg_dump_version == "15.20"
    assert inspector.complete


@given(st.lists(st.integers(min_value=1, max_value=len(DUMP)), max_size=40))
def test_any_chunking_gives_the_same_facts(cuts):
    points = sorted(set(cuts))
    chunks = [DUMP[a:b] for a, b in zip([0, *points], [*points, len(DUMP)], strict=True)]
    inspector = feed([c for c in chunks if c])
    assert inspector.tables == feed([DUMP]).tables
    assert inspector.complete


def test_cut_dump_is_not_complete():
    assert not feed([DUMP[: DUMP.index(b"-- PostgreSQL database dump complete")]]).complete


def test_one_byte_at_a_time():
    assert feed([DUMP[i : i + 1] for i in range(len(DUMP))]).tables["public.queues"] == 3
