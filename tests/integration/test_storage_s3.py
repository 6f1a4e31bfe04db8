"""The AWS S3 provider against moto's S3 server with IAM authentication on: the storage contract,
checksums that catch corruption, and errors that say what to fix without a retry storm."""

from __future__ import annotations

import os
import pickle
import re
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.emulators import create_bucket, moto_limited_user, s3_client, storage_env
from tests.servers import free_port
from tests.storage_contract import CorruptionContract, StorageContract, write
from vq_tasks.settings import load_settings
from vq_tasks.storage import open_storage
from vq_tasks.storage.base import StorageError
from vq_tasks.storage.s3 import S3Storage

MIB = 1 << 20


def unique(kind: str) -> str:
    return f"vq-{kind}-{uuid.uuid4().hex[:8]}"


def open_s3(emulator, bucket: str, prefix: str | None = None, **overrides) -> S3Storage:
    """Return the storage an operator's settings would open on ``bucket/prefix`` in ``emulator``."""
    env = storage_env("AWS_S3", emulator, bucket, prefix or unique("run"))
    values = {k.lower(): v for k, v in env.items()} | {"celery_broker_url": "redis://127.0.0.1:1/0"}
    storage = open_storage(load_settings(**(values | overrides)))
    assert isinstance(storage, S3Storage)
    return storage


def requests_seen(emulator) -> int:
    """How many requests moto has logged so far (one line each, some of them coloured)."""
    return len(re.findall(r"^127\.0\.0\.1 - - \[", emulator.log_text(), flags=re.MULTILINE))


@pytest.fixture(scope="class")
def bucket(s3) -> str:
    name = unique("test")
    create_bucket("AWS_S3", s3, name)
    return name


class TestS3Contract(StorageContract, CorruptionContract):
    @pytest.fixture
    def storage_factory(self, s3, bucket):
        def factory(part_size_mb: int = 5, concurrency: int = 2) -> S3Storage:
            return open_s3(
                s3,
                bucket,
                backup_upload_part_size_mb=part_size_mb,
                backup_upload_concurrency=concurrency,
            )

        return factory


class TestS3Checks:
    def test_describe_is_the_path(self, s3, bucket):
        storage = open_s3(s3, bucket, "daily/db")
        assert storage.describe() == f"AWS_S3:s3://{bucket}/daily/db"

    def test_objects_in_sub_folders_are_not_listed(self, s3, bucket):
        storage = open_s3(s3, bucket, "top")
        write(storage, "mine.json", b"1")
        s3_client(s3).put_object(Bucket=bucket, Key="top/deeper/other.json", Body=b"2")
        s3_client(s3).put_object(Bucket=bucket, Key="top-sibling.json", Body=b"3")
        assert [o.name for o in storage.list()] == ["mine.json"]

    def test_stale_multipart_upload_is_aborted(self, s3, bucket):
        storage = open_s3(s3, bucket, "stale")
        client = s3_client(s3)
        left = client.create_multipart_upload(Bucket=bucket, Key="stale/killed.tar.gz")["UploadId"]
        client.upload_part(Bucket=bucket, Key="stale/killed.tar.gz", UploadId=left, PartNumber=1, Body=b"x")
        client.create_multipart_upload(Bucket=bucket, Key="stale/deeper/not-ours.tar.gz")
        # moto reports every upload as begun in 2010, so only "older than now" can be checked here
        assert storage.abort_stale_uploads(datetime.now(UTC) + timedelta(minutes=1)) == ["killed.tar.gz"]
        open_uploads = client.list_multipart_uploads(Bucket=bucket, Prefix="stale/").get("Uploads", [])
        assert [u["Key"] for u in open_uploads] == ["stale/deeper/not-ours.tar.gz"]
        assert storage.abort_stale_uploads(datetime.now(UTC) + timedelta(minutes=1)) == []
        assert storage.list() == []


class TestS3Errors:
    @pytest.mark.parametrize(
        ("keys", "named"),
        [
            ({"aws_secret_access_key": "wrong-secret-value-1234"}, "AWS_SECRET_ACCESS_KEY"),
            ({"aws_access_key_id": "AKIANOTKNOWNATALL000"}, "AWS_ACCESS_KEY_ID"),
        ],
    )
    def test_bad_credentials_are_permanent_and_not_retried(self, s3, bucket, keys, named):
        storage = open_s3(s3, bucket, **keys)
        before = requests_seen(s3)
        for action in (lambda: write(storage, "x.json", b"{}"), storage.list, lambda: storage.stat("x.json")):
            with pytest.raises(StorageError) as failure:
                action()
            message = str(failure.value)
            assert not failure.value.transient
            assert named in message and bucket in message
            for secret in (s3.extra["aws_secret_access_key"], "wrong-secret-value-1234"):
                assert secret not in message
        assert requests_seen(s3) - before <= 3  # one request each: refused credentials are not retried

    def test_offsite_errors_name_the_offsite_variables(self, s3, bucket):
        settings = load_settings(
            celery_broker_url="redis://127.0.0.1:1/0",
            backup_offsite_provider="AWS_S3",
            backup_offsite_path=f"s3://{bucket}/{unique('offsite')}",
            backup_offsite_aws_endpoint_url=s3.endpoint,
            backup_offsite_aws_region="us-east-1",
            backup_offsite_aws_access_key_id=s3.extra["aws_access_key_id"],
            backup_offsite_aws_secret_access_key="wrong-secret-value-1234",
        )
        with pytest.raises(StorageError, match="BACKUP_OFFSITE_AWS_SECRET_ACCESS_KEY") as failure:
            open_storage(settings, "offsite").list()
        assert "wrong-secret-value-1234" not in str(failure.value)

    def test_missing_bucket_is_permanent(self, s3):
        missing = unique("missing")
        storage = open_s3(s3, missing)
        for action in (lambda: write(storage, "x.json", b"{}"), storage.list):
            with pytest.raises(StorageError, match=f"bucket {missing} does not exist") as failure:
                action()
            assert not failure.value.transient
            assert "BACKUP_STORAGE_PATH" in str(failure.value)

    def test_missing_permission_is_named(self, s3, bucket):
        keys = moto_limited_user(s3, ["s3:ListBucket", "s3:GetObject"])
        storage = open_s3(s3, bucket, **keys)
        assert storage.list() == []  # allowed
        for size in (100, 6 * MIB):  # a whole object, and a multipart upload
            with pytest.raises(StorageError, match="s3:PutObject") as failure:
                write(storage, "x.tar.gz", os.urandom(size))
            assert not failure.value.transient
            assert "may not write to" in str(failure.value)
            assert keys["aws_secret_access_key"] not in str(failure.value)

    def test_connection_refused_is_transient(self, s3, bucket):
        nowhere = f"http://127.0.0.1:{free_port()}"
        storage = open_s3(
            s3, bucket, aws_endpoint_url=nowhere, backup_storage_retries=2, backup_storage_timeout=1
        )
        attempts = []
        storage.client.meta.events.register("before-send.s3", lambda **_: attempts.append(1))
        started = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach") as failure:
            write(storage, "x.json", b"{}")
        assert failure.value.transient
        assert nowhere in str(failure.value)
        assert len(attempts) == 2  # BACKUP_STORAGE_RETRIES attempts in all
        assert time.monotonic() - started < 15

    @pytest.mark.parametrize("size", [100, 12 * MIB])
    def test_store_that_stops_answering_is_transient_and_commits_nothing(self, s3, bucket, size):
        storage = open_s3(
            s3, bucket, backup_storage_timeout=1, backup_storage_retries=1, backup_upload_part_size_mb=5
        )
        data = os.urandom(size)
        started = time.monotonic()
        try:
            with pytest.raises(StorageError) as failure, storage.open_write("frozen.tar.gz") as out:
                out.write(data[: 6 * MIB])  # 12 MiB: a multipart upload is under way, part 1 sent
                s3.freeze()
                out.write(data[6 * MIB :])
        finally:
            s3.thaw()
        elapsed = time.monotonic() - started
        assert failure.value.transient and "cannot reach" in str(failure.value)
        assert elapsed < 10, f"took {elapsed:.1f} s to notice"
        time.sleep(0.5)  # moto answers what reached it while frozen
        assert storage.stat("frozen.tar.gz") is None
        assert storage.list() == []
        storage.abort_stale_uploads(datetime.now(UTC) + timedelta(minutes=1))  # debris of the frozen time

    def test_download_that_stops_is_transient(self, s3, bucket):
        prefix = unique("run")
        storage = open_s3(s3, bucket, prefix, backup_storage_timeout=1, backup_storage_retries=1)
        # more than loopback TCP can buffer (tcp_rmem's 32 MiB and tcp_wmem's 4 MiB here): with 48 MiB a
        # quiet machine had the whole rest in buffers before the freeze, and the read never stopped.
        # Written with the default timeout: on a busy machine moto may take over 1 s to join the parts
        write(open_s3(s3, bucket, prefix), "large.bin", os.urandom(128 * MIB), chunk=8 * MIB)
        try:
            with (
                pytest.raises(StorageError, match="cannot reach") as failure,
                storage.open_read("large.bin") as f,
            ):
                f.read(MIB)
                s3.freeze()
                while f.read(MIB):
                    pass
        finally:
            s3.thaw()
        assert failure.value.transient


class TestS3Integrity:
    def test_completed_upload_whose_etag_differs_is_deleted(self, s3, bucket):
        storage = open_s3(s3, bucket, backup_upload_part_size_mb=5)
        complete = storage._complete

        def assembled_otherwise(upload, receipts, sums):
            sums.part_md5s[0] = bytes(16)  # as if S3 had joined other parts than those we sent
            return complete(upload, receipts, sums)

        storage._complete = assembled_otherwise  # type: ignore[method-assign]
        with pytest.raises(StorageError, match="ETag") as failure:
            write(storage, "joined.tar.gz", os.urandom(11 * MIB))
        assert not failure.value.transient
        assert storage.stat("joined.tar.gz") is None
        assert storage.abort_stale_uploads(datetime.now(UTC) + timedelta(minutes=1)) == []

    def test_one_client_per_process_and_destination(self, s3, bucket):
        one, two = open_s3(s3, bucket), open_s3(s3, bucket)
        assert one.client is two.client
        assert pickle.loads(pickle.dumps(one)).client is one.client  # the client itself is never pickled
        parent = one.client
        pid = os.fork()
        if pid == 0:  # a forked worker builds its own client, and it works
            try:
                os._exit(0 if one.client is not parent and one.list() == [] else 1)
            finally:
                os._exit(2)
        assert os.waitpid(pid, 0)[1] == 0
