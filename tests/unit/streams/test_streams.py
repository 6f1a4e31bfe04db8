"""The stream stages on the hot path of a dump: gzip members cut from shared pieces, hashing on a
thread of its own. Whatever the writes look like, the output is the same bytes in valid gzip members,
and a caller's buffer may be reused as soon as ``write`` returns."""

import gzip
import hashlib
import io
import os
import random
import threading
import zlib
from pathlib import Path

import pytest

from vq_tasks.backup.staging import StagingArea, stage_part
from vq_tasks.manifest import FilesFacts
from vq_tasks.settings import load_settings
from vq_tasks.streams import compress as compression
from vq_tasks.streams.compress import GZIP_WBITS, GzipStage, gzip_member
from vq_tasks.streams.readers import HashingReader
from vq_tasks.streams.stages import HASH_IN_FLIGHT, HashStage, Nowhere

BLOCK = 64 << 10


def members(stream: bytes) -> list[bytes]:
    """Split a multi-member gzip stream into the data of each member, with the standard zlib."""
    found = []
    while stream:
        inflate = zlib.decompressobj(GZIP_WBITS)
        found.append(inflate.decompress(stream))
        assert inflate.eof
        stream = inflate.unused_data
    return found


def compress(writes, block: int = BLOCK, threads: int = 2, level: int = 6) -> bytes:
    out = io.BytesIO()
    stage = GzipStage(out, level, threads, block_size=block)
    for data in writes:
        stage.write(data)
    stage.close()
    return out.getvalue()


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, at = [], 0
    for size in sizes:
        pieces.append(data[at : at + size])
        at += size
    return [*pieces, data[at:]]


DATA = b"".join(b'%d\tcustomer %d\t{"visits": %d}\n' % (i, i * 7, i % 13) for i in range(40_000))


@pytest.mark.parametrize(
    "sizes",
    [
        [],  # one write of everything
        [BLOCK] * 20,  # writes that are exactly blocks
        [BLOCK + 1, BLOCK - 1, 3 * BLOCK + 17, 1],  # large writes across block ends
        [1, 511, 100, 200_000, 7, 65_535, 65_536, 65_537],  # small ones gathered, large ones shared
        [5] * 2000,  # many tiny writes
    ],
)
def test_members_hold_the_data_in_blocks_whatever_the_writes(sizes):
    stream = compress(cut(DATA, sizes))
    assert gzip.decompress(stream) == DATA
    found = members(stream)
    assert b"".join(found) == DATA
    assert [len(m) for m in found[:-1]] == [BLOCK] * (len(found) - 1)
    assert 0 < len(found[-1]) <= BLOCK


def test_a_reused_buffer_does_not_change_what_was_written():
    buffer = bytearray(200_000)
    view = memoryview(buffer)
    expected = b""
    out = io.BytesIO()
    stage = GzipStage(out, 6, 2, block_size=BLOCK)
    hashed = HashStage(stage, background=True)
    rng = random.Random(7)
    for _ in range(30):
        n = rng.randrange(1, len(buffer))
        buffer[:n] = rng.randbytes(n)
        expected += buffer[:n]
        hashed.write(view[:n] if rng.random() < 0.5 else buffer[:n])
        buffer[:] = bytes(len(buffer))  # the caller reuses its buffer at once
    hashed.close()
    assert gzip.decompress(out.getvalue()) == expected
    assert hashed.checksums().sha256 == hashlib.sha256(expected).hexdigest()


def test_nothing_written_gives_no_member():
    assert compress([]) == b""
    assert compress([b"", b""]) == b""


def test_level_zero_stores_and_gzip_member_is_one_member():
    assert gzip.decompress(compress([DATA], level=0)) == DATA
    member = gzip_member(DATA, 6)
    assert members(member) == [DATA]
    assert members(gzip_member(b"", 6)) == [b""]


@pytest.mark.parametrize("background", [False, True])
def test_hash_stage_checksums(background):
    out = io.BytesIO()
    stage = HashStage(out, background=background)
    for piece in cut(DATA, [1, 100_000, 3, 1 << 20]):
        stage.write(piece)
    stage.close()
    checks = stage.checksums()
    assert out.getvalue() == DATA
    assert (checks.size, checks.md5, checks.sha256) == (
        len(DATA),
        hashlib.md5(DATA).hexdigest(),
        hashlib.sha256(DATA).hexdigest(),
    )
    assert stage.sha256 == checks.sha256


def test_background_hashing_is_bounded_and_ends_with_close_or_abort():
    stage = HashStage(Nowhere(), background=True)
    for _ in range(50):
        stage.write(bytes(1 << 16))
        assert len(stage._pending) <= HASH_IN_FLIGHT
    stage.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("hash")]
    stage = HashStage(Nowhere(), background=True)
    stage.write(b"x" * 100_000)
    stage.abort()
    assert not [t for t in threading.enumerate() if t.name.startswith("hash")]


@pytest.mark.parametrize("background", [False, True])
def test_hashing_reader_checksums_what_was_read_and_close_ends_its_thread(background):
    with HashingReader(io.BytesIO(DATA), background=background) as reader:
        read = [reader.read(size) for size in (1, 100_000, 3, 1 << 20, 1 << 20)]
        checks = reader.checksums()
    assert b"".join(read) == DATA
    assert (checks.size, checks.md5, checks.sha256) == (
        len(DATA),
        hashlib.md5(DATA).hexdigest(),
        hashlib.sha256(DATA).hexdigest(),
    )
    assert not [t for t in threading.enumerate() if t.name.startswith("hash")]


def test_a_failed_dump_leaves_no_thread_behind(tmp_path):
    settings = load_settings(backup_staging_dir=tmp_path, compression_threads=2)
    area = StagingArea(tmp_path, "virtualqueue_backup_20240115_020000")

    def produce(out):
        out.write(os.urandom(3 << 20))
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError):
        stage_part(settings, area, "database", "database.sql", produce)
    assert not [t for t in threading.enumerate() if t.name.startswith(("hash", "gzip"))]
    assert list(area.folder.iterdir()) == []


def test_staged_part_records_the_content_and_the_members(tmp_path):
    settings = load_settings(backup_staging_dir=tmp_path, compression_threads=2)
    area = StagingArea(tmp_path, "virtualqueue_backup_20240115_020000")

    def produce(out):
        for piece in cut(DATA * 3, [70_000, 1 << 20, 5, 333_333]):
            out.write(piece)
        return FilesFacts(roots=[], files=[])

    part = stage_part(settings, area, "database", "database.sql", produce)
    stored = Path(part.path).read_bytes()
    assert Path(part.path).parent == area.folder and Path(part.path).name.startswith("database.")
    assert gzip.decompress(stored) == DATA * 3
    assert part.staged_size == len(stored)
    assert part.staged_sha256 == hashlib.sha256(stored).hexdigest()
    assert part.content.md5 == hashlib.md5(DATA * 3).hexdigest()


@pytest.mark.parametrize("module", ["zlib", "zlib_ng.zlib_ng"])
def test_either_deflate_makes_members_the_standard_zlib_reads(monkeypatch, module):
    deflate = pytest.importorskip(module)
    monkeypatch.setattr(compression, "DEFLATE", deflate)
    stream = compress(cut(DATA, [BLOCK - 1, 100_000]))
    assert b"".join(members(stream)) == DATA
