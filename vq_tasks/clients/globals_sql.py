"""globals.sql as ``pg_dumpall --roles-only`` writes it, read into what it says about each role.

Why a reader of our own: a restore creates the roles the server lacks from it, must never touch
another role, and the file may have been tampered with. So none of its text ever reaches a server:
each statement must match, in full, a shape pg_dumpall writes, and is read into values (names,
keywords, literals) from which the restore composes statements of its own (psycopg.sql). A
statement of another shape is kept only as its first words, for a warning.

Statements end at semicolons outside '...' literals and "..." names (pg_dumpall writes with
standard_conforming_strings on); ``--`` comments and psql's backslash lines are skipped. The text
is read as it comes, in pieces: the file's encoding comes from its ``SET client_encoding`` line,
and a statement longer than STATEMENT_LIMIT is refused, so that a tampered file cannot grow memory.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field

from vq_tasks.clients.sql_dump import HEADER_LIMIT, TAIL_LIMIT, dump_encoding, python_codec
from vq_tasks.errors import PermanentError

STATEMENT_LIMIT = 1 << 20
CLOSING_LINE = b"-- PostgreSQL database cluster dump complete"
SHOWN_WORDS = 4  # of a statement of another shape, in a warning (never a literal: no password)
_BARE = r"[a-z_][a-z0-9_$]*"  # pg_dumpall quotes every other name
IDENT = rf'(?:"(?:[^"]|"")+"|{_BARE})'
LITERAL = r"'(?:[^']|'')*'"
_PARAMETER = rf"{IDENT}(?:\.{IDENT})*"
FLAGS = ("SUPERUSER", "CREATEDB", "CREATEROLE", "INHERIT", "LOGIN", "REPLICATION", "BYPASSRLS")
SUPERUSER_ONLY = ("REPLICATION", "BYPASSRLS")  # only a superuser may give these (SUPERUSER: never given)
_FLAG = re.compile(rf"(NO)?({'|'.join(FLAGS)})")
_VALUED = re.compile(rf"(CONNECTION LIMIT) (-?\d+)|(VALID UNTIL|PASSWORD) ({LITERAL})")
_CREATE = re.compile(rf"CREATE ROLE ({IDENT})")
_ATTRIBUTES = re.compile(rf"ALTER ROLE ({IDENT}) WITH (.+)", re.S)
_SETTING = re.compile(
    rf"ALTER ROLE ({IDENT})(?: IN DATABASE ({IDENT}))? SET ({_PARAMETER}) TO ({LITERAL}(?:, {LITERAL})*)",
    re.S,
)
_COMMENT = re.compile(rf"COMMENT ON ROLE ({IDENT}) IS ({LITERAL})", re.S)
_LABEL = re.compile(rf"SECURITY LABEL FOR ({IDENT}) ON ROLE ({IDENT}) IS ({LITERAL})", re.S)
_OPTION = r"(?:ADMIN|INHERIT|SET) (?:OPTION|TRUE|FALSE)"
_MEMBERSHIP = re.compile(
    rf"GRANT ({IDENT}) TO ({IDENT})((?: WITH {_OPTION}(?:, {_OPTION})*)?)(?: GRANTED BY {IDENT})?"
)
_OPTIONS = re.compile(r"(ADMIN|INHERIT|SET) (OPTION|TRUE|FALSE)")


@dataclass(frozen=True)
class Setting:
    """``ALTER ROLE role [IN DATABASE database] SET parameter TO values``; parameter's dotted parts."""

    database: str | None
    parameter: tuple[str, ...]
    values: tuple[str, ...]


@dataclass(frozen=True)
class Comment:
    """``COMMENT ON ROLE`` (provider None) or ``SECURITY LABEL FOR provider ON ROLE``."""

    provider: str | None
    text: str


@dataclass
class RoleDefinition:
    """A role globals.sql creates: its attributes as pg_dumpall writes them (``flags``: LOGIN,
    NOINHERIT, ...), its settings and comments. ``malformed``: its ALTER ROLE ... WITH held
    words that are not pg_dumpall's attributes (the restore then does not create it)."""

    name: str
    flags: list[str] = field(default_factory=list)
    password: str | None = None
    valid_until: str | None = None
    connection_limit: int | None = None
    malformed: bool = False
    settings: list[Setting] = field(default_factory=list)
    comments: list[Comment] = field(default_factory=list)

    @property
    def reserved(self) -> list[str]:
        """The attributes only a superuser may give (SUPERUSER, which a restore never gives, included)."""
        return [f for f in self.flags if f in ("SUPERUSER", *SUPERUSER_ONLY)]


@dataclass(frozen=True)
class Membership:
    """``GRANT granted TO member [WITH option value, ...]`` (GRANTED BY dropped: the restorer grants)."""

    granted: str
    member: str
    options: tuple[tuple[str, str], ...]


@dataclass
class Globals:
    """What globals.sql says: the roles it creates (by name, in its order), the memberships, and the
    first words of each statement of another shape (not applied)."""

    roles: dict[str, RoleDefinition] = field(default_factory=dict)
    memberships: list[Membership] = field(default_factory=list)
    other: list[str] = field(default_factory=list)


def unquote(name: str) -> str:
    """Return a name as PostgreSQL stores it: a quoted name unquoted, a bare one as it is."""
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def unliteral(literal: str) -> str:
    return literal[1:-1].replace("''", "'")


class GlobalsReader:
    """Read globals.sql as it comes (``feed`` its bytes, then ``close``) into a Globals; ``complete``
    says whether pg_dumpall's closing line ended it."""

    def __init__(self) -> None:
        self.globals = Globals()
        self._header = bytearray()
        self._decoder: codecs.IncrementalDecoder | None = None
        self._splitter = _Splitter()
        self._tail = b""

    @property
    def complete(self) -> bool:
        return CLOSING_LINE in self._tail

    def feed(self, data: bytes) -> None:
        self._tail = (self._tail + data[-TAIL_LIMIT:])[-TAIL_LIMIT:]
        if self._decoder is None:
            self._header += data
            if len(self._header) < HEADER_LIMIT:
                return
            data = self._start()
        self._read(self._decoder.decode(data) if self._decoder else "")

    def close(self) -> Globals:
        data = self._start() if self._decoder is None else b""
        assert self._decoder is not None
        self._read(self._decoder.decode(data, final=True))
        for statement in self._splitter.close():
            self._take(statement)
        return self.globals

    def _start(self) -> bytes:
        codec = python_codec(dump_encoding(bytes(self._header)))
        self._decoder = codecs.getincrementaldecoder(codec)("replace")
        data, self._header = bytes(self._header), bytearray()
        return data

    def _read(self, text: str) -> None:
        for statement in self._splitter.feed(text):
            self._take(statement)

    def _take(self, statement: str) -> None:
        """Read one statement into the Globals; one of another shape is noted by its first words."""
        if statement.startswith("SET ") and "\n" not in statement:
            return  # the session's settings (client_encoding, ...): not about a role
        if not _read_statement(self.globals, statement):
            self.globals.other.append(" ".join(statement.split()[:SHOWN_WORDS]) + " ...")


def _read_statement(found: Globals, statement: str) -> bool:
    """Read ``statement`` into ``found`` if it is of a shape pg_dumpall writes for roles about a
    role created before it; return whether it was."""
    if match := _CREATE.fullmatch(statement):
        name = unquote(match.group(1))
        found.roles.setdefault(name, RoleDefinition(name))
        return True
    if match := _MEMBERSHIP.fullmatch(statement):
        granted, member, options = match.groups()
        pairs = tuple((o, v) for o, v in _OPTIONS.findall(options))
        found.memberships.append(Membership(unquote(granted), unquote(member), pairs))
        return True
    for pattern in (_ATTRIBUTES, _SETTING, _COMMENT, _LABEL):
        if match := pattern.fullmatch(statement):
            name = unquote(match.group(2 if pattern is _LABEL else 1))
            role = found.roles.get(name)
            if role is None:
                return False  # about a role the file does not create: never applied
            _describe(role, pattern, match)
            return True
    return False


def _describe(role: RoleDefinition, pattern: re.Pattern[str], match: re.Match[str]) -> None:
    if pattern is _ATTRIBUTES:
        _read_attributes(role, match.group(2))
    elif pattern is _SETTING:
        database = unquote(match.group(2)) if match.group(2) else None
        parameter = tuple(unquote(p) for p in re.findall(IDENT, match.group(3)))
        values = tuple(unliteral(v) for v in re.findall(LITERAL, match.group(4)))
        role.settings.append(Setting(database, parameter, values))
    elif pattern is _COMMENT:
        role.comments.append(Comment(None, unliteral(match.group(2))))
    else:
        role.comments.append(Comment(unquote(match.group(1)), unliteral(match.group(3))))


def _read_attributes(role: RoleDefinition, text: str) -> None:
    """Read pg_dumpall's attributes (``NOSUPERUSER INHERIT ... PASSWORD '...'``), each word one of
    its own; anything else marks the role malformed. The NO forms of SUPERUSER, REPLICATION and
    BYPASSRLS are the defaults and are dropped: PostgreSQL lets only a superuser name them."""
    for word in _attribute_words(text):
        if word is None:
            role.malformed = True
        elif flag := _FLAG.fullmatch(word):
            no, name = flag.groups()
            if not (no and name in ("SUPERUSER", *SUPERUSER_ONLY)):
                role.flags.append(f"{no or ''}{name}")
        elif valued := _VALUED.fullmatch(word):
            limit_word, limit, name, literal = valued.groups()
            if limit_word:
                role.connection_limit = int(limit)
            elif name == "PASSWORD":
                role.password = unliteral(literal)
            else:
                role.valid_until = unliteral(literal)


def _attribute_words(text: str) -> list[str | None]:
    """Split attributes at single spaces outside literals; None for a piece that is no attribute."""
    words: list[str | None] = []
    position = 0
    while position < len(text):
        match = _FLAG.match(text, position) or _VALUED.match(text, position)
        end = match.end() if match else -1
        if match is None or (end < len(text) and text[end] != " "):
            return [*words, None]
        words.append(match.group(0))
        position = end + 1
    return words


class _Splitter:
    """Split text, fed in pieces, into statements: at ``;`` outside quotes, comments skipped."""

    def __init__(self) -> None:
        self._current: list[str] = []
        self._size = 0
        self._quote: str | None = None
        self._skipping = False  # inside a -- comment or a backslash line, up to its line end
        self._line_start = True
        self._dash = False  # the previous character was a "-" outside quotes

    def feed(self, text: str) -> list[str]:
        done: list[str] = []
        for char in text:
            self._step(char, done)
        return done

    def close(self) -> list[str]:
        rest = "".join(self._current).strip()
        return [rest] if rest else []

    def _step(self, char: str, done: list[str]) -> None:
        line_start, self._line_start = self._line_start, char == "\n"
        if self._skipping:
            self._skipping = char != "\n"
            self._line_start = char == "\n"
            return
        if self._quote is None and line_start and char == "\\" and not "".join(self._current).strip():
            self._skipping = True
            return
        if self._quote is None and char == "-" and self._dash:
            self._current.pop()  # the first "-" was the comment's
            self._dash, self._skipping = False, True
            self._add("\n")
            return
        self._dash = self._quote is None and char == "-"
        if self._quote is not None:
            self._quote = None if char == self._quote else self._quote  # a doubled quote reopens
        elif char in "'\"":
            self._quote = char
        elif char == ";":
            done.append("".join(self._current).strip())
            self._current, self._size = [], 0
            return
        self._add(char)

    def _add(self, char: str) -> None:
        self._current.append(char)
        self._size += 1
        if self._size > STATEMENT_LIMIT:
            raise PermanentError(
                f"globals.sql has a statement longer than {STATEMENT_LIMIT} characters: it is not "
                "pg_dumpall's output"
            )
