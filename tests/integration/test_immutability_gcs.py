"""BACKUP_IMMUTABILITY on Google Cloud Storage against gcp-storage-emulator, and what it cannot show.

The emulator (2026.7.19) ignores ``enableObjectRetention`` when creating a bucket and never reports
``objectRetention``; it drops the ``retention`` of an object's metadata on upload and on PATCH, and
deletes every object. It does store a bucket's ``retentionPolicy`` (set by PATCH) and returns it,
without enforcing it. So:

- against the emulator itself: lock_problems names the missing object retention and its fix, and
  compares a bucket retention policy with the shortest retention; a locked write, which the
  emulator stores without a lock, is refused and deleted again (simple and resumable uploads);
- through ``WireProxy`` in front of the emulator: what goes on the wire (the ``retention`` in the
  metadata of both kinds of upload) and how the documented answers of a bucket with object
  retention are read (the object's ``retention``, the 403 to a delete, the bucket's
  ``objectRetention``). Those answers are the proxy's, written from Google's documentation; the
  wording of the real 403 messages in particular was not checked against the service.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import unquote

import pytest
from google.api_core.datetime_helpers import from_rfc3339

from tests.emulators import create_bucket, gcs_client, storage_env
from tests.lock_stand_in import Exchange, Forward, Handler, WireProxy, soon, whole_second_up, write_locked
from tests.storage_contract import MIB
from vq_tasks.settings import load_settings
from vq_tasks.storage import open_storage
from vq_tasks.storage.base import ObjectLocked, StorageError
from vq_tasks.storage.gcs import GCSStorage

BROKER = "redis://127.0.0.1:1/0"  # never reached: the settings only need one
WEEK = timedelta(days=7)
OBJECT_PATH = re.compile(r"^/storage/v1/b/[^/]+/o/([^?]+)")


# A stand-in for a bucket with object retention, in front of the emulator


def upload_metadata(request: Exchange) -> dict | None:
    """Return the object metadata a simple (multipart) or resumable upload starts with."""
    if request.method != "POST" or not request.path.startswith("/upload/"):
        return None
    if "uploadType=resumable" in request.path:
        return json.loads(request.body)
    found = re.search(rb"\r\n\r\n(\{.*?\})\r\n--", request.body, re.S)  # the JSON part comes first
    return json.loads(found.group(1)) if found else None


class KeepsRetention:
    """A proxy handler that makes the emulator look like a bucket with object retention: the
    retention an upload carried is reported in the object's resource, and a delete of such an
    object is refused with 403, as the service does."""

    def __init__(self, refusal_message: str = "Object '{name}' is subject to object retention"):
        self.retention: dict[str, dict] = {}
        self.uploads: list[dict] = []
        self.refusal_message = refusal_message

    def __call__(self, request: Exchange, forward: Forward) -> Exchange:
        metadata = upload_metadata(request)
        if metadata is not None:
            self.uploads.append(metadata)
            if "retention" in metadata:
                self.retention[metadata["name"]] = metadata["retention"]
        target = OBJECT_PATH.match(request.path)
        if request.method == "DELETE" and target and unquote(target.group(1)) in self.retention:
            return forbidden(self.refusal_message.format(name=unquote(target.group(1))))
        return self._with_retention(forward())

    def _with_retention(self, answer: Exchange) -> Exchange:
        if "json" not in answer.headers.get("content-type", ""):
            return answer
        resource = json.loads(answer.body or b"{}")
        if resource.get("kind") == "storage#object" and resource.get("name") in self.retention:
            resource["retention"] = self.retention[resource["name"]]
            answer.body = json.dumps(resource).encode()
        return answer


def forbidden(message: str) -> Exchange:
    """A JSON API error of status 403 saying ``message``."""
    error = {
        "code": 403,
        "message": message,
        "errors": [{"message": message, "domain": "global", "reason": "forbidden"}],
    }
    return Exchange(
        headers={"content-type": "application/json"}, body=json.dumps({"error": error}).encode(), status=403
    )


def with_bucket_fields(fields: dict) -> Handler:
    """A proxy handler adding ``fields`` to the bucket's resource."""

    def handler(request: Exchange, forward: Forward) -> Exchange:
        answer = forward()
        if request.method == "GET" and re.match(r"^/storage/v1/b/[^/?]+(\?|$)", request.path):
            answer.body = json.dumps(json.loads(answer.body) | fields).encode()
        return answer

    return handler


# Fixtures and helpers


@pytest.fixture(autouse=True)
def no_emulator_variable(monkeypatch):
    """The emulator is reached through the settings only, as by an operator's worker."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)


@pytest.fixture
def bucket(gcs) -> str:
    name = f"vq-lock-{uuid.uuid4().hex[:8]}"
    create_bucket("Google_Cloud", gcs, name)
    return name


@pytest.fixture
def proxy(gcs) -> Iterator[WireProxy]:
    wire = WireProxy(gcs.port)
    yield wire
    wire.close()


def open_gcs(gcs, bucket: str, endpoint: str | None = None, **overrides) -> GCSStorage:
    """Return the storage an operator's settings open on ``bucket`` (reached at ``endpoint``: the
    proxy, say), with BACKUP_IMMUTABILITY on unless overridden."""
    env = storage_env("Google_Cloud", gcs, bucket, f"run-{uuid.uuid4().hex[:8]}", endpoint)
    values = {k.lower(): v for k, v in env.items()} | {"celery_broker_url": BROKER}
    values |= {"backup_immutability": True, "backup_upload_part_size_mb": 5}
    storage = open_storage(load_settings(**(values | overrides)))
    assert isinstance(storage, GCSStorage)
    return storage


def set_retention_policy(gcs, bucket: str, seconds: int, locked: bool = False) -> None:
    """Give ``bucket`` a retention policy through the JSON API (the emulator stores it as given)."""
    handle = gcs_client(gcs).bucket(bucket)
    handle._patch_property("retentionPolicy", {"retentionPeriod": str(seconds), "isLocked": locked})
    handle.patch()


SIZES = pytest.mark.parametrize("size", [1000, 11 * MIB], ids=["simple", "resumable"])


# Against the emulator itself


def test_lock_problems_name_the_missing_object_retention_and_the_fix(gcs, bucket):
    problems = open_gcs(gcs, bucket).lock_problems(WEEK)
    assert len(problems) == 1, problems
    assert f"bucket {bucket} does not have object retention" in problems[0]
    assert f"gcloud storage buckets create gs://{bucket} --enable-per-object-retention" in problems[0]
    assert "Protection > Object retention" in problems[0] and "turn BACKUP_IMMUTABILITY off" in problems[0]


def test_a_retention_policy_longer_than_the_shortest_retention_is_a_problem(gcs, bucket):
    set_retention_policy(gcs, bucket, 30 * 86400)
    storage = open_gcs(gcs, bucket)
    problems = storage.lock_problems(WEEK)
    assert len(problems) == 2, problems
    policy = problems[1]
    assert f"bucket {bucket} has a retention policy that keeps every object 30 days" in policy
    assert "longer than the 7 days retention keeps a backup" in policy
    assert f"gcloud storage buckets update gs://{bucket} --retention-period=604800s" in policy
    assert "--clear-retention-period" in policy
    assert len(storage.lock_problems(timedelta(days=30))) == 1  # as long as the shortest: fine
    assert len(storage.lock_problems(timedelta(days=60))) == 1


def test_a_locked_retention_policy_cannot_be_shortened_and_says_so(gcs, bucket):
    set_retention_policy(gcs, bucket, 90 * 86400, locked=True)
    problems = open_gcs(gcs, bucket).lock_problems(WEEK)
    assert "keeps every object 90 days" in problems[1]
    assert "the policy is locked and cannot be shortened" in problems[1]
    assert "--retention-period" not in problems[1]


@SIZES
def test_a_locked_write_that_the_emulator_stores_unlocked_is_refused_and_deleted(gcs, bucket, size):
    storage = open_gcs(gcs, bucket, backup_immutability_mode="compliance")
    until = soon()
    with pytest.raises(StorageError) as failure:
        write_locked(storage, "unlocked.bin", os.urandom(size), until)
    message = str(failure.value)
    assert "stored the object without a lock instead of locked until" in message
    assert f"{whole_second_up(until):%Y-%m-%d %H:%M:%S} UTC (Locked)" in message
    assert f"enable object retention on bucket {bucket}" in message
    assert not failure.value.transient
    assert storage.stat("unlocked.bin") is None


def test_an_unlocked_write_is_kept_and_has_no_retention(gcs, bucket):
    storage = open_gcs(gcs, bucket, backup_immutability=False)
    with storage.open_write("plain.bin") as out:
        out.write(b"plain")
    assert storage.retention("plain.bin") is None and storage.retention("missing.bin") is None
    assert storage.delete("plain.bin") is True


# Through the proxy: the wire, and the documented answers of a bucket with object retention


@SIZES
@pytest.mark.parametrize(("mode", "retention_mode"), [("governance", "Unlocked"), ("compliance", "Locked")])
def test_the_retention_goes_with_the_upload_and_is_read_back(gcs, bucket, proxy, size, mode, retention_mode):
    keeps = KeepsRetention()
    proxy.handler = keeps
    storage = open_gcs(gcs, bucket, proxy.endpoint, backup_immutability_mode=mode)
    until = soon(days=30)
    write_locked(storage, "locked.bin", os.urandom(size), until)
    assert len(keeps.uploads) == 1, [r.path for r in proxy.requests]
    sent = keeps.uploads[0]["retention"]
    assert sent.keys() == {"mode", "retainUntilTime"}  # nothing of the service's own fields
    assert sent["mode"] == retention_mode
    assert from_rfc3339(sent["retainUntilTime"]) == whole_second_up(until)
    assert storage.retention("locked.bin") == whole_second_up(until)
    assert storage.stat("locked.bin") is not None


@SIZES
def test_a_compliance_write_stored_with_unlocked_retention_is_refused(gcs, bucket, proxy, size):
    keeps = KeepsRetention()

    def weakens(request: Exchange, forward: Forward) -> Exchange:
        metadata = upload_metadata(request)
        if metadata is not None:  # the service keeping the date but not the mode
            keeps.retention[metadata["name"]] = metadata["retention"] | {"mode": "Unlocked"}
        return keeps._with_retention(forward())

    proxy.handler = weakens
    storage = open_gcs(gcs, bucket, proxy.endpoint, backup_immutability_mode="compliance")
    with pytest.raises(
        StorageError, match=r"stored the object locked until .* \(Unlocked\) instead of"
    ) as failure:
        write_locked(storage, "weak.bin", os.urandom(size), soon(days=30))
    assert "(Locked) as BACKUP_IMMUTABILITY asks" in str(failure.value)
    assert storage.stat("weak.bin") is None


def test_a_delete_refused_by_object_retention_raises_object_locked_with_its_end(gcs, bucket, proxy):
    proxy.handler = KeepsRetention()
    storage = open_gcs(gcs, bucket, proxy.endpoint)
    until = soon(days=30)
    write_locked(storage, "kept.bin", b"kept", until)
    with pytest.raises(ObjectLocked) as refused:
        storage.delete("kept.bin")
    assert refused.value.until == whole_second_up(until)
    assert f"kept.bin is locked until {whole_second_up(until):%Y-%m-%d %H:%M:%S} UTC" in str(refused.value)
    assert storage.stat("kept.bin") is not None


def test_a_delete_refused_by_a_hold_raises_object_locked_without_an_end(gcs, bucket, proxy):
    held = "Object '{name}' is under active Event-Based hold and cannot be deleted, overwritten or archived"
    keeps = KeepsRetention(refusal_message=held)
    proxy.handler = keeps
    storage = open_gcs(gcs, bucket, proxy.endpoint, backup_immutability=False)
    with storage.open_write("held.bin") as out:
        out.write(b"held")
    keeps.retention[storage.location.key("held.bin")] = {}  # refused, with no retain-until time
    with pytest.raises(ObjectLocked, match=r"held\.bin is locked by a hold or a retention policy") as refused:
        storage.delete("held.bin")
    assert refused.value.until is None


def test_a_delete_refused_for_want_of_permission_stays_a_permission_error(gcs, bucket, proxy):
    storage = open_gcs(gcs, bucket, proxy.endpoint, backup_immutability=False)
    with storage.open_write("mine.bin") as out:
        out.write(b"mine")
    denied = "backup@vq.iam.gserviceaccount.com does not have storage.objects.delete access to the object."

    def refuses(request: Exchange, forward: Forward) -> Exchange:
        return forbidden(denied) if request.method == "DELETE" else forward()

    proxy.handler = refuses
    with pytest.raises(StorageError, match=r"needs storage\.objects\.delete") as failure:
        storage.delete("mine.bin")
    assert not isinstance(failure.value, ObjectLocked)


def test_a_bucket_with_object_retention_and_no_policy_has_no_problem(gcs, bucket, proxy):
    proxy.handler = with_bucket_fields({"objectRetention": {"mode": "Enabled"}})
    assert open_gcs(gcs, bucket, proxy.endpoint).lock_problems(WEEK) == []
