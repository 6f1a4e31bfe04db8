"""A bundle assembled from staged gzip members (zstd frames) reads as an ordinary tar.gz (tar.zst),
also with tar(1) and zstd(1)."""

import gzip
import hashlib
import io
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard

from vq_tasks.backup.bundle import BundleWriter
from vq_tasks.backup.staging import StagingArea, stage_part
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import TAR_SUFFIX, FilesFacts
from vq_tasks.settings import load_settings
from vq_tasks.streams.readers import open_tar_stream

BROKER = {"celery_broker_url": "redis://127.0.0.1:1/0"}


def staged(tmp_path, component, data, compression="gzip", level=None):
    settings = load_settings(
        backup_staging_dir=tmp_path / "staging",
        compression_enabled=compression != "none",
        compression_algorithm="gzip" if compression == "none" else compression,
        compression_threads=2,
        **BROKER,
    )
    area = StagingArea(settings.backup_staging_dir, "virtualqueue_backup_20240115_020000")

    def produce(out):
        for i in range(0, len(data), 100_000):
            out.write(data[i : i + 100_000])
        return FilesFacts(roots=[], files=[])

    return stage_part(settings, area, component, f"{component}.bin", produce, member_level=level)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_bundle_reads_back_with_tarfile_and_tar(tmp_path, compression):
    payloads = {"database": b"SELECT 1;\n" * 300_000, "redis": bytes(range(256)) * 5000, "config": b""}
    parts = [staged(tmp_path, c, data, compression) for c, data in payloads.items()]
    out = io.BytesIO()
    writer = BundleWriter(out, compression, datetime(2024, 1, 15, 2, tzinfo=UTC))
    for part in parts:
        writer.add(part)
    writer.close()
    path = tmp_path / f"b{TAR_SUFFIX[compression]}"
    path.write_bytes(out.getvalue())
    with open_tar_stream(path) as tar:
        while (info := tar.next()) is not None:
            assert tar.extractfile(info).read() == payloads[info.name.removesuffix(".bin")]
    zstd = ["--zstd"] if compression == "zstd" else []  # GNU tar guesses gzip, not zstd, by itself
    listing = subprocess.run(["tar", *zstd, "-tvf", str(path)], capture_output=True, text=True, check=True)
    assert [line.split()[-1] for line in listing.stdout.splitlines()] == [p.member for p in parts]
    if compression == "gzip":
        gzip.decompress(out.getvalue())  # one valid multi-member gzip stream
        with tarfile.open(path) as tar:
            assert tar.getnames() == [p.member for p in parts]
    if compression == "zstd":  # one valid stream of zstd frames, for zstd(1) too
        plain = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
        assert (
            plain
            == zstandard.ZstdDecompressor().stream_reader(out.getvalue(), read_across_frames=True).read()
        )
        listing = subprocess.run(["tar", "-t"], input=plain, capture_output=True, check=True)
        assert listing.stdout.decode().split() == [p.member for p in parts]


def test_part_records_content_checksums(tmp_path):
    data = b"x" * 3_000_001
    part = staged(tmp_path, "database", data)
    assert part.content.size == len(data)
    assert part.content.sha256 == hashlib.sha256(data).hexdigest()
    assert part.content.md5 == hashlib.md5(data).hexdigest()
    assert gzip.decompress(Path(part.path).read_bytes()) == data


def test_stored_level_zero_keeps_already_compressed_data(tmp_path):
    inner = gzip.compress(b"config" * 1000)
    part = staged(tmp_path, "config", inner, level=0)
    assert gzip.decompress(Path(part.path).read_bytes()) == inner


def test_zstd_part_is_frames_and_level_zero_stores_them(tmp_path):
    data = b"x" * 3_000_001
    part = staged(tmp_path, "database", data, "zstd")
    assert part.compression == "zstd" and part.content.sha256 == hashlib.sha256(data).hexdigest()
    raw = Path(part.path).read_bytes()
    assert subprocess.run(["zstd", "-dc"], input=raw, capture_output=True, check=True).stdout == data
    inner = zstandard.ZstdCompressor().compress(b"config" * 1000)
    stored = Path(staged(tmp_path, "config", inner, "zstd", level=0).path).read_bytes()
    assert len(stored) < len(inner) + 32  # raw blocks: nothing compressed twice
    assert subprocess.run(["zstd", "-dc"], input=stored, capture_output=True, check=True).stdout == inner


def test_a_changed_staged_part_is_refused(tmp_path):
    part = staged(tmp_path, "database", b"data" * 1000)
    with open(part.path, "r+b") as f:
        f.seek(10)
        f.write(b"\x00")
    with pytest.raises(PermanentError, match="changed after it was written"):
        BundleWriter(io.BytesIO(), "gzip", datetime.now(UTC)).add(part)


def test_a_part_missing_on_this_worker_names_the_shared_volume(tmp_path):
    part = staged(tmp_path, "redis", b"r")
    StagingArea(tmp_path / "staging", "virtualqueue_backup_20240115_020000").remove()
    with pytest.raises(PermanentError, match="BACKUP_STAGING_DIR must be one volume shared"):
        BundleWriter(io.BytesIO(), "gzip", datetime.now(UTC)).add(part)
