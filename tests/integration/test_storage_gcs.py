"""The Google Cloud Storage provider against gcp-storage-emulator: the storage contract, checksums
that catch corruption, resumed chunks, and errors that say what to fix without a retry storm.

``tests.emulators.gcs_client`` (used by ``create_bucket``) sets STORAGE_EMULATOR_HOST in this
process for good; every test here runs with it removed, so that the emulator is reached only
through the settings, as an operator's worker would be."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from tests.emulators import create_bucket, gcs_client, storage_env
from tests.servers import free_port
from tests.storage_contract import CorruptionContract, StorageContract, read, write
from vq_tasks.settings import load_settings
from vq_tasks.storage import open_storage
from vq_tasks.storage.base import StorageError
from vq_tasks.storage.gcs import GCSStorage

MIB = 1 << 20
BROKER = "redis://127.0.0.1:1/0"  # never reached: the settings only need one


def unique(kind: str) -> str:
    return f"vq-{kind}-{uuid.uuid4().hex[:8]}"


def open_gcs(emulator, bucket: str, prefix: str | None = None, **overrides) -> GCSStorage:
    """Return the storage an operator's settings would open on ``bucket/prefix`` in ``emulator``."""
    env = storage_env("Google_Cloud", emulator, bucket, prefix or unique("run"))
    values = {k.lower(): v for k, v in env.items()} | {"celery_broker_url": BROKER}
    storage = open_storage(load_settings(**(values | overrides)))
    assert isinstance(storage, GCSStorage)
    return storage


def open_real_gcs(**overrides) -> GCSStorage:
    """Return a storage on Google's own service (no emulator), which the tests never reach."""
    values = {
        "backup_storage_provider": "Google_Cloud",
        "backup_storage_path": "gs://vq-nowhere/backups",
        "storage_emulator_host": None,
        "google_application_credentials": None,
        "celery_broker_url": BROKER,
    }
    storage = open_storage(load_settings(**(values | overrides)))
    assert isinstance(storage, GCSStorage)
    return storage


def raw_bucket(emulator, bucket: str):
    """The bucket through a client of its own, for looking behind the provider's back."""
    return gcs_client(emulator).bucket(bucket)


@pytest.fixture(autouse=True)
def no_emulator_variable(monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)


@pytest.fixture(scope="class")
def bucket(gcs) -> str:
    name = unique("test")
    create_bucket("Google_Cloud", gcs, name)
    return name


class TestGCSContract(StorageContract, CorruptionContract):
    @pytest.fixture
    def storage_factory(self, gcs, bucket):
        def factory(part_size_mb: int = 5, concurrency: int = 2) -> GCSStorage:
            return open_gcs(
                gcs,
                bucket,
                backup_upload_part_size_mb=part_size_mb,
                backup_upload_concurrency=concurrency,
            )

        return factory


class TestGCSChecks:
    def test_describe_is_the_path(self, gcs, bucket):
        storage = open_gcs(gcs, bucket, "daily/db")
        assert storage.describe() == f"Google_Cloud:gs://{bucket}/daily/db"

    def test_parts_are_sent_in_order_in_multiples_of_256_kib(self, gcs, bucket):
        storage = open_gcs(gcs, bucket, backup_upload_part_size_mb=5, backup_upload_concurrency=4)
        assert (storage.concurrency, storage.part_size % (256 << 10)) == (1, 0)

    def test_pickles_without_its_client(self, gcs, bucket):
        import pickle

        storage = open_gcs(gcs, bucket)
        write(storage, "x.json", b"{}")  # the client is built, and kept out of the storage
        assert pickle.loads(pickle.dumps(storage)).read_bytes("x.json") == b"{}"

    def test_objects_in_sub_folders_are_not_listed(self, gcs, bucket):
        storage = open_gcs(gcs, bucket, "top")
        write(storage, "mine.json", b"1")
        raw = raw_bucket(gcs, bucket)
        raw.blob("top/deeper/other.json").upload_from_string(b"2")
        raw.blob("top-sibling.json").upload_from_string(b"3")
        raw.blob("top/").upload_from_string(b"")  # a folder placeholder, as the console makes
        assert [o.name for o in storage.list()] == ["mine.json"]

    def test_stored_checksums_are_the_ones_we_computed(self, gcs, bucket):
        """Measured: the emulator reports md5Hash and crc32c for resumable uploads too."""
        import base64
        import hashlib

        import google_crc32c

        storage = open_gcs(gcs, bucket, "sums")
        data = os.urandom(12 * MIB + 7)
        write(storage, "big.bin", data)
        stored = raw_bucket(gcs, bucket).get_blob("sums/big.bin")
        assert stored.md5_hash == base64.b64encode(hashlib.md5(data).digest()).decode()
        assert stored.crc32c == base64.b64encode(google_crc32c.Checksum(data).digest()).decode()

    def test_the_setting_wins_over_the_environment(self, gcs, bucket, monkeypatch):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing there
        storage = open_gcs(gcs, bucket)
        write(storage, "x.json", b"{}")
        assert storage.read_bytes("x.json") == b"{}"

    def test_a_chunk_whose_answer_is_lost_is_resumed(self, gcs, bucket):
        """The service committed a chunk but the answer never came: the retry asks the session
        how much it holds and sends only the rest."""
        storage = open_gcs(gcs, bucket, backup_storage_retries=3, backup_upload_part_size_mb=5)
        put_chunk, lost = storage._put_chunk, []

        def answer_lost_once(upload, data, total, crc32c):
            put_chunk(upload, data, total, crc32c)
            if upload.offset > 5 * MIB and not lost:
                lost.append(upload.offset)
                raise StorageError("connection reset", transient=True)

        storage._put_chunk = answer_lost_once  # type: ignore[method-assign]
        data = os.urandom(13 * MIB)
        write(storage, "resumed.bin", data)
        assert lost == [10 * MIB]
        assert read(storage, "resumed.bin") == data

    def test_a_frozen_store_mid_read_is_a_transient_error(self, gcs, bucket):
        storage = open_gcs(gcs, bucket, backup_storage_timeout=1, backup_storage_retries=1)
        write(storage, "read-me.bin", os.urandom(12 * MIB))
        with storage.open_read("read-me.bin") as stream:
            assert len(stream.read(MIB)) == MIB  # the first range is in
            gcs.freeze()
            try:
                started = time.monotonic()
                with pytest.raises(StorageError) as failure:
                    while stream.read(MIB):
                        pass
            finally:
                gcs.thaw()
        assert failure.value.transient and time.monotonic() - started < 15
        assert "cannot reach" in str(failure.value)


class TestGCSErrors:
    def test_missing_key_file_names_the_variable(self, tmp_path):
        storage = open_real_gcs(google_application_credentials=tmp_path / "gone.json")
        with pytest.raises(StorageError) as failure:
            storage.list()
        assert not failure.value.transient
        assert "GOOGLE_APPLICATION_CREDENTIALS" in str(failure.value) and "gone.json" in str(failure.value)

    @pytest.mark.parametrize(
        "content",
        [
            '{"type": "service_account", "private_key": "TOP-SECRET-42',
            '{"type": "service_account", "x": "TOP-SECRET-42"}',
        ],
        ids=["not-json", "not-a-key"],
    )
    def test_malformed_key_file_is_not_quoted(self, tmp_path, content):
        key = tmp_path / "key.json"
        key.write_text(content)
        storage = open_real_gcs(google_application_credentials=key)
        with pytest.raises(StorageError) as failure:
            write(storage, "a.json", b"{}")
        message = str(failure.value)
        assert not failure.value.transient
        assert "GOOGLE_APPLICATION_CREDENTIALS" in message and "not a valid" in message
        assert "TOP-SECRET" not in message and failure.value.__cause__ is None

    def test_missing_bucket(self, gcs):
        storage = open_gcs(gcs, "vq-never-made")
        for action in (
            lambda: write(storage, "a.json", b"{}"),
            lambda: write(storage, "b", bytes(6 * MIB)),
            storage.list,
        ):
            with pytest.raises(StorageError) as failure:
                action()
            assert not failure.value.transient
            assert "vq-never-made does not exist" in str(failure.value)
            assert "BACKUP_STORAGE_PATH" in str(failure.value)

    def test_connection_refused_is_transient(self, gcs, bucket):
        storage = open_gcs(
            gcs,
            bucket,
            storage_emulator_host=f"http://127.0.0.1:{free_port()}",
            backup_storage_retries=2,
            backup_storage_timeout=2,
        )
        started = time.monotonic()
        for action in (storage.list, lambda: write(storage, "a.json", b"{}")):
            with pytest.raises(StorageError) as failure:
                action()
            assert failure.value.transient
            assert "cannot reach" in str(failure.value) and "refused" in str(failure.value).lower()
        assert time.monotonic() - started < 15

    def test_frozen_store_mid_upload_fails_fast_and_commits_nothing(self, gcs, bucket):
        storage = open_gcs(
            gcs, bucket, backup_storage_timeout=1, backup_storage_retries=1, backup_upload_part_size_mb=5
        )
        send_part, sent = storage._send_part, threading.Event()

        def observed(upload, part):
            receipt = send_part(upload, part)
            sent.set()
            return receipt

        storage._send_part = observed  # type: ignore[method-assign]
        started = time.monotonic()
        try:
            with pytest.raises(StorageError) as failure, storage.open_write("frozen.tar.gz") as out:
                out.write(os.urandom(6 * MIB))  # the first part goes up
                assert sent.wait(30)
                gcs.freeze()
                started = time.monotonic()
                out.write(os.urandom(6 * MIB))  # the second part hangs
        finally:
            gcs.thaw()
        assert failure.value.transient, failure.value
        assert time.monotonic() - started < 15
        assert storage.stat("frozen.tar.gz") is None
        assert [o.name for o in storage.list()] == []
