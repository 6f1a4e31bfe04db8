"""Hostile input is refused with a clear message, and nothing is written outside the target: backup
ids and names with ``..`` or absolute parts, forged manifests, tar entries that escape, SQL dumps
and RDBs that are not what the manifest says. Every tar case also proves that a refused archive
writes nothing at all, and that a sentinel folder beside the target is untouched."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from tests.unit.restore.test_restore_run import with_targets
from tests.unit.verify.test_verify import (
    BACKUP_ID,
    Backup,
    make_backup,
    sql_dump,
    stage,
    store,
    write_manifest,
)
from vq_tasks.catalog.listing import load_manifest
from vq_tasks.catalog.trust import check_manifest
from vq_tasks.cli.main import main
from vq_tasks.clients.rdb import CRC64
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import (
    FilesFacts,
    Manifest,
    RedisFacts,
    manifest_name,
    parse_backup_id,
    split_object_name,
)
from vq_tasks.restore import apply, run
from vq_tasks.restore.contents import rdb_problem, sql_dump_problem
from vq_tasks.restore.files import changed_files, restore_files
from vq_tasks.restore.run import restore_backup
from vq_tasks.settings import Settings
from vq_tasks.sources.files import archive_config
from vq_tasks.storage.base import StorageError

OTHER_ID = "virtualqueue_backup_20240114_020000"
ROOT = "/etc/vq"


def targets(backup: Backup, tmp_path: Path) -> Settings:
    return with_targets(backup, tmp_path).model_copy(update={"backup_audit_log": tmp_path / "audit.jsonl"})


@pytest.fixture
def backup(tmp_path) -> Backup:
    return make_backup(tmp_path)


# ---------------------------------------------------------------- backup ids and object names

BAD_IDS = [
    "../virtualqueue_backup_20240115_020000",
    "/etc/passwd",
    "virtualqueue_backup_20240115_020000/../../x",
    "virtualqueue_backup_20240115_020000\x00",
    "virtualqueue_backup_20240115_020000\n",
    "virtualqueue_backup_20240115_020000.tar.gz",
    "virtualqueue_backup_\u0662\u0660\u0662\u0664\u0660\u0661\u0661\u0665_020000",  # Arabic-Indic digits
    "",
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_that_are_not_backup_ids_are_refused_before_any_storage_access(backup, tmp_path, bad):
    opened: list[str] = []
    real = backup.storage.open_read
    backup.storage.open_read = lambda name: opened.append(name) or real(name)  # type: ignore[method-assign]
    with pytest.raises(PermanentError, match="is not a backup id of the form virtualqueue_backup_YYYYMMDD"):
        restore_backup(targets(backup, tmp_path), backup.storage, bad, ["config"], force=True)
    assert opened == []
    assert not (tmp_path / "restored-config").exists()


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        ({"backup_id": BACKUP_ID, "components": [{"database": 1}]}, "components must be a list of names"),
        ({"backup_id": BACKUP_ID, "components": 5}, "components must be a list of names"),
        ({"backup_id": ["latest"], "components": None}, "backup_id must be a backup id or 'latest'"),
        ({"backup_id": BACKUP_ID, "components": None, "force": "false"}, "force true or false"),
    ],
)
def test_task_arguments_of_the_wrong_type_are_refused(backup, tmp_path, arguments, said):
    """A task's kwargs are JSON: "force": "false" is a string, and must not mean yes."""
    arguments = {"force": False, **arguments}
    with pytest.raises(PermanentError, match=said):
        restore_backup(targets(backup, tmp_path), backup.storage, **arguments)
    assert not (tmp_path / "restored-config").exists()


def test_unicode_digits_are_not_an_id():
    with pytest.raises(ValueError, match="not a backup id"):
        parse_backup_id(
            "virtualqueue_backup_\u0662\u0660\u0662\u0664\u0660\u0661\u0661\u0665_020000",
            "virtualqueue_backup",
        )


@pytest.mark.parametrize(
    "name",
    [
        "../virtualqueue_backup_20240115_020000.tar.gz",
        "virtualqueue_backup_20240115_020000/../x.tar.gz",
        "/virtualqueue_backup_20240115_020000_manifest.json",
        "virtualqueue_backup_20240115_020000\x00.tar.gz",
    ],
)
def test_listed_names_with_paths_are_not_taken_for_backups(name):
    assert split_object_name(name, "virtualqueue_backup") is None


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "virtualqueue_backup_20240115_020000/.."])
def test_the_cli_refuses_bad_ids_for_restore_and_extract(backup, tmp_path, monkeypatch, capsys, bad):
    monkeypatch.setenv("BACKUP_STORAGE_PATH", str(backup.storage.root))
    monkeypatch.setenv("BACKUP_STAGING_DIR", str(backup.settings.backup_staging_dir))
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
    assert main(["restore", bad]) == 1
    assert "not a backup id" in capsys.readouterr().err
    assert main(["extract", bad, "database", "-o", str(tmp_path / "out.sql")]) == 1
    assert "not a backup id" in capsys.readouterr().err
    assert not (tmp_path / "out.sql").exists()


# ---------------------------------------------------------------- manifests


def raw_manifest(backup: Backup) -> dict:
    return json.loads(backup.manifest.model_dump_json())


def write_raw(backup: Backup, document: dict | bytes) -> None:
    data = document if isinstance(document, bytes) else json.dumps(document).encode()
    with backup.storage.open_write(manifest_name(BACKUP_ID)) as out:
        out.write(data)


def _set(path: str, value):
    """Return an edit of a manifest document: set the item at a dotted path (list indexes as digits)."""

    def edit(doc: dict) -> dict:
        *parents, last = path.split(".")
        here = doc
        for part in parents:
            here = here[int(part)] if part.isdigit() else here[part]
        here[int(last) if last.isdigit() else last] = value
        return doc

    return edit


MALFORMED = {
    "a path as a stored file's name": (_set("files.0.name", "../../etc/passwd"), "files.0.name"),
    "an absolute stored_in": (_set("components.database.stored_in", "/etc/passwd"), "stored_in"),
    "a member with a folder": (_set("components.database.member", "../database.sql"), "member"),
    "a NUL in a name": (_set("files.1.name", "x\x00y"), "files.1.name"),
    "a negative size": (_set("files.0.size", -1), "files.0.size"),
    "a negative member size": (_set("components.redis.content.size", -5), "size -5 is negative"),
    "an md5 of 31 digits": (_set("files.0.md5", "0" * 31), "files.0.md5"),
    "an uppercase sha256": (_set("files.0.sha256", "A" * 64), "files.0.sha256"),
    "a bogus member sha256": (_set("components.config.content.sha256", "zz"), "64 lowercase hex digits"),
    "an unknown component": (_set("components.passwd", {"member": "x"}), "components.passwd"),
    "a path as the backup id": (_set("backup_id", "../" + BACKUP_ID), "backup_id"),
    "a string for the files list": (_set("files", "everything"), "files"),
    "a negative row count": (_set("components.database.facts.tables", {"public.t": -1}), "tables"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifests_are_refused_naming_the_field(backup, tmp_path, case):
    edit, named = MALFORMED[case]
    write_raw(backup, edit(raw_manifest(backup)))
    with pytest.raises(PermanentError, match="is not a valid manifest") as caught:
        load_manifest(backup.storage, BACKUP_ID)
    assert named in str(caught.value)
    with pytest.raises(PermanentError, match="is not a valid manifest"):
        restore_backup(targets(backup, tmp_path), backup.storage, BACKUP_ID, ["config"])
    assert not (tmp_path / "restored-config").exists()


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"[]", b"null", b'{"backup_id": 1}', b"[" * 10_000])
def test_manifests_that_are_not_json_objects_are_refused(backup, data):
    write_raw(backup, data)
    with pytest.raises(PermanentError, match=f"{manifest_name(BACKUP_ID)} in .* is not a valid manifest"):
        load_manifest(backup.storage, BACKUP_ID)


def test_an_oversized_manifest_is_refused_without_reading_it_whole(backup):
    with backup.storage.open_write(manifest_name(BACKUP_ID)) as out:
        for _ in range(17):
            out.write(b" " * (1 << 20))
    with pytest.raises(StorageError, match=f"{manifest_name(BACKUP_ID)} in .* is larger than 16777216 bytes"):
        load_manifest(backup.storage, BACKUP_ID)


def forge(backup: Backup, edit) -> Manifest:
    manifest = edit(backup.manifest.model_copy(deep=True))
    write_manifest(backup.storage, manifest)
    return manifest


def other_backups_bundle(backup: Backup) -> str:
    name = f"{OTHER_ID}.tar.gz"
    (backup.storage.root / name).write_bytes(backup.bundle.read_bytes())  # same bytes: checksums match
    return name


def _stored_elsewhere(backup: Backup):
    other = other_backups_bundle(backup)

    def edit(m: Manifest) -> Manifest:
        m.files[0].name = other
        for component in ("database", "redis", "config"):
            m.components[component].stored_in = other
        return m

    return edit


FORGED = {
    "another backup's bundle": (_stored_elsewhere, f"stored file '{OTHER_ID}.tar.gz' is not a data file"),
    "another backup's id": (
        lambda b: lambda m: m.model_copy(update={"backup_id": OTHER_ID}),
        f"it names backup '{OTHER_ID}', not {BACKUP_ID}",
    ),
    "a wrong member name": (
        lambda b: lambda m: (setattr(m.components["database"], "member", "redis.rdb"), m)[1],
        "database's member is 'redis.rdb', not database.sql",
    ),
    "the manifest as a stored file": (
        lambda b: lambda m: (setattr(m.files[0], "name", manifest_name(BACKUP_ID)), m)[1],
        "is not a data file of",
    ),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_manifests_naming_other_files_are_refused_before_reading_them(
    backup, tmp_path, monkeypatch, capsys, case
):
    make_edit, said = FORGED[case]
    edit = make_edit(backup)
    if case == "another backup's id":  # written under this backup's name, naming the other
        with backup.storage.open_write(manifest_name(BACKUP_ID)) as out:
            out.write(edit(backup.manifest).model_dump_json().encode())
    else:
        forge(backup, edit)
    opened: list[str] = []
    real = backup.storage.open_read
    monkeypatch.setattr(backup.storage, "open_read", lambda name: opened.append(name) or real(name))
    with pytest.raises(PermanentError, match="is not trusted, nothing was read or written") as caught:
        restore_backup(targets(backup, tmp_path), backup.storage, BACKUP_ID, ["database"])
    assert said in str(caught.value)
    assert opened == [manifest_name(BACKUP_ID)]  # the manifest only (no .sig here), never what it names
    monkeypatch.setenv("BACKUP_STORAGE_PATH", str(backup.storage.root))
    monkeypatch.setenv("BACKUP_STAGING_DIR", str(backup.settings.backup_staging_dir))
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
    out = tmp_path / "out.sql"
    assert main(["extract", BACKUP_ID, "database", "-o", str(out)]) == 1
    assert "is not trusted" in capsys.readouterr().err
    assert not out.exists()


def test_check_manifest_passes_a_real_manifest(backup):
    assert check_manifest(backup.manifest, BACKUP_ID, "virtualqueue_backup") is backup.manifest


# ---------------------------------------------------------------- SQL dumps and RDBs


def test_a_sql_file_that_is_not_a_pg_dump_is_refused_before_psql(tmp_path, monkeypatch):
    """It passes verify (its closing line is there, no tables): the header check refuses it."""
    evil = b"\\! touch /tmp/vq-owned\nDROP TABLE tickets;\n--\n-- PostgreSQL database dump complete\n--\n"
    backup = make_backup(tmp_path, database=evil)
    assert backup.verify().ok
    called = []
    monkeypatch.setattr(apply, "plan_database_restore", lambda *a, **k: called.append(a))
    with pytest.raises(PermanentError, match=r"database\.sql is not a plain dump by pg_dump") as caught:
        restore_backup(targets(backup, tmp_path), backup.storage, BACKUP_ID, ["database"])
    assert "does not start with pg_dump's header" in str(caught.value) and "psql was not run" in str(
        caught.value
    )
    assert called == []


def test_a_dump_of_other_versions_than_the_manifest_says_is_refused(tmp_path):
    backup = make_backup(tmp_path, database=sql_dump(10))
    manifest = backup.manifest.model_copy(deep=True)
    manifest.components["database"].facts.pg_dump_version = "17.2"
    write_manifest(backup.storage, manifest)
    with pytest.raises(PermanentError, match=r"its header says pg_dump version 16\.4, the manifest 17\.2"):
        restore_backup(targets(backup, tmp_path), backup.storage, BACKUP_ID, ["database"])


def rdb_of(version: bytes) -> bytes:
    body = b"REDIS" + version + b"\xfe\x00\xff"
    return body + CRC64.calc(body).to_bytes(8, "little")


def test_an_rdb_of_another_version_than_the_manifest_says_is_refused_before_loading(tmp_path, monkeypatch):
    backup = make_backup(tmp_path)
    facts = RedisFacts(redis_version="7.2.4", rdb_version=11, keys={"0": 3}, crc64_checked=True)
    data = rdb_of(b"0009")
    backup.parts["redis"] = stage(backup.settings, "redis", lambda out: (out.write(data), facts)[1])
    store(backup.settings, backup.parts)
    assert backup.verify().ok  # its CRC64 holds: only the version differs from the manifest
    called = []
    monkeypatch.setattr(apply, "plan_redis_restore", lambda *a, **k: called.append(a))
    with pytest.raises(
        PermanentError, match=r"redis\.rdb is not the backup's RDB: its header says RDB version 9"
    ):
        restore_backup(targets(backup, tmp_path), backup.storage, BACKUP_ID, ["redis"])
    assert called == []


@pytest.mark.parametrize(
    ("head", "problem"),
    [
        (b"REDIS0011", None),
        (b"REDIS", "does not start with an RDB header"),
        (b"REDIS00\xd9\xa1", "does not start with an RDB header"),
        (b"PK\x03\x04", "does not start with an RDB header"),
        (b"REDIS0012", "header says RDB version 12, the manifest 11"),
    ],
)
def test_rdb_headers(head, problem):
    found = rdb_problem(head, 11)
    assert found == problem if problem is None else problem in found


@pytest.mark.parametrize(
    ("head", "tail", "problem"),
    [
        (sql_dump(1), sql_dump(1)[-512:], None),
        (b"SELECT 1;\n", b"-- PostgreSQL database dump complete\n", "does not start with pg_dump's header"),
        (
            sql_dump(1).replace(b"-- Dumped by", b"-- Made by"),
            sql_dump(1),
            "lacks pg_dump's 'Dumped by' line",
        ),
        (sql_dump(1), b"COPY ...", "lacks pg_dump's closing line"),
    ],
)
def test_sql_dump_headers(head, tail, problem):
    found = sql_dump_problem(head[:8192], tail[-512:])
    assert found == problem if problem is None else problem in found


# ---------------------------------------------------------------- tar archives
# The restores run twice (the extraction fixture, tests/unit/conftest.py): with tarfile's extraction
# filters, and with the checks restore/files.py makes itself on Pythons before 3.11.4.


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"", mode: int = 0o644):
    info = tarfile.TarInfo(name)
    if "\0" in name:  # only a pax header keeps a NUL byte in a name
        info.pax_headers = {"path": name}
    info.type, info.linkname, info.mode = kind, link, mode
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    return info, (io.BytesIO(data) if info.size else None)


def archive_of(path: Path, *entries) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(*entry("etc/vq", tarfile.DIRTYPE, mode=0o755))
        tar.addfile(*entry("etc/vq/good.conf", data=b"ok\n"))  # first: a refused archive must not write it
        for info, data in entries:
            if data is not None:
                data.seek(0)  # the entries of HOSTILE and the like are written once for each run of a case
            tar.addfile(info, data)
    return path


class Sandbox:
    """A target folder and, beside it, a sentinel folder whose contents must never change."""

    def __init__(self, tmp_path: Path):
        self.target = tmp_path / "target"
        self.sentinel = tmp_path / "sentinel"
        self.sentinel.mkdir()
        (self.sentinel / "passwd").write_text("root:x:0:0\n")
        (self.sentinel / "passwd").chmod(0o644)

    def snapshot(self) -> list[tuple[str, str, int]]:
        found = []
        for folder, dirs, files in os.walk(self.sentinel):
            for name in sorted(dirs + files):
                path = Path(folder) / name
                content = path.read_text() if path.is_file() and not path.is_symlink() else ""
                found.append((str(path), content, path.lstat().st_mode))
        return found


# with the sandbox at tmp/target and tmp/sentinel, "../../../sentinel" from etc/vq/x leads to tmp/sentinel
HOSTILE = {
    "absolute name": ([entry("/etc/vq/abs.conf", data=b"x")], "absolute"),
    "climbing name": ([entry("etc/vq/../../../sentinel/passwd", data=b"x")], "climbing path (..)"),
    "outside the roots": ([entry("etc/passwd", data=b"x")], "outside the backed-up roots"),
    "symlink climbing out": (
        [entry("etc/vq/out", tarfile.SYMTYPE, "../../../sentinel")],
        "link pointing out of /etc/vq",
    ),
    "absolute symlink": ([entry("etc/vq/out", tarfile.SYMTYPE, "/etc/shadow")], "absolute path"),
    "symlink through a symlink": (
        [entry("etc/vq/here", tarfile.SYMTYPE, "."), entry("etc/vq/up", tarfile.SYMTYPE, "here/../x")],
        "link pointing out of /etc/vq: here/../x",
    ),
    "symlink loop": (
        [entry("etc/vq/a", tarfile.SYMTYPE, "b"), entry("etc/vq/b", tarfile.SYMTYPE, "a")],
        "link pointing out of /etc/vq",
    ),
    "write through an earlier symlink": (
        [entry("etc/vq/sub", tarfile.SYMTYPE, "."), entry("etc/vq/sub/passwd", data=b"x")],
        "below a symlink of the same archive",
    ),
    "a file over an earlier symlink": (
        [entry("etc/vq/link", tarfile.SYMTYPE, "good.conf"), entry("etc/vq/link", data=b"x")],
        "appears twice in the archive (as a symlink and a file)",
    ),
    "the root as a symlink": ([entry("etc/vq", tarfile.SYMTYPE, ".")], "appears twice"),
    "hardlink inside": ([entry("etc/vq/hard", tarfile.LNKTYPE, "etc/vq/good.conf")], "a hard link"),
    "hardlink outside": ([entry("etc/vq/hard", tarfile.LNKTYPE, "../../sentinel/passwd")], "a hard link"),
    "character device": ([entry("etc/vq/null", tarfile.CHRTYPE)], "a character device"),
    "block device": ([entry("etc/vq/sda", tarfile.BLKTYPE)], "a block device"),
    "fifo": ([entry("etc/vq/pipe", tarfile.FIFOTYPE)], "a FIFO"),
    "NUL in a name": ([entry("etc/vq/a\x00b", data=b"x")], "NUL byte"),
    "a name too long": ([entry("etc/vq/" + "x" * 300, data=b"x")], "too long"),
}


@pytest.mark.usefixtures("extraction")
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_entries_are_refused_and_nothing_is_written(tmp_path, case):
    entries, reason = HOSTILE[case]
    box = Sandbox(tmp_path)
    before = box.snapshot()
    archive = archive_of(tmp_path / "config.tar", *entries)
    with pytest.raises(PermanentError, match="nothing was written") as caught:
        restore_files(archive, [ROOT], box.target)
    assert reason in str(caught.value)
    assert not box.target.exists()  # not even the good entry before it
    assert box.snapshot() == before


@pytest.mark.usefixtures("extraction")
def test_a_symlink_on_disk_where_a_file_goes_is_replaced_never_written_through(tmp_path):
    box = Sandbox(tmp_path)
    before = box.snapshot()
    folder = box.target / "etc" / "vq"
    folder.mkdir(parents=True)
    (folder / "good.conf").symlink_to(box.sentinel / "passwd")
    os.link(box.sentinel / "passwd", folder / "hard.conf")  # a hard link on disk: not written through
    archive = archive_of(tmp_path / "config.tar", entry("etc/vq/hard.conf", data=b"new\n"))
    restore_files(archive, [ROOT], box.target)
    assert not (folder / "good.conf").is_symlink() and (folder / "good.conf").read_text() == "ok\n"
    assert (folder / "hard.conf").read_text() == "new\n"
    assert box.snapshot() == before
    assert [p.name for p in folder.iterdir() if ".vq-restore-" in p.name] == []


@pytest.mark.usefixtures("extraction")
@pytest.mark.parametrize(
    ("on_disk", "entries", "reason"),
    [
        ("folder link out", [entry("etc/vq/sub", tarfile.DIRTYPE)], "a symlink on disk to"),
        ("file where a folder goes", [entry("etc/vq/sub/x.conf", data=b"x")], "is not a folder"),
        (
            "folder where a file goes",
            [entry("etc/vq/dir", data=b"x")],
            "a folder on disk stands where the file",
        ),
        ("link through a disk link", [entry("etc/vq/l", tarfile.SYMTYPE, "sub/passwd")], "link leads out"),
    ],
)
def test_what_is_on_disk_cannot_carry_entries_out_and_a_refusal_writes_nothing(
    tmp_path, on_disk, entries, reason
):
    box = Sandbox(tmp_path)
    folder = box.target / "etc" / "vq"
    folder.mkdir(parents=True)
    if on_disk in ("folder link out", "link through a disk link"):
        (folder / "sub").symlink_to(box.sentinel)
    elif on_disk == "file where a folder goes":
        (folder / "sub").write_text("a file\n")
    else:
        (folder / "dir").mkdir()
    before, listing = box.snapshot(), sorted(p.name for p in folder.iterdir())
    archive = archive_of(tmp_path / "config.tar", *entries)
    with pytest.raises(PermanentError, match="nothing was written") as caught:
        restore_files(archive, [ROOT], box.target)
    assert reason in str(caught.value)
    assert box.snapshot() == before
    assert sorted(p.name for p in folder.iterdir()) == listing  # good.conf was not written either


@pytest.mark.usefixtures("extraction")
def test_links_inside_the_root_are_restored(tmp_path):
    box = Sandbox(tmp_path)
    archive = archive_of(
        tmp_path / "config.tar",
        entry("etc/vq/conf.d", tarfile.DIRTYPE, mode=0o555),
        entry("etc/vq/conf.d/x.conf", data=b"x"),
        entry("etc/vq/conf.d/up", tarfile.SYMTYPE, "../good.conf"),
        entry("etc/vq/current", tarfile.SYMTYPE, "conf.d/up"),
    )
    restore_files(archive, [ROOT], box.target)
    folder = box.target / "etc" / "vq"
    assert (folder / "current").read_text() == "ok\n"
    assert (folder / "conf.d").stat().st_mode & 0o777 == 0o555  # read-only, set after its files


@pytest.mark.usefixtures("extraction")
def test_hard_linked_files_are_archived_as_copies_and_restore(tmp_path):
    config = tmp_path / "etc" / "vq"
    config.mkdir(parents=True)
    (config / "a.conf").write_text("same\n")
    os.link(config / "a.conf", config / "b.conf")
    archive = tmp_path / "config.tar"
    with open(archive, "wb") as out:
        archive_config([str(config)], out)
    with tarfile.open(archive) as tar:
        assert not any(m.islnk() for m in tar.getmembers())
    target = tmp_path / "t"
    restore_files(archive, [str(config)], target)
    copy = target / str(config).lstrip("/")
    assert (copy / "a.conf").read_text() == (copy / "b.conf").read_text() == "same\n"


@pytest.mark.usefixtures("extraction")
def test_a_root_that_is_a_single_file_restores(tmp_path):
    conf = tmp_path / "etc" / "vq.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("single\n")
    archive = tmp_path / "config.tar"
    with open(archive, "wb") as out:
        archive_config([str(conf)], out)
    target = tmp_path / "t"
    restore_files(archive, [str(conf)], target)
    assert (target / str(conf).lstrip("/")).read_text() == "single\n"


def test_the_plan_never_reads_files_named_by_climbing_entries(tmp_path):
    box = Sandbox(tmp_path)
    archive = archive_of(tmp_path / "config.tar", entry("etc/vq/../../../sentinel/passwd", data=b"x"))
    changed = changed_files(archive, box.target)
    assert changed == [str(box.target / "etc/vq/good.conf")]


@pytest.mark.usefixtures("extraction")
def test_a_hostile_config_archive_stops_the_restore_before_any_component(tmp_path, monkeypatch):
    """database comes before config: a refused config archive must stop it from being restored."""
    backup = make_backup(tmp_path, "none")
    hostile = archive_of(tmp_path / "hostile.tar", entry("etc/vq/out", tarfile.SYMTYPE, "/etc/shadow"))
    with tarfile.open(hostile) as tar:
        facts = FilesFacts(roots=[ROOT], files=tar.getnames())
    data = hostile.read_bytes()
    backup.parts["config"] = stage(backup.settings, "config", lambda out: (out.write(data), facts)[1])
    store(backup.settings, backup.parts)
    assert backup.verify().ok
    settings = targets(backup, tmp_path).model_copy(update={"backup_config_paths": [ROOT]})
    restored = []
    monkeypatch.setattr(apply, "restore_database", lambda *a, **k: restored.append("database"))
    monkeypatch.setattr(run, "restore_lock", lambda *a: contextlib.nullcontext())
    with pytest.raises(PermanentError, match="nothing was restored: config etc/vq/out: link to an absolute"):
        restore_backup(settings, backup.storage, BACKUP_ID, ["database", "config"], force=True)
    assert restored == []
    assert not (tmp_path / "restored-config").exists()


def test_a_path_given_as_a_backup_id_never_becomes_a_staging_folder(tmp_path):
    from vq_tasks.backup.staging import StagingArea

    sentinel = tmp_path / "etc"
    sentinel.mkdir()
    for hostile in ("../etc", "/etc", "virtualqueue_backup_20240115_020000/../../etc", ""):
        with pytest.raises(PermanentError, match="is not a backup id"):
            StagingArea(tmp_path / "staging", hostile).remove()
    assert sentinel.exists()


def test_finalize_refuses_a_record_naming_a_file_outside_its_staging_folder(tmp_path):
    from vq_tasks.backup.staging import StagingArea, check_staged_paths
    from vq_tasks.manifest import StagedMember, StagedPart

    area = StagingArea(tmp_path / "staging", "virtualqueue_backup_20240115_020000")
    area.ensure()
    area.part_path("redis", "e1").write_bytes(b"rdb")
    good = StagedPart.model_construct(
        component="redis",
        member="redis.rdb",
        path=str(area.part_path("redis", "e1")),
        staged_size=3,
        worker="w1",
    )
    forged = StagedPart.model_construct(
        component="database", member="database.sql", path="/etc/shadow", worker="w1"
    )
    check_staged_paths({"redis": good}, area)
    with pytest.raises(PermanentError, match=r"database\.sql are not in"):
        check_staged_paths({"redis": good, "database": forged}, area)
    roles = StagedMember.model_construct(member="globals.sql", path="/etc/shadow")
    with pytest.raises(PermanentError, match=r"globals\.sql are not in"):
        check_staged_paths({"redis": good.model_copy(update={"extras": [roles]})}, area)


def test_finalize_on_a_worker_that_does_not_see_the_staged_parts_says_staging_must_be_shared(tmp_path):
    """A worker whose BACKUP_STAGING_DIR is not the folder the dumps wrote to (no shared volume)
    fails clearly, naming the part and the worker that staged it, instead of storing less."""
    from vq_tasks.backup.staging import StagingArea, check_staged_paths
    from vq_tasks.manifest import StagedPart

    area = StagingArea(tmp_path / "staging", "virtualqueue_backup_20240115_020000")
    area.ensure()
    area.part_path("redis", "e1").write_bytes(b"rdb")
    seen = StagedPart.model_construct(
        component="redis",
        member="redis.rdb",
        path=str(area.part_path("redis", "e1")),
        staged_size=3,
        worker="w1",
    )
    elsewhere = StagedPart.model_construct(
        component="database",
        member="database.sql",
        path=str(area.part_path("database", "e1")),
        staged_size=9,
        worker="host-b",
    )
    with pytest.raises(PermanentError, match=r"database.sql \(staged by host-b\).*every worker shares"):
        check_staged_paths({"redis": seen, "database": elsewhere}, area)
