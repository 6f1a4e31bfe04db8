"""Config and logs restore: paths and modes kept, hostile entries refused with nothing written.

Every test runs twice (the ``extraction`` fixture, tests/unit/conftest.py): with tarfile's extraction
filters, and with the checks restore/files.py makes itself on Pythons before 3.11.4."""

import io
import os
import tarfile
from pathlib import Path

import pytest

from vq_tasks.errors import PermanentError
from vq_tasks.restore import files
from vq_tasks.restore.files import changed_files, check_logs_target, restore_files
from vq_tasks.sources.files import archive_config
from vq_tasks.streams.readers import open_tar_stream

pytestmark = pytest.mark.usefixtures("extraction")


def make_config(tmp_path: Path) -> tuple[Path, Path]:
    config = tmp_path / "etc" / "vq"
    (config / "conf.d").mkdir(parents=True)
    (config / "app.yaml").write_text("a: 1\n")
    (config / "app.yaml").chmod(0o664)
    (config / "conf.d" / "tls.conf").write_text("tls\n")
    (config / "conf.d" / "tls.conf").chmod(0o640)
    (config / "current.yaml").symlink_to("app.yaml")
    archive = tmp_path / "config.tar"
    with open(archive, "wb") as out:
        archive_config([str(config)], out)
    return config, archive


def test_restore_into_a_folder_keeps_paths_modes_and_links(tmp_path):
    config, archive = make_config(tmp_path)
    target = tmp_path / "restored"
    result = restore_files(archive, [str(config)], target)
    copy = target / str(config).lstrip("/")
    assert (copy / "app.yaml").read_text() == "a: 1\n"
    assert (copy / "app.yaml").stat().st_mode & 0o777 == 0o664
    assert (copy / "conf.d" / "tls.conf").stat().st_mode & 0o777 == 0o640
    assert (copy / "current.yaml").is_symlink() and (copy / "current.yaml").readlink() == Path("app.yaml")
    assert len(result.files) == 5


def test_changed_files_lists_what_differs(tmp_path):
    config, archive = make_config(tmp_path)
    target = tmp_path / "restored"
    restore_files(archive, [str(config)], target)
    assert changed_files(archive, target) == []
    (target / str(config).lstrip("/") / "app.yaml").write_text("changed\n")
    assert [p.rsplit("/", 1)[-1] for p in changed_files(archive, target)] == ["app.yaml"]


def hostile(tmp_path: Path, name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> Path:
    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        good = tarfile.TarInfo("etc/vq/good.conf")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        bad = tarfile.TarInfo(name)
        bad.type = kind
        bad.linkname = link
        tar.addfile(bad, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    return archive


@pytest.mark.parametrize(
    ("name", "kind", "link", "reason"),
    [
        ("etc/vq/../../root/.ssh/authorized_keys", tarfile.REGTYPE, "", "climbing"),
        ("/etc/vq/abs.conf", tarfile.REGTYPE, "", "absolute"),
        ("etc/passwd", tarfile.REGTYPE, "", "outside the backed-up roots"),
        ("etc/vq/escape", tarfile.SYMTYPE, "../../etc/shadow", "link pointing out"),
        ("etc/vq/abslink", tarfile.SYMTYPE, "/etc/shadow", "absolute path"),
        ("etc/vq/hard", tarfile.LNKTYPE, "etc/passwd", "not a file"),
        ("etc/vq/dev", tarfile.CHRTYPE, "", "not a file"),
    ],
)
def test_hostile_entries_are_refused_and_nothing_is_written(tmp_path, name, kind, link, reason):
    archive = hostile(tmp_path, name, kind, link)
    target = tmp_path / "target"
    with pytest.raises(PermanentError, match=reason) as caught:
        restore_files(archive, ["/etc/vq"], target)
    assert "nothing was written" in str(caught.value)
    assert not target.exists()


def test_logs_never_restore_over_live_logs(tmp_path):
    live = tmp_path / "log" / "vq"
    live.mkdir(parents=True)
    for bad in (live, live / "restored", tmp_path / "log"):
        with pytest.raises(PermanentError, match="overlaps the live logs"):
            check_logs_target(bad, [str(live)])
    check_logs_target(tmp_path / "restored-logs", [str(live)])


def test_a_multi_member_gzip_archive_restores_whole(tmp_path):
    """Our .tar.gz files are many gzip members; Python's own r|gz would stop after the first."""
    import os

    from vq_tasks.streams.compress import GzipStage

    config = tmp_path / "etc" / "big"
    config.mkdir(parents=True)
    payload = os.urandom(1 << 20) * 3
    (config / "blob.bin").write_bytes(payload)
    archive = tmp_path / "config.tar.gz"
    with open(archive, "wb") as out:
        stage = GzipStage(out, level=1, threads=2)
        archive_config([str(config)], stage)
        stage.close()
    result = restore_files(archive, [str(config)], tmp_path / "restored")
    assert (tmp_path / "restored" / str(config).lstrip("/") / "blob.bin").read_bytes() == payload
    assert len(result.files) == 2


def test_links_of_the_archive_cannot_carry_files_out(tmp_path):
    """l2 -> ., l1 -> l2/.. : each looks harmless alone; a file below l1 would land above the root."""
    archive = tmp_path / "chain.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, target in (("etc/vq/l2", "."), ("etc/vq/l1", "l2/..")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            tar.addfile(link)
        evil = tarfile.TarInfo("etc/vq/l1/passwd")
        evil.size, evil.mode = 4, 0o4755
        tar.addfile(evil, io.BytesIO(b"root"))
    target = tmp_path / "target"
    with pytest.raises(PermanentError, match="below a symlink of the same archive"):
        restore_files(archive, ["/etc/vq"], target)
    assert not target.exists()


def test_setuid_bits_are_never_restored(tmp_path):
    archive = tmp_path / "suid.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        entry = tarfile.TarInfo("etc/vq/tool")
        entry.size, entry.mode = 2, 0o4775
        tar.addfile(entry, io.BytesIO(b"#!"))
    restore_files(archive, ["/etc/vq"], tmp_path / "t")
    assert (tmp_path / "t" / "etc" / "vq" / "tool").stat().st_mode & 0o7777 == 0o775


def test_a_link_already_on_disk_cannot_carry_files_out(tmp_path):
    archive = tmp_path / "plain.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        entry = tarfile.TarInfo("etc/vq/sub/file.conf")
        entry.size = 1
        tar.addfile(entry, io.BytesIO(b"x"))
    target = tmp_path / "t"
    (target / "etc" / "vq").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (target / "etc" / "vq" / "sub").symlink_to(outside)
    with pytest.raises(PermanentError, match="nothing was written") as caught:
        restore_files(archive, ["/etc/vq"], target)
    assert "etc/vq/sub/file.conf: its folder leads out of /etc/vq on disk" in str(caught.value)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("kind", "mode"), [(tarfile.REGTYPE, 0o4775), (tarfile.DIRTYPE, 0o3770)], ids=["file", "folder"]
)
def test_setuid_setgid_and_sticky_bits_are_dropped_from_files_and_folders(tmp_path, kind, mode):
    archive = tmp_path / "modes.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        entry = tarfile.TarInfo("etc/vq/x")
        entry.type, entry.mode = kind, mode
        tar.addfile(entry)
    restore_files(archive, ["/etc/vq"], tmp_path / "t")
    assert (tmp_path / "t" / "etc" / "vq" / "x").stat().st_mode & 0o7777 == mode & 0o777


def write_one(tmp_path: Path, name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> Path:
    """Write a tar of one entry ``name`` (two bytes of data if a regular file) under ``tmp_path``."""
    archive = tmp_path / "one.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = kind, link, 0o644
        info.size = 2 if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(b"ok") if info.size else None)
    return archive


def extract_one(archive: Path, target: Path) -> None:
    """Write the one entry of ``archive`` as restore_files writes a file or folder it has checked."""
    target.mkdir(parents=True, exist_ok=True)
    with open_tar_stream(archive) as tar:
        member = tar.next()
        assert member is not None
        files._extract(tar, member, target)


@pytest.mark.parametrize("name", ["../x", "etc/vq/../../../x"])
def test_an_entry_climbing_out_is_refused_as_it_is_written(tmp_path, name):
    """A second line behind refusals() and _placed: the filter, or the same check without it."""
    target = tmp_path / "a" / "target"
    lands = os.path.realpath(target / name)
    with pytest.raises(files.REFUSED_ON_WRITE) as caught:
        extract_one(write_one(tmp_path, name), target)
    assert str(caught.value) == f"{name!r} would be extracted to {lands!r}, which is outside the destination"
    assert not os.path.lexists(lands)


def test_an_absolute_entry_never_lands_outside_as_it_is_written(tmp_path):
    """The filter strips the leading / and writes it below the target; without the filter it is refused."""
    outside = tmp_path / "outside" / "abs.conf"
    outside.parent.mkdir()
    target = tmp_path / "target"
    try:
        extract_one(write_one(tmp_path, str(outside)), target)
        assert files.FILTERS and (target / str(outside).lstrip("/")).read_bytes() == b"ok"
    except files.REFUSED_ON_WRITE as exc:
        assert not files.FILTERS and str(exc) == f"member {str(outside)!r} has an absolute path"
    assert list(outside.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("kind", "link"),
    [
        (tarfile.CHRTYPE, ""),
        (tarfile.BLKTYPE, ""),
        (tarfile.FIFOTYPE, ""),
        (tarfile.LNKTYPE, "../../sentinel"),
        (tarfile.SYMTYPE, "../../sentinel"),
    ],
    ids=["character device", "block device", "fifo", "hard link", "symlink"],
)
def test_without_filters_what_is_not_a_file_or_folder_is_refused_as_it_is_written(
    tmp_path, extraction, kind, link
):
    """refusals() refuses these before anything is written (tests/unit/test_hostile_input.py); the
    checks that stand in for the filter refuse them again as they are written."""
    if extraction:
        pytest.skip("the tar filter lets these through: only refusals() stops them, before")
    target = tmp_path / "target"
    with pytest.raises(files.ExtractRefused, match="is a special file"):
        extract_one(write_one(tmp_path, "etc/vq/x", kind, link), target)
    assert list(target.iterdir()) == []


def test_a_link_put_on_disk_after_the_check_is_refused_as_it_is_written(tmp_path, monkeypatch):
    """A symlink out of the root appears where a folder of the archive goes, after refusals() read
    the disk: the folder is refused in the same words with the filters or without them."""
    archive = tmp_path / "config.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("etc/vq", "etc/vq/sub"):
            folder = tarfile.TarInfo(name)
            folder.type, folder.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(folder)
        inside = tarfile.TarInfo("etc/vq/sub/x.conf")
        inside.size = 1
        tar.addfile(inside, io.BytesIO(b"x"))
    target, outside = tmp_path / "target", tmp_path / "outside"
    outside.mkdir()
    checked = files.refusals

    def then_the_disk_changes(*args, **kwargs):
        found = checked(*args, **kwargs)
        (target / "etc" / "vq").mkdir(parents=True)
        (target / "etc" / "vq" / "sub").symlink_to(outside)
        return found

    monkeypatch.setattr(files, "refusals", then_the_disk_changes)
    with pytest.raises(PermanentError) as caught:
        restore_files(archive, ["/etc/vq"], target)
    assert str(caught.value) == (
        f"config.tar: 'etc/vq/sub' would be extracted to {str(outside)!r}, which is outside the "
        "destination (the disk changed while restoring)"
    )
    assert list(outside.iterdir()) == []
