"""The table of contents of a plain pg_dump: where each object's SQL starts and ends, in one pass.

pg_dump writes a comment block before every object it dumps ("-- Name: t; Type: TABLE; Schema:
public; Owner: app", "-- Data for Name: t; Type: TABLE DATA; ..."): the table of contents pg_restore
reads from a custom archive. read_toc finds these blocks only where SQL itself could start a
comment, at the start of a line outside string literals, quoted identifiers, dollar quotes, block
comments and COPY data, so that text shaped like a header inside a function body or a comment is
never taken for one, and each entry it returns is whole SQL. COPY data is skipped by a search for its
terminator (in C); the SQL around it is lexed token by token.

What it cannot read with certainty is a TocError, never a guess: a header whose markers repeat (an
object named "x; Type: INDEX"), standard_conforming_strings off, a backslash command other than
pg_dump's \\restrict/\\unrestrict, an entry over ENTRY_LIMIT that cannot be cut, no closing line. The
restore then loads the dump with one psql session (restore/postgres_parallel.py).

Memory is bounded: the file is read in CHUNK pieces and only a window around the scan is kept.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from vq_tasks.clients.sql_dump import CLOSING_LINE, COPY_END, COPY_STATEMENT_END, DUMP_KEY, STATEMENT_LIMIT

CHUNK = 1 << 20
LOOKBEHIND = 4096  # kept before the scan: the SET lines ending an entry, the byte before a token
HEADER_PEEK = 4096  # a header block is far shorter
PREAMBLE_LIMIT = 1 << 16
ENTRY_LIMIT = 64 << 20  # the most SQL sent to PostgreSQL in one query
CUT_SIZE = 1 << 20  # long entries of CUT_KINDS are sent in pieces of about this size
CUT_KINDS = frozenset({"BLOBS", "TABLE DATA"})  # lists of simple statements: safe to cut at ";\n"
STATE_SETTINGS = (b"default_tablespace", b"default_table_access_method")

_AUTHORIZATION = re.compile(rb"^(?:RE)?SET SESSION AUTHORIZATION", re.M)
_COMMENT_MARK = re.compile(rb"/\*|\*/")
_SPECIAL = re.compile(rb"['\"$]|--|/\*")
_SPECIAL_OR_END = re.compile(rb"['\"$]|--|/\*|;\n")
_DOLLAR_TAG = re.compile(rb"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_IDENTIFIER_BYTES = frozenset(
    b"_$0123456789" + bytes(range(65, 91)) + bytes(range(97, 123)) + bytes(range(128, 256))
)
_NAME_LINE = re.compile(rb"-- (Data for )?Name: (.*); Type: (.*); Schema: (.*); Owner: (.*)")
_SKIPPED_LINES = (b"-- TOC entry ", b"-- Dependencies: ")  # pg_dump --verbose
_CLOSING_BLOCK = b"--\n" + CLOSING_LINE + b"\n--\n"
_STATE_TAIL = re.compile(rb"(?:^SET (?:" + b"|".join(STATE_SETTINGS) + rb") = [^\n;]*;\n+)+\Z", re.M)
_STATE_LINE = re.compile(rb"^SET (" + b"|".join(STATE_SETTINGS) + rb") = ([^\n;]*);$", re.M)
_COPY_OPENING = b"COPY "
_TRAILER = re.compile(rb"\s*(?:\\unrestrict [A-Za-z0-9]+\s*)?\Z")


class TocError(Exception):
    """The dump cannot be split by its TOC with certainty; the message says why."""


@dataclass(frozen=True)
class CopyData:
    """A TABLE DATA entry's COPY: its statement, and where its rows start and end in the file."""

    statement: bytes  # "COPY public.t (a, b) FROM stdin"
    start: int
    end: int  # the offset of the terminator line "\\."


@dataclass(frozen=True)
class TocEntry:
    """One object of the dump: its header's fields and the byte range of its SQL in the file."""

    kind: str  # the header's Type: "TABLE", "TABLE DATA", "INDEX", "FK CONSTRAINT", ...
    name: str
    schema: str
    header: int  # the offset of its header block (line_number tells its line)
    start: int
    end: int
    state: tuple[tuple[bytes, bytes], ...]  # (setting, value) in effect where it starts
    state_after: tuple[tuple[bytes, bytes], ...]  # ... and after its SQL (its last lines may SET them)
    copy: CopyData | None = None
    cuts: tuple[int, ...] = ()  # offsets in (start, end) where its SQL may be sent in pieces

    @property
    def size(self) -> int:
        return self.end - self.start

    def pieces(self) -> list[tuple[int, int]]:
        """The byte ranges to send one after another: cut where it may be, else whole."""
        bounds = [self.start, *self.cuts, self.end]
        return list(itertools.pairwise(bounds))


@dataclass
class DumpToc:
    """The preamble every connection runs first (pg_dump's SET lines) and the entries in dump order."""

    preamble: bytes
    entries: list[TocEntry] = field(default_factory=list)


def read_toc(path: Path) -> DumpToc:
    """Given a plain dump by pg_dump, return its TOC. Raise TocError if it cannot be read with
    certainty, OSError if the file cannot be read."""
    with open(path, "rb") as stream:
        return _TocReader(stream).read()


def line_number(path: Path, offset: int) -> int:
    """The line (from 1) of a file that holds byte ``offset``: counted only when an error names it."""
    lines = 1
    with open(path, "rb") as stream:
        while offset > 0 and (chunk := stream.read(min(CHUNK, offset))):
            lines += chunk.count(b"\n")
            offset -= len(chunk)
    return lines


def parse_name_line(line: bytes) -> tuple[str, str, str] | None:
    """Given a header's name line (without its newline), return (type, name, schema), None if it is
    not one. Raise TocError when its markers repeat: which part is the name cannot be told."""
    if not (line.startswith(b"-- Name: ") or line.startswith(b"-- Data for Name: ")):
        return None
    if any(line.count(marker) != 1 for marker in (b"; Type: ", b"; Schema: ", b"; Owner: ")):
        raise TocError(
            f"ambiguous TOC header {line[:200]!r}: a name holds '; Type:', '; Schema:' or '; Owner:'"
        )
    found = _NAME_LINE.fullmatch(line)
    if found is None:
        raise TocError(f"unexpected TOC header {line[:200]!r}")
    name, kind, schema = (found.group(n).decode("utf-8", "replace") for n in (2, 3, 4))
    return kind, name, schema


class _Window:
    """The file from ``base`` on, read in CHUNKs on demand and trimmed behind the scan; counts lines."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.data = b""
        self.base = 0
        self.eof = False

    @property
    def end(self) -> int:
        return self.base + len(self.data)

    def fill(self, upto: int) -> bool:
        """Read until the window holds offset ``upto - 1``; return whether it does."""
        while self.end < upto and not self.eof:
            chunk = self.stream.read(CHUNK)
            self.eof = not chunk
            self.data += chunk
        return self.end >= upto

    def byte(self, at: int) -> int | None:
        return self.data[at - self.base] if self.fill(at + 1) and at >= self.base else None

    def slice(self, start: int, end: int) -> bytes:
        self.fill(end)
        return self.data[max(start, self.base) - self.base : end - self.base]

    def find(self, needle: bytes, start: int) -> int:
        """The offset of ``needle`` at or after ``start``, -1 at the end of the file; trims as it goes."""
        pattern = _literal(needle)
        while True:
            found = pattern.search(self.data, start - self.base)
            if found is not None:
                return self.base + found.start()
            if self.eof:
                return -1
            start = max(start, self.end - len(needle) + 1)
            self.trim(start)
            self.fill(self.end + CHUNK)

    def search(self, pattern: re.Pattern[bytes], start: int) -> re.Match[bytes] | None:
        """The first match at or after ``start`` (match offsets are relative to ``base``)."""
        while True:
            found = pattern.search(self.data, start - self.base)
            if found is not None or self.eof:
                return found
            start = max(start, self.end - 1)  # tokens are at most two bytes long
            self.trim(start)
            self.fill(self.end + CHUNK)

    def trim(self, keep_from: int) -> None:
        cut = keep_from - LOOKBEHIND - self.base
        if cut >= CHUNK:
            self.data = self.data[cut:]
            self.base += cut


@dataclass
class _Open:
    kind: str
    name: str
    schema: str
    header: int
    start: int
    state: tuple[tuple[bytes, bytes], ...]
    copy: CopyData | None = None
    cuts: list[int] = field(default_factory=list)
    last_cut: int = 0


class _TocReader:
    def __init__(self, stream: BinaryIO) -> None:
        self.window = _Window(stream)
        self.toc = DumpToc(preamble=b"")
        self.open: _Open | None = None
        self.state: dict[bytes, bytes] = {}
        self.closed = False

    def read(self) -> DumpToc:
        position = 0
        while not self.closed:
            cutting = self.open is not None and self.open.kind in CUT_KINDS and self.open.copy is None
            pattern = _SPECIAL_OR_END if cutting and position - self._last_cut() >= CUT_SIZE else _SPECIAL
            found = self.window.search(pattern, position)
            if found is None:
                raise TocError("pg_dump's closing line was not found outside quotes and comments")
            at = self.window.base + found.start()
            token = found.group()
            if token == b"--":
                position = self._comment(at)
            elif token == b"/*":
                position = self._block_comment(at)
            elif token == b"'":
                position = self._string(at)
            elif token == b'"':
                position = self._quoted(at)
            elif token == b"$":
                position = self._dollar(at)
            else:  # ";\n" ending a statement of a long entry
                position = at + 2
                assert self.open is not None
                self.open.cuts.append(position)
                self.open.last_cut = position
            self.window.trim(position)
        return self.toc

    def _last_cut(self) -> int:
        assert self.open is not None
        return self.open.last_cut or self.open.start

    def _comment(self, at: int) -> int:
        """A line comment: a header block, pg_dump's closing block, or a comment to the line's end."""
        if at == 0 or self.window.byte(at - 1) == 0x0A:
            block = self.window.slice(at, at + HEADER_PEEK)
            if block.startswith(_CLOSING_BLOCK):
                self._close(at, at + len(_CLOSING_BLOCK))
                return at
            header = _header(block)
            if header is not None:
                return self._begin(at, *header)
        end = self.window.find(b"\n", at)
        if end < 0:
            raise TocError("the dump ends in a comment, without pg_dump's closing line")
        return end + 1

    def _block_comment(self, at: int) -> int:
        depth, position = 1, at + 2  # PostgreSQL's block comments nest
        while depth:
            found = self.window.search(_COMMENT_MARK, position)
            if found is None:
                raise TocError(f"a block comment opened at byte {at} does not end")
            depth += 1 if found.group() == b"/*" else -1
            position = self.window.base + found.end()
        return position

    def _string(self, at: int) -> int:
        before = self.window.byte(at - 1) if at else None
        escapes = before in (0x45, 0x65) and (at < 2 or self.window.byte(at - 2) not in _IDENTIFIER_BYTES)
        position = at + 1
        while True:
            end = self.window.find(b"'", position)
            if end < 0:
                raise TocError(f"a string opened at byte {at} does not end")
            if escapes and _escaped(self.window.slice(max(position, end - LOOKBEHIND), end), end - position):
                position = end + 1
            elif self.window.byte(end + 1) == 0x27:  # a doubled quote
                position = end + 2
            else:
                return end + 1

    def _quoted(self, at: int) -> int:
        position = at + 1
        while True:
            end = self.window.find(b'"', position)
            if end < 0:
                raise TocError(f"a quoted name opened at byte {at} does not end")
            if self.window.byte(end + 1) != 0x22:
                return end + 1
            position = end + 2

    def _dollar(self, at: int) -> int:
        if at and self.window.byte(at - 1) in _IDENTIFIER_BYTES:
            return at + 1  # part of a name (a$b) or a parameter ($1)
        self.window.fill(at + 128)
        tag = _DOLLAR_TAG.match(self.window.data, at - self.window.base)
        if tag is None:
            return at + 1
        end = self.window.find(tag.group(), at + len(tag.group()))
        if end < 0:
            raise TocError(f"a dollar quote opened at byte {at} does not end")
        return end + len(tag.group())

    def _begin(self, at: int, kind: str, name: str, schema: str, length: int) -> int:
        """Close what came before the header block at ``at``; open its entry; return where to go on."""
        self._finish(at)
        start = at + length
        self.open = _Open(kind, name, schema, at, start, tuple(sorted(self.state.items())))
        if kind == "TABLE DATA" and self.window.slice(start, start + len(_COPY_OPENING)) == _COPY_OPENING:
            return self._copy(start)
        return start

    def _copy(self, start: int) -> int:
        statement_end, statement = start, b'"'
        while statement.count(b'"') % 2:  # the end found is inside a quoted name: look further
            statement_end = self.window.find(COPY_STATEMENT_END, statement_end + 1)
            if statement_end < 0 or statement_end - start > STATEMENT_LIMIT or start < self.window.base:
                raise TocError(f"the COPY statement at byte {start} does not end")
            statement = self.window.slice(start, statement_end + len(COPY_STATEMENT_END) - 2)  # no ";\n"
        rows = statement_end + len(COPY_STATEMENT_END)
        terminator = self.window.find(COPY_END, rows - 1)
        if terminator < 0:
            raise TocError(f"the COPY data at byte {rows} has no terminator line")
        assert self.open is not None
        self.open.copy = CopyData(statement, rows, terminator + 1)
        return terminator + len(COPY_END)

    def _finish(self, end: int) -> None:
        """End the open entry (or the preamble) at ``end``; take the session settings it leaves."""
        if self.open is None:
            self._preamble(end)
            return
        entry, tail = self.open, self.window.slice(max(self.open.start, end - LOOKBEHIND), end)
        if _AUTHORIZATION.search(tail):
            raise TocError(
                "it sets the session's authorization between entries (--use-set-session-authorization)"
            )
        state_tail = _STATE_TAIL.search(tail)
        if state_tail:
            self.state.update((m.group(1), m.group(2)) for m in _STATE_LINE.finditer(state_tail.group()))
        cuts = tuple(entry.cuts)
        longest = max(b - a for a, b in itertools.pairwise((entry.start, *cuts, end)))
        if entry.copy is None and longest > ENTRY_LIMIT:
            what = f"{entry.kind} {entry.name} (at byte {entry.header})"
            raise TocError(f"{what} has {longest >> 20} MiB of SQL in one piece")
        self.toc.entries.append(
            TocEntry(
                entry.kind,
                entry.name,
                entry.schema,
                entry.header,
                entry.start,
                end,
                entry.state,
                tuple(sorted(self.state.items())),
                entry.copy,
                cuts,
            )
        )
        self.open = None

    def _preamble(self, end: int) -> None:
        if end > PREAMBLE_LIMIT:
            raise TocError(f"the dump's first TOC entry starts at byte {end}: not pg_dump's preamble")
        text = DUMP_KEY.sub(b"", self.window.slice(0, end))
        if re.search(rb"^\\", text, re.M):
            raise TocError("its preamble holds a backslash command other than pg_dump's \\restrict")
        if re.search(rb"^SET standard_conforming_strings = off;", text, re.M):
            raise TocError("it was written with standard_conforming_strings off")
        self.toc.preamble = text

    def _close(self, at: int, after: int) -> None:
        self._finish(at)
        rest = self.window.slice(after, after + PREAMBLE_LIMIT)
        if not self.window.fill(after + PREAMBLE_LIMIT + 1) and _TRAILER.match(rest):
            self.closed = True
            return
        raise TocError("text follows pg_dump's closing line")


@functools.lru_cache(maxsize=8)
def _literal(needle: bytes) -> re.Pattern[bytes]:
    return re.compile(re.escape(needle))  # re's literal search runs faster than bytes.find here


def _header(block: bytes) -> tuple[str, str, str, int] | None:
    """Given the text from a line-starting "--", return (type, name, schema, length of the header
    block) if it starts with pg_dump's header block ("--", the name line, "--", an empty line)."""
    if not block.startswith(b"--\n"):
        return None
    position = 3
    while True:
        line_end = block.find(b"\n", position)
        if line_end < 0:
            return None
        line = block[position:line_end]
        if not line.startswith(_SKIPPED_LINES):
            break
        position = line_end + 1
    parsed = parse_name_line(line)
    if parsed is None or block[line_end + 1 : line_end + 5] != b"--\n\n":
        return None
    return (*parsed, line_end + 5)


def _escaped(before: bytes, since_opening: int) -> bool:
    """Whether a quote preceded by ``before`` is escaped: an odd run of backslashes before it. A run
    longer than ``before`` (and shorter than the string) cannot be counted: TocError."""
    run = len(before) - len(before.rstrip(b"\\"))
    if run == len(before) < since_opening:
        raise TocError("a string holds a run of backslashes too long to read")
    return run % 2 == 1
