"""Config and log archives: modes, symlinks, linked roots, special files, the logs' time window."""

import io
import os
import socket
import tarfile
import time

import pytest

from vq_tasks.errors import PermanentError
from vq_tasks.sources.files import archive_config, archive_logs


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_config_keeps_modes_and_links_and_notes_sockets(tmp_path):
    config = tmp_path / "conf"
    config.mkdir()
    (config / "a.conf").write_text("a")
    (config / "a.conf").chmod(0o640)
    (config / "link.conf").symlink_to("a.conf")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(config / "app.sock"))
        out = io.BytesIO()
        facts = archive_config([str(config)], out)
    found = members(out.getvalue())
    root = str(config).lstrip("/")
    assert found[f"{root}/a.conf"].mode & 0o777 == 0o640
    assert found[f"{root}/link.conf"].issym() and found[f"{root}/link.conf"].linkname == "a.conf"
    assert f"{root}/app.sock" not in found
    assert any("app.sock" in note for note in facts.skipped)


def test_a_root_that_links_to_a_folder_is_archived_as_that_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "x.log").write_text("x")
    (tmp_path / "current").symlink_to(real)
    out = io.BytesIO()
    facts = archive_logs([str(tmp_path / "current")], out, window_days=7)
    assert f"{str(tmp_path).lstrip('/')}/current/x.log" in members(out.getvalue())
    assert facts.skipped == []


def test_logs_window_and_missing_roots(tmp_path):
    (tmp_path / "new.log").write_text("new")
    (tmp_path / "old.log").write_text("old")
    old = time.time() - 8 * 86400
    os.utime(tmp_path / "old.log", (old, old))
    out = io.BytesIO()
    facts = archive_logs([str(tmp_path), str(tmp_path / "gone")], out, window_days=7)
    names = [n.rsplit("/", 1)[-1] for n in members(out.getvalue())]
    assert names == ["new.log"]
    assert any("gone: does not exist" in note for note in facts.skipped)


def test_missing_config_path_fails(tmp_path):
    with pytest.raises(PermanentError, match="does not exist"):
        archive_config([str(tmp_path / "nope")], io.BytesIO())
