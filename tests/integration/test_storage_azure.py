"""The Azure Blob provider against a real Azurite: the storage contract, corruption on the way, and
the errors an operator meets (wrong key, missing container, no permission, no network, a store that
stops answering), each permanent or transient as a retry would or would not help."""

from __future__ import annotations

import base64
import logging
import os
import pickle
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.emulators import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    azurite_connection_string,
    create_bucket,
    storage_env,
)
from tests.servers import free_port
from tests.storage_contract import MIB, CorruptionContract, StorageContract, write
from vq_tasks.settings import load_settings
from vq_tasks.storage import open_storage
from vq_tasks.storage.base import StorageError
from vq_tasks.storage.upload import Part, UploadSums, part_digest

HTTP_LOG = "azure.core.pipeline.policies.http_logging_policy"


def new_container(azure) -> str:
    name = f"vq-test-{uuid.uuid4().hex[:8]}"
    create_bucket("Azure_Blob", azure, name)
    return name


def azure_settings(azure, container: str, prefix: str | None = None, **overrides):
    """Settings as an operator would set them for ``container/prefix`` in Azurite."""
    env = storage_env("Azure_Blob", azure, container, prefix or f"backups-{uuid.uuid4().hex[:8]}")
    values = {key.lower(): value for key, value in env.items()}
    return load_settings(**{**values, "celery_broker_url": "redis://127.0.0.1:1/0", **overrides})


def container_client(azure, container: str):
    from azure.storage.blob import ContainerClient

    return ContainerClient.from_connection_string(azure.extra["connection_string"], container)


@pytest.fixture(scope="class")
def container(azure) -> str:
    return new_container(azure)


@pytest.fixture
def storage_factory(azure, container):
    def factory(part_size_mb: int = 5, concurrency: int = 2, **overrides):
        settings = azure_settings(
            azure,
            container,
            backup_upload_part_size_mb=part_size_mb,
            backup_upload_concurrency=concurrency,
            **overrides,
        )
        return open_storage(settings)

    return factory


class TestAzureContract(StorageContract, CorruptionContract):
    def test_pickles_without_its_client(self, storage_factory):
        storage = storage_factory()
        write(storage, "a.json", b"{}")
        copy = pickle.loads(pickle.dumps(storage))
        assert copy.stat("a.json").size == 2 and copy._container() is storage._container()

    def test_list_shows_direct_children_only(self, storage_factory, azure, container):
        storage = storage_factory()
        write(storage, "top.json", b"{}")
        blobs = container_client(azure, container)
        blobs.upload_blob(storage.location.key("deeper/inside.json"), b"{}")
        blobs.upload_blob(f"{storage.location.key('top.json')}-not-ours/x", b"{}")
        assert [o.name for o in storage.list()] == ["top.json"]

    def test_failed_multipart_write_leaves_no_uncommitted_blocks(self, storage_factory, azure, container):
        storage = storage_factory()
        with pytest.raises(RuntimeError), storage.open_write("half.tar.gz") as out:
            out.write(os.urandom(11 * MIB))
            raise RuntimeError("the source died")
        blob = container_client(azure, container).get_blob_client(storage.location.key("half.tar.gz"))
        assert not blob.exists()
        from azure.core.exceptions import ResourceNotFoundError

        with pytest.raises(ResourceNotFoundError):
            blob.get_block_list("all")  # the staged blocks were dropped, not left for a week

    def test_commit_check_refuses_a_blob_unlike_what_was_sent(self, storage_factory):
        """Our own check after Put Block List (the committed blocks and the blob's size, against what
        was sent): a blob unlike the upload is refused and removed."""
        storage = storage_factory()
        data = os.urandom(3 * MIB)
        upload = storage._begin("checked.bin")
        receipt = storage._send_part(upload, Part(1, data, part_digest(data), last=True))
        wrong = UploadSums(len(data) + 1, part_digest(data + b"x"))  # as if a byte had been lost
        with pytest.raises(StorageError, match="size is 3145728, but 3145729 was sent") as failure:
            storage._complete(upload, [receipt], wrong)
        assert not failure.value.transient
        assert storage.stat("checked.bin") is None

    def test_stored_md5_is_ours_for_both_kinds_of_upload(self, storage_factory, azure, container):
        storage = storage_factory()
        small, large = os.urandom(1000), os.urandom(11 * MIB)
        write(storage, "small.bin", small)
        write(storage, "large.bin", large)
        blobs = container_client(azure, container)
        for name, data in (("small.bin", small), ("large.bin", large)):
            props = blobs.get_blob_client(storage.location.key(name)).get_blob_properties()
            assert bytes(props.content_settings.content_md5) == part_digest(data)


def test_wrong_key_is_permanent_names_the_variable_and_is_not_retried(azure, caplog):
    container = new_container(azure)
    wrong_key = base64.b64encode(os.urandom(64)).decode()
    settings = azure_settings(
        azure,
        container,
        azure_storage_connection_string=azurite_connection_string(azure.endpoint, key=wrong_key),
        backup_storage_retries=5,
    )
    storage = open_storage(settings)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger=HTTP_LOG), pytest.raises(StorageError) as failure:
        write(storage, "x.json", b"{}")
    elapsed = time.monotonic() - started
    requests = [r for r in caplog.records if r.name == HTTP_LOG and "Request URL" in r.getMessage()]
    message = str(failure.value)
    assert not failure.value.transient
    assert "AZURE_STORAGE_CONNECTION_STRING" in message and "authentication failed" in message
    assert wrong_key not in message and AZURITE_KEY not in message and "AccountKey" not in message
    assert len(requests) == 1, [r.getMessage() for r in requests]  # one Put Blob, no retries
    assert elapsed < 5


def test_missing_container_is_permanent_and_named(azure):
    missing = f"vq-test-{uuid.uuid4().hex[:8]}"
    storage = open_storage(azure_settings(azure, missing))
    for action in (lambda: write(storage, "x.json", b"{}"), storage.list, lambda: storage.stat("x.json")):
        with pytest.raises(StorageError) as failure:
            action()
        assert not failure.value.transient
        assert f"container {missing} does not exist in account {AZURITE_ACCOUNT}" in str(failure.value)
        assert "BACKUP_STORAGE_PATH" in str(failure.value)


def test_read_only_sas_may_read_but_not_write(azure):
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    container = new_container(azure)
    sas = generate_container_sas(
        AZURITE_ACCOUNT,
        container,
        account_key=AZURITE_KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )
    read_only = f"BlobEndpoint={azure.endpoint}/{AZURITE_ACCOUNT};SharedAccessSignature={sas}"
    storage = open_storage(azure_settings(azure, container, azure_storage_connection_string=read_only))
    assert storage.list() == []
    for size in (100, 6 * MIB):  # Put Blob, and Put Block
        with pytest.raises(StorageError) as failure:
            write(storage, "x.tar.gz", os.urandom(size))
        assert not failure.value.transient
        assert "may not" in str(failure.value) and "grant" in str(failure.value)
        assert sas not in str(failure.value) and "sig=" not in str(failure.value)


def test_connection_refused_is_transient(azure):
    container = new_container(azure)
    nowhere = azurite_connection_string(f"http://127.0.0.1:{free_port()}")
    settings = azure_settings(
        azure,
        container,
        azure_storage_connection_string=nowhere,
        backup_storage_retries=2,
        backup_storage_timeout=2,
    )
    storage = open_storage(settings)
    started = time.monotonic()
    with pytest.raises(StorageError) as failure:
        write(storage, "x.json", b"{}")
    assert failure.value.transient
    assert "cannot reach http://127.0.0.1" in str(failure.value) and "AccountKey" not in str(failure.value)
    assert time.monotonic() - started < 10
    with pytest.raises(StorageError) as failure:
        storage.stat("x.json")
    assert failure.value.transient


def test_frozen_store_times_out_transient_and_commits_nothing(azure):
    container = new_container(azure)
    prefix = f"frozen-{uuid.uuid4().hex[:8]}"
    quick = azure_settings(
        azure,
        container,
        prefix,
        backup_storage_timeout=1,
        backup_storage_retries=1,
        backup_upload_part_size_mb=5,
        backup_upload_concurrency=2,
    )
    storage = open_storage(quick)
    started = time.monotonic()
    azure.freeze()
    try:
        with pytest.raises(StorageError) as failure:
            write(storage, "stuck.tar.gz", os.urandom(11 * MIB))
        elapsed = time.monotonic() - started
    finally:
        azure.thaw()
    assert failure.value.transient
    assert elapsed < 15, f"{elapsed:.1f} s"
    time.sleep(1)  # let the thawed emulator finish whatever reached it
    after = open_storage(azure_settings(azure, container, prefix))
    assert after.stat("stuck.tar.gz") is None
    assert after.list() == []


def test_account_named_twice_must_agree(monkeypatch):
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(
        celery_broker_url="redis://127.0.0.1:1/0",
        backup_storage_provider="Azure_Blob",
        backup_storage_path="https://backupsacct.blob.core.windows.net/backups/vq",
        azure_storage_account="anotheracct",
        azure_storage_key=AZURITE_KEY,
    )
    with pytest.raises(StorageError, match="AZURE_STORAGE_ACCOUNT is 'anotheracct'") as failure:
        open_storage(settings)
    assert not failure.value.transient and AZURITE_KEY not in str(failure.value)


def test_key_or_managed_identity_reach_the_account_of_the_path(monkeypatch):
    """Without a connection string the path's account endpoint is used (no request is made here)."""
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT"):
        monkeypatch.delenv(name, raising=False)
    path = "https://backupsacct.blob.core.windows.net/backups/vq"
    common = {"celery_broker_url": "redis://127.0.0.1:1/0", "backup_storage_provider": "Azure_Blob"}
    keyed = open_storage(load_settings(**common, backup_storage_path=path, azure_storage_key=AZURITE_KEY))
    client = keyed._container()
    assert client.url == "https://backupsacct.blob.core.windows.net/backups"
    assert client.credential.account_name == "backupsacct"
    identity = open_storage(load_settings(**common, backup_storage_path=path.replace("/vq", "/other")))
    assert type(identity._container().credential).__name__ == "DefaultAzureCredential"
    assert keyed.describe() == f"Azure_Blob:{path}"


def test_damaged_small_object_is_caught_even_if_the_service_ignored_our_md5(azure, monkeypatch):
    """Were the transactional Content-MD5 lost on the way (a proxy, a lax emulator), the MD5 the
    service computed of what it stored is still compared with ours, and the blob is removed."""
    from azure.storage.blob import BlobClient

    from tests.storage_contract import flip_one_byte_on_the_way

    upload_blob = BlobClient.upload_blob

    def without_our_md5(self, data, **kwargs):
        kwargs.pop("transactional_content_md5", None)
        return upload_blob(self, data, **kwargs)

    monkeypatch.setattr(BlobClient, "upload_blob", without_our_md5)
    storage = open_storage(azure_settings(azure, new_container(azure)))
    flip_one_byte_on_the_way(storage)
    with pytest.raises(StorageError, match="MD5 is") as failure:
        write(storage, "damaged.json", os.urandom(1000))
    assert not failure.value.transient
    assert storage.stat("damaged.json") is None


def test_malformed_connection_string_is_permanent_and_not_echoed(azure):
    broken = f"AccountKey={AZURITE_KEY}"  # neither an account nor an endpoint
    settings = azure_settings(azure, "vq-never", azure_storage_connection_string=broken)
    storage = open_storage(settings)
    with pytest.raises(StorageError, match="AZURE_STORAGE_CONNECTION_STRING is not a valid") as failure:
        storage.stat("x.json")
    assert not failure.value.transient and AZURITE_KEY not in str(failure.value)
