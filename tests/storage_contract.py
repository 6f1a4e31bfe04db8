"""The storage contract, as one backend-neutral test class that each provider's test subclasses
(the idea of kombu's integration tests). A subclass provides the fixture ``storage_factory``:
``storage_factory(part_size_mb=5, concurrency=2) -> Storage`` returning a storage on a fresh,
empty root of its own each call, through the real settings (``load_settings``/``open_storage``).
"""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from datetime import UTC, datetime, timedelta

import pytest

from vq_tasks.storage.base import Storage, StorageError
from vq_tasks.storage.upload import PartedStorage
from vq_tasks.streams.stages import pump

MIB = 1 << 20


def write(storage: Storage, name: str, data: bytes, chunk: int = MIB) -> None:
    with storage.open_write(name) as out:
        for offset in range(0, len(data), chunk):
            out.write(data[offset : offset + chunk])


def read(storage: Storage, name: str) -> bytes:
    sink = io.BytesIO()
    with storage.open_read(name) as stream:
        pump(stream, sink)  # readinto, as verify and restore read
    return sink.getvalue()


class StorageContract:
    """Every provider keeps these promises."""

    def test_small_object_round_trip(self, storage_factory):
        storage = storage_factory()
        write(storage, "a_manifest.json", b'{"ok": true}\n')
        assert read(storage, "a_manifest.json") == b'{"ok": true}\n'
        assert storage.read_bytes("a_manifest.json") == b'{"ok": true}\n'
        found = storage.stat("a_manifest.json")
        assert found is not None and found.name == "a_manifest.json" and found.size == 13
        assert found.modified.tzinfo is not None

    def test_empty_object(self, storage_factory):
        storage = storage_factory()
        write(storage, "empty.bin", b"")
        assert storage.stat("empty.bin").size == 0
        assert read(storage, "empty.bin") == b""

    def test_multipart_object_round_trip(self, storage_factory):
        storage = storage_factory(part_size_mb=5, concurrency=3)
        data = os.urandom(17 * MIB + 12345)  # three full parts and a short last one
        write(storage, "big.tar.gz", data, chunk=777_777)
        assert storage.stat("big.tar.gz").size == len(data)
        assert hashlib.sha256(read(storage, "big.tar.gz")).digest() == hashlib.sha256(data).digest()

    def test_exact_multiple_of_the_part_size(self, storage_factory):
        storage = storage_factory(part_size_mb=5, concurrency=2)
        data = os.urandom(10 * MIB)
        write(storage, "even.bin", data)
        assert read(storage, "even.bin") == data

    @pytest.mark.parametrize("size", [100, 11 * MIB])
    def test_failed_write_leaves_nothing(self, storage_factory, size):
        storage = storage_factory(part_size_mb=5, concurrency=2)
        with pytest.raises(RuntimeError, match="source died"), storage.open_write("half.tar.gz") as out:
            out.write(os.urandom(size))
            raise RuntimeError("the source died")
        assert storage.stat("half.tar.gz") is None
        assert [o.name for o in storage.list()] == []
        assert storage.abort_stale_uploads(datetime.now(UTC) + timedelta(days=1)) == []  # none left open

    def test_overwrite_replaces(self, storage_factory):
        storage = storage_factory()
        write(storage, "x.json", b"first")
        write(storage, "x.json", b"second, longer")
        assert read(storage, "x.json") == b"second, longer"
        assert [o.name for o in storage.list()] == ["x.json"]

    def test_list_stat_delete_usage(self, storage_factory):
        storage = storage_factory()
        assert storage.list() == [] and storage.usage().objects == 0
        for name, size in (("a.tar.gz", 10), ("b_logs.tar.gz", 20), ("c_manifest.json", 30)):
            write(storage, name, bytes(size))
        assert sorted((o.name, o.size) for o in storage.list()) == [
            ("a.tar.gz", 10),
            ("b_logs.tar.gz", 20),
            ("c_manifest.json", 30),
        ]
        assert (storage.usage().objects, storage.usage().size) == (3, 60)
        assert storage.delete("a.tar.gz") is True
        assert storage.delete("a.tar.gz") is False
        assert storage.stat("a.tar.gz") is None
        assert storage.stat("never-was.json") is None

    def test_roots_do_not_see_each_other(self, storage_factory):
        one, two = storage_factory(), storage_factory()
        write(one, "only-in-one.json", b"1")
        assert [o.name for o in two.list()] == []
        assert two.stat("only-in-one.json") is None

    def test_missing_object_read_raises_file_not_found(self, storage_factory):
        storage = storage_factory()
        with pytest.raises(FileNotFoundError), storage.open_read("nope.tar.gz") as stream:
            stream.read(1)

    @pytest.mark.parametrize("bad", ["", "../escape", "a/b", ".hidden"])
    def test_invalid_names_refused(self, storage_factory, bad):
        with pytest.raises(StorageError):
            storage_factory().stat(bad)

    def test_describe_names_the_provider_and_no_secret(self, storage_factory):
        storage = storage_factory()
        text = storage.describe()
        assert storage.provider in text
        for secret in ("secret", "AccountKey", "Eby8vdM02x"):
            assert secret not in text

    def test_upload_memory_is_bounded(self, storage_factory):
        """A 64 MiB object sent in 5 MiB parts, two at a time, never holds much of itself."""
        storage = storage_factory(part_size_mb=5, concurrency=2)
        chunk = os.urandom(MIB)
        tracemalloc.start()
        try:
            with storage.open_write("stream.bin") as out:
                for _ in range(64):
                    out.write(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert storage.stat("stream.bin").size == 64 * MIB
        assert peak < 32 * MIB, f"peak {peak / MIB:.1f} MiB while uploading 64 MiB"


class CorruptionContract:
    """For providers that upload in parts: bytes changed after we hashed them (a faulty proxy or
    network card) are noticed from the provider's own checksums, and nothing is committed."""

    @pytest.mark.parametrize("size", [1000, 12 * MIB])
    def test_corrupted_upload_is_refused(self, storage_factory, size):
        storage = storage_factory(part_size_mb=5, concurrency=2)
        assert isinstance(storage, PartedStorage)
        flip_one_byte_on_the_way(storage)
        with pytest.raises(StorageError) as failure:
            write(storage, "damaged.tar.gz", os.urandom(size))
        assert not failure.value.transient
        assert storage.stat("damaged.tar.gz") is None


def flip_one_byte_on_the_way(storage: PartedStorage) -> None:
    """Make ``storage`` send its first part (or whole object) with one byte flipped, while every
    checksum we compute still describes the original bytes."""
    from dataclasses import replace

    send_part, put_whole = storage._send_part, storage._put_whole

    def flipped(data: bytes) -> bytes:
        return bytes([data[0] ^ 0xFF]) + data[1:]

    def damaged_part(upload, part):
        return send_part(upload, replace(part, data=flipped(part.data)) if part.number == 1 else part)

    def damaged_whole(name, data, sums, retain_until=None):
        return put_whole(name, flipped(data), sums, retain_until)

    storage._send_part = damaged_part  # type: ignore[method-assign]
    storage._put_whole = damaged_whole  # type: ignore[method-assign]
