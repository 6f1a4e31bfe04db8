"""BACKUP_IMMUTABILITY on Azure Blob against Azurite, and what Azurite cannot show.

Azurite 3.35 accepts the immutability headers of Put Blob and Put Block List and drops them: it
stores no policy, reports none, lets every blob be deleted, answers Set Blob Immutability Policy and
Set Legal Hold with 501, and reports no container as having version-level immutability. So:

- against Azurite itself: lock_problems names the missing feature and its fix; a locked write,
  which Azurite stores without a lock, is refused and deleted again (small and block uploads); an
  aborted locked upload leaves its blocks to expire rather than commit an empty blob;
- through ``WireProxy`` in front of Azurite: what goes on the wire (the policy headers of Put Blob
  and Put Block List) and how the documented answers of a container that keeps locks are read
  (the policy in Get Blob Properties, 409 BlobImmutableDueToPolicy to Delete Blob, the container's
  immutability headers). Those answers are the proxy's, written from Azure's documentation; that
  the real service sends them so was not tested here.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from email.utils import parsedate_to_datetime

import pytest

from tests.emulators import create_bucket, storage_env
from tests.lock_stand_in import Exchange, Forward, Handler, WireProxy, soon, whole_second_up, write_locked
from tests.storage_contract import MIB
from vq_tasks.settings import load_settings
from vq_tasks.storage import open_storage
from vq_tasks.storage.azure import AzureStorage
from vq_tasks.storage.base import ObjectLocked, StorageError

BROKER = "redis://127.0.0.1:1/0"  # never reached: the settings only need one
POLICY_HEADERS = ("x-ms-immutability-policy-until-date", "x-ms-immutability-policy-mode")
WEEK = timedelta(days=7)


# A stand-in for a container with version-level immutability, in front of Azurite


class KeepsLocks:
    """A proxy handler that makes Azurite look like a container with version-level immutability:
    the policy a Put Blob or Put Block List carried is reported by Get Blob Properties, and Delete
    Blob of such a blob is refused with the service's 409 BlobImmutableDueToPolicy."""

    def __init__(self) -> None:
        self.policies: dict[str, dict[str, str]] = {}

    def __call__(self, request: Exchange, forward: Forward) -> Exchange:
        blob = request.path.split("?")[0]
        if request.method == "DELETE" and blob in self.policies:
            return refusal()
        answer = forward()
        policy = {name: request.headers[name] for name in POLICY_HEADERS if name in request.headers}
        if request.method == "PUT" and policy and answer.status == 201:
            mode = POLICY_HEADERS[1]
            self.policies[blob] = policy | {mode: policy[mode].lower()}  # the service answers "unlocked"
        if request.method == "HEAD" and answer.status == 200 and blob in self.policies:
            answer.headers.update(self.policies[blob])
        return answer


def refusal() -> Exchange:
    """Azure's answer to a delete of a blob under an immutability policy: the error code of the
    SDK's list (StorageErrorCode.BLOB_IMMUTABLE_DUE_TO_POLICY), the message as users report it."""
    body = (
        b'<?xml version="1.0" encoding="utf-8"?><Error><Code>BlobImmutableDueToPolicy</Code><Message>'
        b"This operation is not permitted as the blob is immutable due to a policy.</Message></Error>"
    )
    headers = {"x-ms-error-code": "BlobImmutableDueToPolicy", "content-type": "application/xml"}
    return Exchange(headers=headers, body=body, status=409)


def with_container_headers(extra: dict[str, str]) -> Handler:
    """A proxy handler adding ``extra`` to the answers of Get Container Properties."""

    def handler(request: Exchange, forward: Forward) -> Exchange:
        answer = forward()
        if request.method == "GET" and request.path.endswith("restype=container"):
            answer.headers.update(extra)
        return answer

    return handler


# Fixtures and helpers


@pytest.fixture(scope="module")
def container(azure) -> str:
    name = f"vq-lock-{uuid.uuid4().hex[:8]}"
    create_bucket("Azure_Blob", azure, name)
    return name


@pytest.fixture
def proxy(azure) -> Iterator[WireProxy]:
    wire = WireProxy(azure.port)
    yield wire
    wire.close()


def open_azure(azure, container: str, endpoint: str | None = None, **overrides) -> AzureStorage:
    """Return the storage an operator's settings open on ``container`` (reached at ``endpoint``:
    the proxy, say), with BACKUP_IMMUTABILITY on unless overridden."""
    env = storage_env("Azure_Blob", azure, container, f"run-{uuid.uuid4().hex[:8]}", endpoint)
    values = {k.lower(): v for k, v in env.items()} | {"celery_broker_url": BROKER}
    values |= {"backup_immutability": True, "backup_upload_part_size_mb": 5, "backup_upload_concurrency": 2}
    storage = open_storage(load_settings(**(values | overrides)))
    assert isinstance(storage, AzureStorage)
    return storage


SIZES = pytest.mark.parametrize("size", [1000, 11 * MIB], ids=["put-blob", "blocks"])


# Against Azurite itself


def test_lock_problems_name_the_missing_version_level_immutability_and_the_fix(azure, container):
    problems = open_azure(azure, container).lock_problems(WEEK)
    assert len(problems) == 1, problems
    problem = problems[0]
    assert f"container {container} does not have version-level immutability" in problem
    assert "az storage container-rm create --storage-account devstoreaccount1" in problem
    assert f"--name {container} --enable-vlw true" in problem
    assert (
        f"az storage container-rm migrate-vlw --storage-account devstoreaccount1 --name {container}"
        in problem
    )
    assert "--enable-versioning true" in problem and "turn BACKUP_IMMUTABILITY off" in problem


@SIZES
def test_a_locked_write_that_azurite_stores_unlocked_is_refused_and_deleted(azure, container, size):
    storage = open_azure(azure, container)
    until = soon()
    with pytest.raises(StorageError) as failure:
        write_locked(storage, "unlocked.bin", os.urandom(size), until)
    message = str(failure.value)
    assert "stored the blob without a lock instead of locked until" in message
    assert f"{whole_second_up(until):%Y-%m-%d %H:%M:%S} UTC (Unlocked)" in message
    assert f"enable version-level immutability on container {container}" in message
    assert not failure.value.transient
    assert storage.stat("unlocked.bin") is None


def test_an_unlocked_write_is_kept_and_has_no_retention(azure, container):
    storage = open_azure(azure, container, backup_immutability=False)
    with storage.open_write("plain.bin") as out:
        out.write(b"plain")
    assert storage.stat("plain.bin") is not None
    assert storage.retention("plain.bin") is None and storage.retention("missing.bin") is None
    assert storage.delete("plain.bin") is True


def test_an_aborted_locked_upload_leaves_its_blocks_to_expire(azure, container):
    """The usual clean-up commits an empty block list and deletes it; a container's default policy
    could lock that empty blob, so a locked upload leaves its blocks to expire instead."""
    storage = open_azure(azure, container)
    writer = storage.open_write("aborted.bin", retain_until=soon())
    with pytest.raises(RuntimeError, match="stop"), writer as out:
        out.write(os.urandom(6 * MIB))  # one block sent
        raise RuntimeError("stop")
    blob = storage._container().get_blob_client(storage.location.key("aborted.bin"))
    committed, uncommitted = blob.get_block_list("all")
    assert committed == [] and len(uncommitted) == 1
    assert storage.stat("aborted.bin") is None


# Through the proxy: the wire, and the documented answers of a container that keeps locks


@SIZES
@pytest.mark.parametrize(("mode", "policy_mode"), [("governance", "Unlocked"), ("compliance", "Locked")])
def test_the_policy_goes_with_the_commit_and_is_read_back(azure, container, proxy, size, mode, policy_mode):
    proxy.handler = KeepsLocks()
    storage = open_azure(azure, container, proxy.endpoint, backup_immutability_mode=mode)
    until = soon(days=30)
    write_locked(storage, "locked.bin", os.urandom(size), until)
    commits = [r for r in proxy.requests if r.method == "PUT" and "comp=block&" not in r.path]
    assert len(commits) == 1, [r.path for r in proxy.requests]  # Put Blob, or Put Block List
    sent = commits[0].headers
    assert parsedate_to_datetime(sent["x-ms-immutability-policy-until-date"]) == whole_second_up(until)
    assert sent["x-ms-immutability-policy-mode"] == policy_mode
    blocks = [r for r in proxy.requests if "comp=block&" in r.path]
    assert all(POLICY_HEADERS[0] not in r.headers for r in blocks)  # Put Block takes no policy
    assert storage.retention("locked.bin") == whole_second_up(until)
    assert storage.stat("locked.bin") is not None


def test_a_delete_refused_by_the_policy_raises_object_locked_with_its_end(azure, container, proxy):
    proxy.handler = KeepsLocks()
    storage = open_azure(azure, container, proxy.endpoint)
    until = soon(days=30)
    write_locked(storage, "kept.bin", b"kept", until)
    with pytest.raises(ObjectLocked) as refused:
        storage.delete("kept.bin")
    assert refused.value.until == whole_second_up(until)
    assert f"kept.bin is locked until {whole_second_up(until):%Y-%m-%d %H:%M:%S} UTC" in str(refused.value)
    assert storage.stat("kept.bin") is not None


def test_a_compliance_write_stored_with_an_unlocked_policy_is_refused(azure, container, proxy):
    keeps = KeepsLocks()

    def weakens(request: Exchange, forward: Forward) -> Exchange:
        answer = keeps(request, forward)
        if request.method == "HEAD" and POLICY_HEADERS[1] in answer.headers:
            answer.headers[POLICY_HEADERS[1]] = "unlocked"
        return answer

    proxy.handler = weakens
    storage = open_azure(azure, container, proxy.endpoint, backup_immutability_mode="compliance")
    until = soon(days=30)
    with pytest.raises(
        StorageError, match=r"stored the blob locked until .* \(unlocked\) instead of"
    ) as failure:
        write_locked(storage, "weak.bin", b"weak", until)
    assert "(Locked) as BACKUP_IMMUTABILITY asks" in str(failure.value)
    assert not isinstance(failure.value, ObjectLocked)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-ms-immutable-storage-with-versioning-enabled": "true"}, []),
        (
            {
                "x-ms-immutable-storage-with-versioning-enabled": "true",
                "x-ms-has-immutability-policy": "true",
            },
            [],  # a default version-level policy: every blob we write carries its own
        ),
        ({"x-ms-has-immutability-policy": "true"}, ["has a container-level retention policy"]),
        (
            {"x-ms-immutable-storage-with-versioning-enabled": "true", "x-ms-has-legal-hold": "true"},
            ["has a legal hold"],
        ),
    ],
    ids=["version-level", "version-level-with-default-policy", "container-level-only", "legal-hold"],
)
def test_lock_problems_read_the_container_properties(azure, container, proxy, headers, expected):
    proxy.handler = with_container_headers(headers)
    problems = open_azure(azure, container, proxy.endpoint).lock_problems(WEEK)
    assert len(problems) == len(expected), problems
    for problem, words in zip(problems, expected, strict=True):
        assert f"container {container} {words}" in problem
        assert "7 days" in problem
    if expected == ["has a container-level retention policy"]:
        assert (
            f"az storage container-rm migrate-vlw --storage-account devstoreaccount1 --name {container}"
            in (problems[0])
        )


def test_wire_proxy_passes_azurite_through_unchanged(azure, container, proxy):
    """The proxy itself changes nothing: without a handler, Azurite's own behaviour shows."""
    storage = open_azure(azure, container, proxy.endpoint)
    with pytest.raises(StorageError, match="without a lock"):
        write_locked(storage, "through.bin", b"x", soon())
    assert any(POLICY_HEADERS[0] in r.headers for r in proxy.requests)
