"""Config and logs restore: paths and modes kept, hostile entries refused with nothing written."""

import io
import tarfile
from pathlib import Path

import pytest

from vq_tasks.errors import PermanentError
from vq_tasks.restore.files import changed_files, check_logs_target, restore_files
from vq_tasks.sources.files import archive_config


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
