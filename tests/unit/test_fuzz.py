"""Fuzzing, bounded (a few hundred examples each, well under 30 s in all): the manifest reader, the
tar archive reader and member checker, and the SQL and RDB header checks, on arbitrary input.
Each property says what must hold whatever the input: a clean refusal, never another exception,
and never a file outside the restore root."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.unit.verify.test_verify import BACKUP_ID, make_backup
from vq_tasks.catalog.listing import load_manifest
from vq_tasks.catalog.trust import check_manifest
from vq_tasks.clients.rdb import RdbCheck
from vq_tasks.clients.sql_dump import CLOSING_LINE as PG_DUMP_CLOSING
from vq_tasks.clients.sql_dump import OPENING_LINES as PG_DUMP_HEADER
from vq_tasks.errors import BackupError, PermanentError
from vq_tasks.manifest import Manifest, manifest_name
from vq_tasks.restore.contents import rdb_problem, sql_dump_problem
from vq_tasks.restore.files import read_members, refusals, restore_files
from vq_tasks.restore.redis_server import rdb_file_version
from vq_tasks.storage.local import LocalStorage
from vq_tasks.verify.scan import scan_archive

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
PREFIX = "virtualqueue_backup"


# ---------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def valid_manifest(tmp_path_factory) -> dict:
    backup = make_backup(tmp_path_factory.mktemp("fuzz"))
    return json.loads(backup.manifest.model_dump_json())


def leaf_paths(node, path=()) -> list[tuple]:
    if isinstance(node, dict):
        return [path] + [p for key, value in node.items() for p in leaf_paths(value, (*path, key))]
    if isinstance(node, list):
        return [path] + [p for i, value in enumerate(node) for p in leaf_paths(value, (*path, i))]
    return [path]


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["../../etc/passwd", "/etc/shadow", "x\x00y", ".hidden", "0" * 32, "f" * 64, "-1"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(data=st.binary(max_size=3000))
def test_arbitrary_bytes_are_a_validation_error_or_a_manifest(data):
    with contextlib.suppress(ValidationError):
        Manifest.model_validate_json(data)


class MemoryStorage(LocalStorage):
    """A LocalStorage whose manifest holds what the test puts there."""

    def __init__(self, document: bytes):
        self.document = document

    def describe(self) -> str:
        return "memory"

    def read_bytes(self, name: str, limit: int = 16 << 20) -> bytes:
        return self.document

    def stat(self, name: str) -> None:
        return None  # the manifest is read as is; there is nothing else (no .sig)


@FUZZ
@given(data=st.data())
def test_a_manifest_with_any_value_anywhere_is_refused_cleanly_or_names_only_plain_files(
    valid_manifest, data
):
    document = json.loads(json.dumps(valid_manifest))
    path = data.draw(st.sampled_from(leaf_paths(document)))
    value = data.draw(JSON)
    if path:
        here = document
        for key in path[:-1]:
            here = here[key]
        here[path[-1]] = value
    else:
        document = value
    try:
        manifest = load_manifest(MemoryStorage(json.dumps(document).encode()), BACKUP_ID)
    except PermanentError as exc:
        assert f"{manifest_name(BACKUP_ID)} in memory is not a valid manifest" in str(exc)
        return
    for name in [f.name for f in manifest.files] + [
        n for e in manifest.components.values() for n in (e.member, e.stored_in)
    ]:
        assert name and "/" not in name and "\0" not in name and not name.startswith(".")
    assert all(f.size >= 0 and len(f.md5) == 32 and len(f.sha256) == 64 for f in manifest.files)
    try:
        check_manifest(manifest, BACKUP_ID, PREFIX)
    except PermanentError as exc:
        assert "is not trusted" in str(exc)


@FEW
@given(cut=st.integers(min_value=0, max_value=4000), junk=st.binary(max_size=20))
def test_a_truncated_or_spliced_manifest_is_refused_cleanly(valid_manifest, cut, junk):
    text = json.dumps(valid_manifest).encode()
    try:
        load_manifest(MemoryStorage(text[:cut] + junk + text[cut + len(junk) :]), BACKUP_ID)
    except PermanentError as exc:
        assert "is not a valid manifest" in str(exc)


# ---------------------------------------------------------------- tar archives

PARTS = st.sampled_from(["etc", "vq", "a", "b", "..", ".", "", "sentinel", "passwd"])
NAMES = st.one_of(
    st.lists(PARTS, min_size=1, max_size=4).map(lambda parts: "etc/vq/" + "/".join(parts)),
    st.lists(PARTS, min_size=1, max_size=5).map("/".join),
    st.lists(PARTS, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)),
)
LINKS = st.one_of(
    st.lists(PARTS, min_size=1, max_size=5).map("/".join),
    st.sampled_from(["/etc/shadow", "../../../sentinel", "../../../sentinel/passwd", "."]),
)
TYPES = st.sampled_from(
    [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE]
)
MEMBERS = st.lists(st.tuples(NAMES, TYPES, LINKS), min_size=1, max_size=6)


def build_tar(members: list[tuple[str, bytes, str]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, 0o644
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = link
            data = b"fuzz" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def tree(folder: Path) -> dict[str, tuple[int, str]]:
    """Every path under ``folder`` (links not followed): its mode and, for a file, its content."""
    found = {}
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(here) / name
            st_ = path.lstat()
            content = path.read_text() if path.is_file() and not path.is_symlink() else ""
            found[str(path)] = (st_.st_mode, content)
    return found


@FEW
@given(members=MEMBERS, link_on_disk=st.booleans())
def test_an_allowed_archive_never_puts_anything_outside_its_root(members, link_on_disk):
    with tempfile.TemporaryDirectory() as sandbox:
        box = Path(sandbox)
        (box / "sentinel").mkdir()
        (box / "sentinel" / "passwd").write_text("root:x:0:0\n")
        target = box / "target"
        if link_on_disk:  # a link already on disk, pointing out of the root
            (target / "etc" / "vq").mkdir(parents=True)
            (target / "etc" / "vq" / "a").symlink_to(box / "sentinel")
        archive = box / "fuzz.tar"
        archive.write_bytes(build_tar(members))
        before = tree(box)
        try:
            restore_files(archive, ["/etc/vq"], target)
        except PermanentError as exc:
            assert "nothing was written" in str(exc)
            after = tree(box)
            assert after == before  # refused: nothing written at all
            return
        root = os.path.realpath(target / "etc" / "vq")
        after = tree(box)
        for path in set(after) - set(before) - {str(target), str(target / "etc")}:  # folders up to the root
            real = os.path.realpath(path)
            assert real == root or real.startswith(root + "/"), (path, real, members)
        changed = {p for p in before if after.get(p) != before[p]}
        inside = str(target / "etc" / "vq")
        assert all(p == inside or p.startswith(inside + "/") for p in changed), changed
        assert after[str(box / "sentinel" / "passwd")] == before[str(box / "sentinel" / "passwd")]


@FUZZ
@given(members=MEMBERS)
def test_the_member_checker_never_raises(members):
    infos = []
    for name, kind, link in members:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        infos.append(info)
    assert isinstance(refusals(infos, ["/etc/vq"]), list)


@pytest.fixture(scope="module")
def small_tar() -> bytes:
    return build_tar([("etc/vq/a", tarfile.REGTYPE, ""), ("etc/vq/l", tarfile.SYMTYPE, "a")])


@FUZZ
@given(data=st.binary(max_size=4000), gzip_magic=st.booleans())
def test_the_archive_reader_refuses_any_bytes_cleanly(data, gzip_magic):
    with tempfile.NamedTemporaryFile(suffix=".tar") as file:
        file.write((b"\x1f\x8b" if gzip_magic else b"") + data)
        file.flush()
        try:
            read_members(Path(file.name))
        except PermanentError as exc:
            assert "cannot be read as a tar archive" in str(exc)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0, max_value=3071), st.integers(1, 255)), max_size=8))
def test_a_damaged_archive_is_read_or_refused_cleanly(small_tar, flips):
    damaged = bytearray(small_tar)
    for position, mask in flips:
        damaged[position % len(damaged)] ^= mask
    with tempfile.NamedTemporaryFile(suffix=".tar") as file:
        file.write(bytes(damaged))
        file.flush()
        try:
            members = read_members(Path(file.name))
        except PermanentError:
            return
        assert isinstance(refusals(members, ["/etc/vq"]), list)
    scan = scan_archive(io.BytesIO(bytes(damaged)), "none")  # verify's reader: never raises
    assert scan.stored.size == len(damaged)


# ---------------------------------------------------------------- SQL dumps and RDBs


@FUZZ
@given(head=st.binary(max_size=200), version=st.none() | st.integers(0, 20))
def test_the_rdb_header_check_on_any_bytes(head, version):
    problem = rdb_problem(head, version)
    is_rdb = head[:5] == b"REDIS" and len(head) >= 9 and all(48 <= b <= 57 for b in head[5:9])
    if problem is None:
        assert is_rdb and (version is None or int(head[5:9]) == version)
    elif is_rdb:
        assert version is not None and "the manifest" in problem


@FUZZ
@given(data=st.binary(max_size=200), chunks=st.integers(1, 7), rdb_like=st.booleans())
def test_rdb_readers_on_any_bytes_raise_only_clean_errors(data, chunks, rdb_like):
    data = (b"REDIS0011" if rdb_like else b"") + data
    check = RdbCheck("fuzz")
    size = max(1, len(data) // chunks)
    try:
        for i in range(0, len(data), size):
            check.feed(data[i : i + size])
        check.finish()
    except BackupError:
        pass
    with tempfile.NamedTemporaryFile() as file:
        file.write(data)
        file.flush()
        try:
            assert rdb_file_version(Path(file.name)) == int(data[5:9])
        except PermanentError as exc:
            assert "is not an RDB file" in str(exc)


@FUZZ
@given(head=st.binary(max_size=300), tail=st.binary(max_size=100), dump_like=st.booleans())
def test_the_sql_dump_check_on_any_bytes(head, tail, dump_like):
    if dump_like:
        head = (
            PG_DUMP_HEADER
            + b"\n-- Dumped from database version 16.4\n-- Dumped by pg_dump version 16.4\n"
            + head
        )
        tail = tail + PG_DUMP_CLOSING + tail
    problem = sql_dump_problem(head, tail)
    if problem is None:
        assert head.startswith(PG_DUMP_HEADER) and PG_DUMP_CLOSING in tail
