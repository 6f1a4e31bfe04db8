"""Redis restore without servers: the version table and checks, the RDB header, the payload trailer,
the throwaway's config (password in a 0600 file, never in argv) and the choice of binary."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from vq_tasks.errors import PermanentError
from vq_tasks.restore.redis_server import (
    check_versions,
    config_text,
    oldest_redis_reading,
    payload_rdb_version,
    rdb_file_version,
    rdb_version_of,
    server_binary_path,
    server_binary_version,
    write_config,
)

TARGET = "Redis 10.0.0.5:6379"


@pytest.mark.parametrize(
    ("version", "rdb"),
    [
        ("5.0.14", 9),
        ("6.0.20", 9),
        ("6.2.14", 9),
        ("7.0.15", 10),
        ("7.2.4", 11),
        ("7.4.1", 12),
        ("8.0.2", 12),
        ("8.2.1", None),  # newer than the table: left to the payload check
        ("255.255.255", None),  # an unstable build
    ],
)
def test_rdb_version_of_each_redis(version: str, rdb: int | None):
    assert rdb_version_of(version) == rdb


@pytest.mark.parametrize("version", ["4.0.14", "3.2.12", "", "unknown"])
def test_too_old_or_no_version_is_refused(version: str):
    with pytest.raises(PermanentError, match=r"supported are Redis 5\.0 and newer") as caught:
        rdb_version_of(version, who=f"the target {TARGET}")
    assert TARGET in str(caught.value)


def test_oldest_redis_reading_each_rdb_version():
    assert [oldest_redis_reading(v) for v in (9, 10, 11, 12, 13)] == [
        "5.0",
        "7.0",
        "7.2",
        "7.4",
        "newer than 8.0",
    ]


def test_rdb_newer_than_the_target_is_refused_naming_both_versions():
    with pytest.raises(PermanentError) as caught:
        check_versions(10, TARGET, "6.2.14", "/usr/bin/redis-server", "7.0.15")
    message = str(caught.value)
    assert "RDB is version 10" in message and "Redis 6.2.14" in message and "up to 9" in message
    assert TARGET in message and "Redis 7.0 or newer" in message and "nothing was written" in message


def test_binary_too_old_for_the_rdb_is_refused():
    with pytest.raises(PermanentError, match=r"redis-server 6\.2\.14 \(/opt/rs\) reads RDB versions up to 9"):
        check_versions(10, TARGET, "7.0.15", "/opt/rs", "6.2.14")


def test_binary_newer_than_the_target_is_refused():
    """Its payloads would carry its own RDB version, which the target refuses."""
    with pytest.raises(PermanentError, match=r"payloads of RDB version 10.*set REDIS_SERVER_BIN") as caught:
        check_versions(9, TARGET, "6.2.14", "/usr/bin/redis-server", "7.0.15")
    assert TARGET in str(caught.value)


@pytest.mark.parametrize(
    ("rdb", "target", "binary"),
    [
        (9, "6.2.14", "6.2.14"),
        (9, "7.0.15", "6.2.14"),
        (10, "7.0.15", "7.0.15"),
        (11, "7.4.0", "7.2.4"),
        (12, "9.0.0", "9.0.0"),
    ],
)
def test_versions_that_line_up_pass(rdb: int, target: str, binary: str):
    check_versions(rdb, TARGET, target, "/bin/redis-server", binary)


def test_rdb_file_version_reads_the_header(tmp_path: Path):
    rdb = tmp_path / "dump.rdb"
    rdb.write_bytes(b"REDIS0011\xfa\x09redis-ver")
    assert rdb_file_version(rdb) == 11


@pytest.mark.parametrize("content", [b"", b"REDIS", b"REDIX0011....", b"PGDMP\x01\x0e\x00", b"REDIS00a1"])
def test_no_rdb_is_refused(tmp_path: Path, content: bytes):
    rdb = tmp_path / "dump.rdb"
    rdb.write_bytes(content)
    with pytest.raises(PermanentError, match="is not an RDB file"):
        rdb_file_version(rdb)


def test_missing_rdb_is_refused(tmp_path: Path):
    with pytest.raises(PermanentError, match="cannot read the RDB"):
        rdb_file_version(tmp_path / "nothing.rdb")


def test_payload_version_is_before_the_crc():
    payload = b"\x00\x03abc" + (10).to_bytes(2, "little") + b"\x11" * 8
    assert payload_rdb_version(payload) == 10


def test_config_holds_the_password_and_is_private(tmp_path: Path):
    folder = tmp_path / 'we"ird\\dir'
    folder.mkdir()
    path = write_config(folder, 6390, "pw-123")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "requirepass pw-123\n" in text and "port 6390\n" in text and "bind 127.0.0.1\n" in text
    assert 'save ""\n' in text and "appendonly no\n" in text and "dbfilename backup.rdb\n" in text
    assert 'dir "' + str(folder).replace("\\", "\\\\").replace('"', '\\"') + '"\n' in text


def test_config_text_does_not_daemonize():
    assert "daemonize no\n" in config_text(Path("/tmp/x"), 1, "p")


def test_binary_from_argument_then_environment_then_path(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REDIS_SERVER_BIN", "/opt/redis/bin/redis-server")
    assert server_binary_path("/given") == "/given"
    assert server_binary_path() == "/opt/redis/bin/redis-server"
    monkeypatch.delenv("REDIS_SERVER_BIN")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PermanentError, match="set REDIS_SERVER_BIN"):
        server_binary_path()


def test_binary_that_is_no_redis_server_is_refused(tmp_path: Path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho hello\n")
    fake.chmod(0o755)
    with pytest.raises(PermanentError, match="is no redis-server"):
        server_binary_version(str(fake))
    with pytest.raises(PermanentError, match="cannot run"):
        server_binary_version(str(tmp_path / "missing"))


def test_binary_version_is_parsed(tmp_path: Path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'Redis server v=7.2.4 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64'\n")
    fake.chmod(0o755)
    assert server_binary_version(str(fake)) == "7.2.4"
