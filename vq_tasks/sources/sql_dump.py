"""Facts read from a plain pg_dump stream as it passes: versions, rows per table, completeness.

Rows are counted in the dump itself (COPY text format writes exactly one line per row and escapes
newlines inside values), so the counts match the data restored from this dump exactly, with no
second query and no second read. Work per chunk is a few ``bytes.find``/``count`` calls in C.
"""

from __future__ import annotations

import re

COPY_START = b"\nCOPY "
COPY_END = b"\n\\.\n"
CLOSING_LINE = b"-- PostgreSQL database dump complete"
HEADER_LIMIT = 8192
TAIL_LIMIT = 512
_DUMPED_FROM = re.compile(rb"^-- Dumped from database version (\S+)", re.M)
_DUMPED_BY = re.compile(rb"^-- Dumped by pg_dump version (\S+)", re.M)
_COPY_TABLE = re.compile(rb"^COPY (.+?) (?:\(.*\) )?FROM stdin;$")


class SqlDumpInspector:
    """Feed chunks of a plain SQL dump in order with ``feed``; read the facts after the last."""

    def __init__(self) -> None:
        self.tables: dict[str, int] = {}
        self._header = bytearray()
        self._tail = b""
        self._pending = b"\n"  # bytes not yet decided on; starts as if after a newline
        self._table: str | None = None

    def feed(self, chunk: bytes) -> None:
        if len(self._header) < HEADER_LIMIT:
            self._header += chunk[: HEADER_LIMIT - len(self._header)]
        self._tail = (self._tail + chunk)[-TAIL_LIMIT:]
        data = self._pending + chunk
        position = 0
        while True:
            if self._table is None:
                position, done = self._find_copy_start(data, position)
            else:
                position, done = self._count_rows(data, position)
            if done:
                return

    def _find_copy_start(self, data: bytes, position: int) -> tuple[int, bool]:
        start = data.find(COPY_START, position)
        line_end = data.find(b"\n", start + 1) if start >= 0 else -1
        if line_end < 0:
            keep_from = start if start >= 0 else max(position, len(data) - len(COPY_START) + 1)
            self._pending = data[keep_from:]
            return position, True
        line = data[start + 1 : line_end]
        match = _COPY_TABLE.match(line)
        if match:
            self._table = match.group(1).decode("utf-8", "replace")
            self.tables.setdefault(self._table, 0)
        return line_end, False  # stay on the newline: an empty table's end marker starts there

    def _count_rows(self, data: bytes, position: int) -> tuple[int, bool]:
        end = data.find(COPY_END, position)
        assert self._table is not None
        if end < 0:
            keep_from = max(position, len(data) - len(COPY_END) + 1)
            self.tables[self._table] += data.count(b"\n", position, keep_from)
            self._pending = data[keep_from:]
            return position, True
        self.tables[self._table] += data.count(b"\n", position, end)
        self._table = None
        return end + len(COPY_END) - 1, False

    @property
    def server_version(self) -> str:
        match = _DUMPED_FROM.search(self._header)
        return match.group(1).decode() if match else "unknown"

    @property
    def pg_dump_version(self) -> str:
        match = _DUMPED_BY.search(self._header)
        return match.group(1).decode() if match else "unknown"

    @property
    def complete(self) -> bool:
        """Whether pg_dump's closing line is present at the end of what was fed."""
        return CLOSING_LINE in self._tail
