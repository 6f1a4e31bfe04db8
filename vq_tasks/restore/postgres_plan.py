"""The order a parallel restore may load a plain dump's TOC entries in, as pg_restore -j would.

What: from the entries in dump order (clients/sql_toc.py), the pre-data (everything before the first
data entry: loaded in order, in one transaction) and then steps, each with what must be done before
it and the tables it locks:

- TABLE DATA, SEQUENCE SET and large-object data (BLOBS): in parallel, biggest first;
- INDEX, CONSTRAINT (primary key, unique, exclusion, check): in parallel, each once its table's data
  is loaded; a constraint alone on its table (ALTER TABLE locks it exclusively), indexes together;
- FK CONSTRAINT: in parallel once every step before it is done (the unique indexes they need, the
  partitions' attached indexes), never two on a common table at once: two foreign keys between the
  same tables taking their locks in opposite orders would deadlock;
- every other entry (INDEX ATTACH, TRIGGER, ACL, COMMENT, MATERIALIZED VIEW DATA, ...) in the dump's
  order, once every step before it is done: all it could need exists, as under psql -f;
- a COMMENT or SECURITY LABEL right after an index or constraint goes with it (pg_dump writes an
  object's comment right after it).

Why this cannot change the result: what runs out of the dump's order is table data into tables
without indexes, triggers or foreign keys yet (as under psql -f), and index and constraint builds,
which depend only on their table's rows; everything else keeps the dump's order. An entry whose table
cannot be read from its SQL is simply run in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vq_tasks.clients.sql_toc import TocEntry

DATA_KINDS = frozenset({"TABLE DATA", "SEQUENCE SET", "BLOBS"})
# A CHECK CONSTRAINT entry (NOT VALID, no scan) runs in order: pg_dump adds it without ONLY, to the
# inheritance children too, whose data must be in first.
TABLE_KINDS = frozenset({"INDEX", "CONSTRAINT"})
FOREIGN_KEY = "FK CONSTRAINT"
FOLLOWERS = frozenset({"COMMENT", "SECURITY LABEL"})
HEAD_LIMIT = 1 << 16  # enough of an entry's SQL to read the tables it names
ORDERED = 1 << 62  # an ordered step's weight: everything after it waits for it

_NAME = rb'(?:"(?:[^"]|"")*"|[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)'
_QUALIFIED = rb"(" + _NAME + rb"\." + _NAME + rb")"
_COPY_TABLE = re.compile(rb"COPY " + _QUALIFIED + rb"[ (]")
_INDEX_TABLE = re.compile(rb"CREATE (?:UNIQUE )?INDEX " + _NAME + rb" ON (?:ONLY )?" + _QUALIFIED + rb" ")
_ALTER_TABLE = re.compile(rb"ALTER TABLE (?:ONLY )?" + _QUALIFIED + rb"\n    ADD CONSTRAINT " + _NAME + rb" ")
_ALTER_ONLY = re.compile(rb"ALTER TABLE ONLY " + _QUALIFIED + rb"\n    ADD CONSTRAINT " + _NAME + rb" ")
_COLUMNS = rb"\((?:" + _NAME + rb"(?:, " + _NAME + rb")*)\)"
_REFERENCES = re.compile(rb"FOREIGN KEY " + _COLUMNS + rb" REFERENCES " + _QUALIFIED + rb"\(")
_ATTACH = re.compile(rb"ALTER TABLE ONLY " + _QUALIFIED + rb" ATTACH PARTITION " + _QUALIFIED + rb" ")


@dataclass
class Step:
    """Entries run together on one connection, after the steps before ``barrier`` and ``after``."""

    entries: list[TocEntry]
    barrier: int  # every step with a smaller index is done first
    after: set[int] = field(default_factory=set)
    exclusive: frozenset[bytes] = frozenset()  # tables no other running step may touch
    shared: frozenset[bytes] = frozenset()  # tables no other running step may hold exclusively
    weight: int = 0  # of ready steps, the heaviest goes first

    @property
    def kind(self) -> str:
        return self.entries[0].kind

    @property
    def is_data(self) -> bool:
        return self.kind in DATA_KINDS


@dataclass
class LoadPlan:
    pre_data: list[TocEntry]
    steps: list[Step]


def plan_load(entries: list[TocEntry], path: Path) -> LoadPlan:
    """Given a dump's TOC entries and the dump (to read the tables an entry names), return the plan."""
    first = next((n for n, e in enumerate(entries) if e.kind in DATA_KINDS | TABLE_KINDS), len(entries))
    planner = _Planner(path, entries[:first])
    for entry in entries[first:]:
        planner.add(entry)
    return LoadPlan(entries[:first], planner.steps)


class _Planner:
    def __init__(self, path: Path, pre_data: list[TocEntry]) -> None:
        self.path = path
        self.steps: list[Step] = []
        self.data_step: dict[bytes, int] = {}  # table -> its TABLE DATA step
        self.data_size: dict[bytes, int] = {}
        self.partitions: dict[bytes, set[bytes]] = {}
        self.barrier = 0  # steps before this index are done before any new step
        self.foreign_keys_from: int | None = None  # where the current run of foreign keys began
        for entry in pre_data:
            if entry.kind == "TABLE ATTACH" and (found := _ATTACH.match(self._head(entry))):
                self.partitions.setdefault(found.group(1), set()).add(found.group(2))

    def add(self, entry: TocEntry) -> None:
        previous = self.steps[-1] if self.steps else None
        if entry.kind in FOLLOWERS and previous and previous.kind in TABLE_KINDS | {FOREIGN_KEY}:
            previous.entries.append(entry)
            return
        if entry.kind != FOREIGN_KEY:
            self.foreign_keys_from = None
        step = self._step(entry)
        if step is None:  # in the dump's order, after everything before it
            step = Step([entry], barrier=len(self.steps), weight=ORDERED)
            self.barrier = len(self.steps) + 1
        self.steps.append(step)

    def _step(self, entry: TocEntry) -> Step | None:
        if entry.kind == "TABLE DATA" and entry.copy and (found := _COPY_TABLE.match(entry.copy.statement)):
            self.data_step[found.group(1)] = len(self.steps)
            self.data_size[found.group(1)] = entry.size
        if entry.kind in DATA_KINDS:
            return Step([entry], barrier=self.barrier, weight=entry.size)
        head = self._head(entry) if entry.kind in TABLE_KINDS | {FOREIGN_KEY} else b""
        if entry.kind in TABLE_KINDS:
            found = (_INDEX_TABLE if entry.kind == "INDEX" else _ALTER_ONLY).match(head)
            return self._table_step(entry, found.group(1), head) if found else None
        if entry.kind == FOREIGN_KEY:
            table, referenced = _ALTER_TABLE.match(head), _REFERENCES.search(head)
            return (
                self._foreign_key_step(entry, table.group(1), referenced.group(1))
                if table and referenced
                else None
            )
        return None

    def _table_step(self, entry: TocEntry, table: bytes, head: bytes) -> Step:
        after = {self.data_step[table]} if table in self.data_step else set()
        weight = self.data_size.get(table, 0) + 1
        if entry.kind == "INDEX" and b"\nALTER " not in head:  # not CLUSTER ON, REPLICA IDENTITY
            return Step([entry], barrier=self.barrier, after=after, shared=frozenset({table}), weight=weight)
        return Step([entry], barrier=self.barrier, after=after, exclusive=frozenset({table}), weight=weight)

    def _foreign_key_step(self, entry: TocEntry, table: bytes, referenced: bytes) -> Step:
        if self.foreign_keys_from is None:
            self.foreign_keys_from = len(self.steps)
        tables = self._with_partitions(table) | self._with_partitions(referenced)
        weight = self.data_size.get(table, 0) + self.data_size.get(referenced, 0) + 1
        return Step([entry], barrier=self.foreign_keys_from, exclusive=frozenset(tables), weight=weight)

    def _with_partitions(self, table: bytes) -> set[bytes]:
        found, pending = set(), [table]
        while pending:
            name = pending.pop()
            if name not in found:
                found.add(name)
                pending.extend(self.partitions.get(name, ()))
        return found

    def _head(self, entry: TocEntry) -> bytes:
        with open(self.path, "rb") as dump:
            dump.seek(entry.start)
            return dump.read(min(entry.size, HEAD_LIMIT))
