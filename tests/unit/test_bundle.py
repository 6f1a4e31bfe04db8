"""A bundle assembled from staged gzip members reads as an ordinary tar.gz, also with tar(1)."""

import gzip
import hashlib
import io
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vq_tasks.bundle import BundleWriter
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import FilesFacts
from vq_tasks.settings import load_settings
from vq_tasks.staging import StagingArea, stage_part

BROKER = {"celery_broker_url": "redis://127.0.0.1:1/0"}


def staged(tmp_path, component, data, compressed=True, level=None):
    settings = load_settings(
        backup_staging_dir=tmp_path / "staging",
        compression_enabled=compressed,
        compression_threads=2,
        **BROKER,
    )
    area = StagingArea(settings.backup_staging_dir, "virtualqueue_backup_20240115_020000")

    def produce(out):
        for i in range(0, len(data), 100_000):
            out.write(data[i : i + 100_000])
        return FilesFacts(roots=[], files=[])

    return stage_part(settings, area, component, f"{component}.bin", produce, member_level=level)


@pytest.mark.parametrize("compressed", [True, False])
def test_bundle_reads_back_with_tarfile_and_tar(tmp_path, compressed):
    payloads = {"database": b"SELECT 1;\n" * 300_000, "redis": bytes(range(256)) * 5000, "config": b""}
    parts = [staged(tmp_path, c, data, compressed) for c, data in payloads.items()]
    out = io.BytesIO()
    writer = BundleWriter(out, compressed, datetime(2024, 1, 15, 2, tzinfo=UTC))
    for part in parts:
        writer.add(part)
    writer.close()
    path = tmp_path / ("b.tar.gz" if compressed else "b.tar")
    path.write_bytes(out.getvalue())
    with tarfile.open(path) as tar:
        for part in parts:
            assert tar.extractfile(part.member).read() == payloads[part.component]
    listing = subprocess.run(["tar", "-tvf", str(path)], capture_output=True, text=True, check=True)
    assert [line.split()[-1] for line in listing.stdout.splitlines()] == [p.member for p in parts]
    if compressed:
        gzip.decompress(out.getvalue())  # one valid multi-member gzip stream


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


def test_a_changed_staged_part_is_refused(tmp_path):
    part = staged(tmp_path, "database", b"data" * 1000)
    with open(part.path, "r+b") as f:
        f.seek(10)
        f.write(b"\x00")
    with pytest.raises(PermanentError, match="changed after it was written"):
        BundleWriter(io.BytesIO(), True, datetime.now(UTC)).add(part)


def test_a_part_missing_on_this_worker_names_the_shared_volume(tmp_path):
    part = staged(tmp_path, "redis", b"r")
    StagingArea(tmp_path / "staging", "virtualqueue_backup_20240115_020000").remove()
    with pytest.raises(PermanentError, match="BACKUP_STAGING_DIR must be one volume shared"):
        BundleWriter(io.BytesIO(), True, datetime.now(UTC)).add(part)
