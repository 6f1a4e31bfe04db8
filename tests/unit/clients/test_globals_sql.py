"""globals.sql read as pg_dumpall writes it (tests/data/globals.sql, its statements of PostgreSQL 15
and 16): each role's attributes, settings, comments and memberships, whatever the pieces it comes
in. A tampered statement (dollar quotes, block comments, E'' strings, a keyword for a name, words
that are no attribute) is of no shape the reader knows: it is kept as its first words only, never
read as something about another role, and never shows a literal (a password hash)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vq_tasks.clients.globals_sql import STATEMENT_LIMIT, Comment, GlobalsReader, Membership, Setting
from vq_tasks.errors import PermanentError

DUMP = (Path(__file__).parents[2] / "data" / "globals.sql").read_bytes()
HEADER = b"SET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\n"


def read(data: bytes, piece: int = 7):
    reader = GlobalsReader()
    for start in range(0, len(data), piece):
        reader.feed(data[start : start + piece])
    return reader.close()


@pytest.mark.parametrize("piece", [1, 7, 300, 1 << 20])
def test_a_real_globals_sql_is_read_whatever_the_pieces(piece):
    found = read(DUMP, piece)
    assert list(found.roles) == ['Mixed "Case"', "grp"]
    mixed, grp = found.roles['Mixed "Case"'], found.roles["grp"]
    assert mixed.flags == ["INHERIT", "NOCREATEROLE", "NOCREATEDB", "LOGIN"]  # the NO defaults dropped
    assert mixed.password == "SCRAM-SHA-256$4096:f/TQ==$6o0=:Zm/W=" and not mixed.malformed
    assert mixed.settings == [Setting("app", ("custom.flag",), ("on",))]
    assert grp.flags == ["INHERIT", "NOCREATEROLE", "NOCREATEDB", "NOLOGIN"]
    assert (grp.connection_limit, grp.valid_until, grp.password) == (5, "2030-01-01 00:00:00+00", None)
    assert grp.settings == [Setting(None, ("search_path",), ("a", "b"))]
    assert grp.comments == [
        Comment(None, "multi\nline; it's -- not a comment"),
        Comment("dummy", "classified"),
    ]
    assert found.memberships == [
        Membership("grp", 'Mixed "Case"', ()),
        Membership("grp", 'Mixed "Case"', (("INHERIT", "TRUE"), ("SET", "FALSE"))),
    ]
    assert found.other == ["GRANT SET ON PARAMETER ..."]  # reported, not applied


def test_superuser_attributes_are_kept_for_the_restore_to_refuse():
    found = read(
        HEADER + b"CREATE ROLE boss;\nALTER ROLE boss WITH SUPERUSER INHERIT REPLICATION BYPASSRLS LOGIN;\n"
    )
    assert found.roles["boss"].reserved == ["SUPERUSER", "REPLICATION", "BYPASSRLS"]


@pytest.mark.parametrize(
    "statement",
    [
        b"COMMENT ON ROLE a IS $$'$$; ALTER ROLE victim CONNECTION LIMIT 42; --';",
        b"ALTER ROLE a SET search_path TO /*'*/ x; ALTER ROLE victim VALID UNTIL '2001-01-01'; --';",
        b"ALTER ROLE a SET search_path TO E'\\''; COMMENT ON ROLE victim IS 'pwned'; --';",
        b"ALTER ROLE ALL IN DATABASE app SET x.y TO '1';",
        b"GRANT a TO victim, postgres;",
        b"GRANT a TO b WITH ADMIN OPTION, postgres;",
        b"ALTER ROLE victim WITH SUPERUSER;",
        b"ALTER ROLE victim SET work_mem TO '1GB';",
        b"COMMENT ON ROLE victim IS 'pwned';",
        b"DROP ROLE victim;",
        b"CREATE ROLE x SUPERUSER;",
    ],
)
def test_a_tampered_statement_is_never_read_as_one_about_another_role(statement):
    found = read(HEADER + b"CREATE ROLE a;\nCREATE ROLE b;\n" + statement + b"\n")
    assert set(found.roles) == {"a", "b"}
    for role in found.roles.values():
        assert (role.flags, role.settings, role.comments, role.connection_limit) == ([], [], [], None)
    assert "victim" not in str(found.memberships) and "postgres" not in str(found.memberships)
    assert found.other and all("pwned" not in o and "2001" not in o for o in found.other)


def test_words_that_are_not_attributes_mark_the_role_and_never_show_a_password():
    found = read(
        HEADER
        + b"CREATE ROLE a;\nALTER ROLE a WITH LOGIN password 'SCRAM-SHA-256$4096:SECRET' IN ROLE postgres;\n"
    )
    assert found.roles["a"].malformed and found.roles["a"].password is None
    assert "SECRET" not in str(found)


def test_a_statement_far_longer_than_pg_dumpall_writes_is_refused():
    with pytest.raises(PermanentError, match="longer than"):
        read(HEADER + b"COMMENT ON ROLE a IS '" + b"x" * (STATEMENT_LIMIT + 10), piece=1 << 16)
