"""Facts read from a plain pg_dump stream as it passes: versions, rows per table, completeness.

Rows are counted in the dump itself (COPY text format writes exactly one line per row and escapes
newlines inside values), so the counts match the data restored from this dump exactly, with no
second query and no second read. A COPY statement counts only right after pg_dump's own
``Type: TABLE DATA`` comment, so text that merely looks like one (in a function body, a comment
or a default) is never taken for table data. Work per chunk is a few ``bytes.find``/``count``
calls and one literal ``re`` search, all in C.
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
_COPY_END = re.compile(re.escape(COPY_END))  # re's literal search runs faster than bytes.find here


class SqlDumpInspector:
    """Feed chunks of a plain SQL dump in order with ``feed``; read the facts after the last."""

    def __init__(self) -> None:
        self.tables: dict[str, int] = {}
        self._header = bytearray()
        self._tail = b""
        self._pending = b""
        self._state = "outside"  # outside -> statement (after a TABLE DATA comment) -> rows
        self._table = ""

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
        self._table = table_name(data[opening:end])
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


def table_name(statement: bytes) -> str:
    """Given what stands between ``COPY`` and ``FROM stdin;``, return the table's name: all up to
    the column list's opening parenthesis outside double quotes (names may hold any character)."""
    quoted = False
    for index, byte in enumerate(statement):
        if byte == 0x22:  # a doubled quote inside a name toggles twice: no harm
            quoted = not quoted
        elif byte == 0x28 and not quoted:
            statement = statement[:index]
            break
    return statement.strip().decode("utf-8", "replace")
