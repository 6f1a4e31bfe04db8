"""Facts read from a plain pg_dump stream as it passes: versions, rows per table, completeness.

Rows are counted in the dump itself (COPY text format writes exactly one line per row and escapes
newlines inside values), so the counts match the data restored from this dump exactly, with no
second query and no second read. A COPY statement counts only right after pg_dump's own
``Type: TABLE DATA`` comment, so text that merely looks like one (in a function body, a comment
or a default) is never taken for table data. Work per chunk is a few ``bytes.find``/``count``
calls and one literal ``re`` search, all in C.

pg_dump writes the dump in the database's own encoding (its ``SET client_encoding`` line says which):
table names are read in it, so that a LATIN1 database's ``Straße`` is named as PostgreSQL names it.
"""

from __future__ import annotations

import re

TABLE_DATA = b"; Type: TABLE DATA; "
TOC_TO_COPY = b"--\n\nCOPY "
COPY_STATEMENT_END = b" FROM stdin;\n"
COPY_END = b"\n\\.\n"
OPENING_LINES = b"--\n-- PostgreSQL database dump\n--\n"
CLOSING_LINE = b"-- PostgreSQL database dump complete"
HEADER_LIMIT = 8192  # pg_dump's header (with its \restrict line) is far shorter
TAIL_LIMIT = 512
STATEMENT_LIMIT = 4 << 20  # a COPY statement with 1600 long column names is far shorter
DUMPED_FROM = re.compile(rb"^-- Dumped from database version (\S+)", re.M)
DUMPED_BY = re.compile(rb"^-- Dumped by pg_dump version (\S+)", re.M)
DUMP_KEY = re.compile(rb"^\\restrict ([A-Za-z0-9]+)$", re.M)  # pg_dump's own psql key, in its header
_COPY_END = re.compile(re.escape(COPY_END))  # re's literal search runs faster than bytes.find here
CLIENT_ENCODING = re.compile(rb"^SET client_encoding = '([A-Za-z0-9_]+)';$", re.M)
# PostgreSQL's name of an encoding (pg_encoding_to_char) -> Python's codec; MULE_INTERNAL and EUC_TW
# have none. SQL_ASCII is absent on purpose: see python_codec.
PYTHON_CODECS = {
    "UTF8": "utf-8",
    **{f"LATIN{n}": f"iso8859-{part}" for n, part in enumerate((1, 2, 3, 4, 9, 10, 13, 14, 15, 16), 1)},
    **{f"ISO_8859_{n}": f"iso8859-{n}" for n in (5, 6, 7, 8)},
    **{f"WIN{n}": f"cp{n}" for n in (866, 874, 1250, 1251, 1252, 1253, 1254, 1255, 1256, 1257, 1258)},
    "KOI8R": "koi8-r",
    "KOI8U": "koi8-u",
    "EUC_JP": "euc-jp",
    "EUC_JIS_2004": "euc-jis-2004",
    "EUC_CN": "gb2312",
    "EUC_KR": "euc-kr",
    "SJIS": "cp932",
    "SHIFT_JIS_2004": "shift-jis-2004",
    "BIG5": "cp950",
    "GBK": "gbk",
    "GB18030": "gb18030",
    "UHC": "cp949",
    "JOHAB": "johab",
}


class SqlDumpInspector:
    """Feed chunks of a plain SQL dump in order with ``feed``; read the facts after the last."""

    def __init__(self) -> None:
        self.tables: dict[str, int] = {}
        self._header = bytearray()
        self._tail = b""
        self._pending = b""
        self._state = "outside"  # outside -> statement (after a TABLE DATA comment) -> rows
        self._table = ""
        self._codec: str | None = None  # the dump's, known from its header before the first COPY

    def feed(self, chunk: bytes) -> None:
        if len(self._header) < HEADER_LIMIT:
            self._header += chunk[: HEADER_LIMIT - len(self._header)]
        self._tail = (self._tail + chunk[-TAIL_LIMIT:])[-TAIL_LIMIT:]
        data = self._pending + chunk
        position = 0
        step = {"outside": self._find_table_data, "statement": self._read_statement, "rows": self._count_rows}
        while True:
            position, done = step[self._state](data, position)
            if done:
                return

    def _keep(self, data: bytes, keep_from: int) -> tuple[int, bool]:
        self._pending = data[keep_from:]
        return 0, True

    def _find_table_data(self, data: bytes, position: int) -> tuple[int, bool]:
        found = data.find(TABLE_DATA, position)
        if found < 0:
            return self._keep(data, max(position, len(data) - len(TABLE_DATA) + 1))
        self._state = "statement"
        return found + len(TABLE_DATA), False

    def _read_statement(self, data: bytes, position: int) -> tuple[int, bool]:
        """After the TABLE DATA comment line, pg_dump writes "--", an empty line, then COPY."""
        line_end = data.find(b"\n", position)
        opening = line_end + 1 + len(TOC_TO_COPY)
        if line_end >= 0 and len(data) >= opening and data[line_end + 1 : opening] != TOC_TO_COPY:
            self._state = "outside"  # not pg_dump's own structure: text that merely looks like it
            return position, False
        end = data.find(COPY_STATEMENT_END, opening) if line_end >= 0 else -1
        if end < 0 and len(data) - position <= STATEMENT_LIMIT:
            return self._keep(data, position)
        if end < 0 or data[line_end + 1 : opening] != TOC_TO_COPY:
            self._state = "outside"  # not pg_dump's own structure: text that merely looks like it
            return position, False
        if self._codec is None:
            self._codec = python_codec(dump_encoding(bytes(self._header)))
        self._table = table_name(data[opening:end], self._codec)
        self.tables.setdefault(self._table, 0)
        self._state = "rows"
        return end + len(COPY_STATEMENT_END) - 1, False  # on the newline: an empty table ends there

    def _count_rows(self, data: bytes, position: int) -> tuple[int, bool]:
        found = _COPY_END.search(data, position)
        end = found.start() if found else -1
        if end < 0:
            keep_from = max(position, len(data) - len(COPY_END) + 1)
            self.tables[self._table] += data.count(b"\n", position, keep_from)
            return self._keep(data, keep_from)
        self.tables[self._table] += data.count(b"\n", position, end)
        self._state = "outside"
        return end + len(COPY_END) - 1, False

    @property
    def server_version(self) -> str:
        match = DUMPED_FROM.search(self._header)
        return match.group(1).decode() if match else "unknown"

    @property
    def pg_dump_version(self) -> str:
        match = DUMPED_BY.search(self._header)
        return match.group(1).decode() if match else "unknown"

    @property
    def complete(self) -> bool:
        """Whether pg_dump's closing line is present at the end of what was fed."""
        return CLOSING_LINE in self._tail


def dump_encoding(header: bytes) -> str | None:
    """Given the start of a plain dump, return the encoding pg_dump wrote it in (PostgreSQL's name,
    from its ``SET client_encoding`` line: the database's own), or None if it has no such line."""
    found = CLIENT_ENCODING.search(header)
    return found.group(1).decode("ascii").upper() if found else None


def python_codec(encoding: str | None) -> str:
    """Given a PostgreSQL encoding's name, return the Python codec that reads its text. SQL_ASCII
    declares no encoding (its bytes are whatever clients wrote): read as UTF-8, as the restore's
    connections (client_encoding UTF8) receive them; so is an unknown or missing encoding."""
    return PYTHON_CODECS.get((encoding or "").upper(), "utf-8")


def table_name(statement: bytes, codec: str = "utf-8") -> str:
    """Given what stands between ``COPY`` and ``FROM stdin;`` and the dump's codec (python_codec),
    return the table's name: all up to the column list's opening parenthesis outside double quotes
    (names may hold any character; a double quote is one byte in every server encoding)."""
    quoted = False
    for index, byte in enumerate(statement):
        if byte == 0x22:  # a doubled quote inside a name toggles twice: no harm
            quoted = not quoted
        elif byte == 0x28 and not quoted:
            statement = statement[:index]
            break
    return statement.strip().decode(codec, "replace")
