"""Google Cloud Storage: BACKUP_STORAGE_PATH is gs://bucket/prefix.

Large objects go up as one resumable upload session, its chunks (multiples of 256 KiB) sent in
order; the final chunk carries our CRC32C in X-Goog-Hash, so Cloud Storage itself refuses a
corrupted object, and the object resource it answers with is checked against our MD5 and CRC32C
as well (an object that does not match is deleted at once). Small objects go up in one request
whose metadata holds both checksums. An abandoned session is cancelled; one that cannot be
cancelled expires after a week and is never visible to ``list``.

With BACKUP_IMMUTABILITY on, each object carries its own retention configuration from the start
(in the metadata of the upload: mode "Unlocked" for governance, "Locked" for compliance, and the
retain-until time), which needs a bucket with object retention enabled. The retention the service
answers with is checked too: an object stored without the lock asked for is deleted again and the
write fails, so that a backup is never less protected than promised.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import json
import os
import re
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, TypeVar

import google.cloud.storage  # noqa: F401 - a missing SDK shows at import, as the registry expects

from vq_tasks.storage.base import ObjectLocked, StorageError, StoredObject, chunk_reader
from vq_tasks.storage.gcs_auth import KEY_VARIABLE, client_for
from vq_tasks.storage.location import Destination
from vq_tasks.storage.upload import Part, PartedStorage, UploadSums, with_retries

T = TypeVar("T")
QUANTUM = 256 << 10  # every chunk of a resumable upload but the last is a multiple of this
READ_RANGE = 8 << 20  # bytes fetched per ranged GET: the memory an open reader holds
CONTENT_TYPE = "application/octet-stream"
TRANSIENT_CODES = {408, 429, 500, 502, 503, 504}
CANCELLED_CODES = {200, 204, 404, 410, 499, 501}  # 499: cancelled; 404/410: gone; 501: emulators
CREATE = "storage.objects.create (and storage.objects.delete to replace an object)"
RETENTION_MODES = {"governance": "Unlocked", "compliance": "Locked"}  # BACKUP_IMMUTABILITY_MODE
LOCK_WORDS = re.compile(r"(?i)\bretention\b|\bhold\b")  # in the 403 of a delete a lock refused


@dataclass
class _Session:
    """A resumable upload: its session URL, the bytes the service has committed, the last part
    (held until the whole object's checksums are known), the finished object's resource, and
    until when the object is to be locked (None: not at all)."""

    name: str
    url: str
    offset: int = 0
    last: bytes = b""
    resource: dict[str, Any] | None = None
    retain_until: datetime | None = None


class GCSStorage(PartedStorage):
    """Objects under ``gs://bucket/prefix``, uploaded through resumable sessions."""

    provider = "Google_Cloud"
    can_lock = True  # object retention: ``retention`` tells an object's retain-until time
    max_parts = 1_000_000  # a resumable session has no chunk limit; parts double only after 200 000
    min_part_size = QUANTUM
    part_multiple = QUANTUM
    parallel_parts = False  # a session takes its chunks in order
    wants_crc32c = True

    def __init__(self, destination: Destination):
        super().__init__(part_size=destination.part_size, concurrency=destination.concurrency)
        self.destination = destination
        self.location = destination.location

    @classmethod
    def from_destination(cls, destination: Destination) -> GCSStorage:
        return cls(destination)

    def describe(self) -> str:
        return f"{self.provider}:{self.location.path}"

    @property
    def _client(self) -> Any:
        return client_for(self.destination, os.getpid())  # built once per process, never pickled

    def _blob(self, name: str, generation: int | None = None) -> Any:
        self._check_name(name)
        return self._client.bucket(self.location.container).blob(
            self.location.key(name), generation=generation
        )

    def _call(self, doing: str, name: str, call: Callable[[], T], permission: str) -> T:
        """Return ``call()``, its errors translated and transient ones tried again."""

        def attempt() -> T:
            try:
                return call()
            except Exception as exc:
                error = self._error(exc, doing, name, permission)
                if error is exc:
                    raise
                raise error from exc

        return with_retries(attempt, attempts=self.destination.retries, what=f"{doing} {name}")

    @property
    def _once(self) -> dict[str, Any]:
        """Call options: our timeout, and no retries by the library (``_call`` retries)."""
        return {"timeout": self.destination.timeout, "retry": None}

    def _error(self, exc: Exception, doing: str, name: str, permission: str) -> Exception:
        where = f"{self.describe()}/{name}" if name else self.describe()
        return storage_error(exc, self.destination, where, doing, permission)

    # Reading

    def stat(self, name: str) -> StoredObject | None:
        blob = self._find(name)
        return None if blob is None else StoredObject(name, blob.size or 0, blob.updated)

    def _find(self, name: str, generation: int | None = None) -> Any:
        blob = self._blob(name, generation)
        fetch = _or_missing(lambda: blob.reload(**self._once) or blob, None)
        return self._call("look up", name, fetch, "storage.objects.get")

    def retention(self, name: str, version_id: str | None = None) -> datetime | None:
        """Return the later of the object's (or that generation's) retain-until time and the end
        of the bucket's retention policy for it; None when neither applies."""
        blob = self._find(name, int(version_id) if version_id else None)
        if blob is None:
            return None
        ends = [t for t in (blob.retention.retain_until_time, blob.retention_expiration_time) if t]
        return max(ends).astimezone(UTC) if ends else None

    def lock_problems(self, shortest: timedelta) -> builtins.list[str]:
        """Object retention must be enabled on the bucket; a bucket retention policy longer than
        ``shortest`` would keep every object past the time prune deletes it."""

        def fetch() -> Any:
            bucket = self._client.bucket(self.location.container)
            bucket.reload(**self._once)
            return bucket

        bucket = self._call("look up the bucket", "", fetch, "storage.buckets.get")
        return _bucket_problems(self.describe(), bucket, shortest)

    def list(self) -> list[StoredObject]:
        prefix = self.location.list_prefix

        def fetch() -> list[StoredObject]:
            blobs = self._client.list_blobs(
                self.location.container, prefix=prefix, delimiter="/", **self._once
            )
            return [StoredObject(b.name[len(prefix) :], b.size or 0, b.updated) for b in blobs]

        found = self._call("list", "", fetch, "storage.objects.list")
        return [o for o in found if o.name]  # "prefix/" itself: a folder placeholder

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[BinaryIO]:
        blob = self._find(name)
        if blob is None:
            raise FileNotFoundError(f"{self.describe()}/{name} does not exist")
        chunks = self._ranges(name, blob)
        try:
            yield chunk_reader(chunks, lambda exc: self._error(exc, "read", name, "storage.objects.get"))
        finally:
            chunks.close()

    def _ranges(self, name: str, blob: Any) -> Generator[bytes, None, None]:
        """Yield the object in ranges of READ_RANGE bytes, each tried again on its own. The blob
        names its generation, so an object replaced meanwhile is not read half old, half new."""
        size = blob.size or 0
        for start in range(0, size, READ_RANGE):
            end = min(start + READ_RANGE, size) - 1

            fetch = functools.partial(
                blob.download_as_bytes, start=start, end=end, checksum=None, **self._once
            )
            chunk = self._call("read", name, _or_missing(fetch, None), "storage.objects.get")
            if chunk is None:
                raise StorageError(f"{self.describe()}/{name} was deleted or replaced while being read")
            yield chunk

    def delete(self, name: str) -> bool:
        blob = self._blob(name)
        remove = _or_missing(lambda: blob.delete(**self._once) or True, False)
        try:
            return self._call("delete", name, remove, "storage.objects.delete")
        except StorageError as exc:
            locked = self._locked(name, exc)
            if locked is None:
                raise
            raise locked from exc

    def _locked(self, name: str, error: StorageError) -> ObjectLocked | None:
        """Return ObjectLocked if ``error`` is a delete refused by a retention lock or a hold (the
        service answers 403 to both, as to a missing permission), else None."""
        from google.api_core.exceptions import Forbidden

        if not isinstance(error.__cause__, Forbidden):
            return None
        until = None
        with contextlib.suppress(StorageError):
            until = self.retention(name)
        active = until if until is not None and until > datetime.now(UTC) else None
        if active is None and not LOCK_WORDS.search(str(error.__cause__)):
            return None  # denied for want of a permission: the error says which
        when = f"until {active:%Y-%m-%d %H:%M:%S} UTC" if active else "by a hold or a retention policy"
        return ObjectLocked(f"{self.describe()}/{name} is locked {when}", active)

    # Writing: the five primitives of PartedStorage

    def _put_whole(
        self, name: str, data: bytes, sums: UploadSums, retain_until: datetime | None = None
    ) -> None:
        blob = self._blob(name)
        blob.md5_hash, blob.crc32c = sums.md5_base64, sums.crc32c_base64  # checked by the service
        self._set_lock(blob, retain_until)
        put = functools.partial(blob.upload_from_string, data, content_type=CONTENT_TYPE, checksum=None)
        self._call("upload", name, functools.partial(put, **self._once), CREATE)
        answer = {"size": blob.size, "md5Hash": blob.md5_hash, "crc32c": blob.crc32c}  # replaced ours
        answer |= {"generation": blob.generation, "retention": dict(blob.retention)}
        self._accept(name, answer, sums, retain_until)

    def _begin(self, name: str, retain_until: datetime | None = None) -> _Session:
        blob = self._blob(name)
        self._set_lock(blob, retain_until)  # part of the object's metadata, sent as the session starts
        start = functools.partial(blob.create_resumable_upload_session, content_type=CONTENT_TYPE)
        url = self._call("start the upload of", name, lambda: start(**self._once), CREATE)
        return _Session(name, url, retain_until=retain_until)

    def _set_lock(self, blob: Any, retain_until: datetime | None) -> None:
        """Put the retention configuration locking ``blob`` until ``retain_until`` (if given) in
        the metadata its upload sends."""
        if retain_until is None:
            return
        retention = blob.retention  # the blob keeps this very mapping once a field is set
        retention.mode = self._retention_mode()
        retention.retain_until_time = _whole_second(retain_until)
        retention.pop("retentionExpirationTime", None)  # the service's to fill in, not ours to send

    def _retention_mode(self) -> str:
        return RETENTION_MODES[self.destination.lock_mode or "governance"]

    def _send_part(self, upload: _Session, part: Part) -> int:
        if part.last:
            upload.last = part.data  # sent by _complete, with the whole object's CRC32C
        else:
            self._send(upload, part.data, None, None)
        return part.number

    def _complete(self, upload: _Session, receipts: builtins.list[Any], sums: UploadSums) -> None:
        self._send(upload, upload.last, upload.offset + len(upload.last), sums.crc32c_base64)
        assert upload.resource is not None
        self._accept(upload.name, upload.resource, sums, upload.retain_until)

    def _send(self, upload: _Session, data: bytes, total: int | None, crc32c: str | None) -> None:
        """Send ``data`` at the session's offset (``total``: it ends the object); after a failure,
        ask the session how much it has and send the rest."""
        start, end = upload.offset, upload.offset + len(data)
        tries = 0

        def send() -> None:
            nonlocal tries
            tries += 1
            if tries > 1:
                self._put_chunk(upload, b"", None, None)  # "bytes */*": how much do you have?
            while upload.resource is None and not (total is None and upload.offset == end):
                before = upload.offset
                if not start <= before <= end:
                    raise StorageError(f"{self.describe()}/{upload.name}: the upload session lost data")
                self._put_chunk(upload, data[before - start :], total, crc32c)
                if upload.offset == before and upload.resource is None:
                    raise StorageError(f"{self.describe()}/{upload.name}: no progress", transient=True)

        self._call("upload", upload.name, send, CREATE)

    def _put_chunk(self, upload: _Session, data: bytes, total: int | None, crc32c: str | None) -> None:
        """PUT ``data`` at the session's offset; with ``total`` it is the last chunk."""
        first = upload.offset
        span = f"{first}-{first + len(data) - 1}" if data else "*"
        headers = {"Content-Range": f"bytes {span}/{'*' if total is None else total}"}
        if crc32c is not None:
            headers["X-Goog-Hash"] = f"crc32c={crc32c}"  # the service refuses a final chunk that differs
        response = self._client._http.put(
            upload.url, data=data, headers=headers, timeout=self.destination.timeout
        )
        self._record(upload, response)

    def _record(self, upload: _Session, response: Any) -> None:
        if response.status_code == 308:
            committed = re.fullmatch(r"bytes=0-(\d+)", response.headers.get("Range", ""))
            upload.offset = int(committed.group(1)) + 1 if committed else 0
        elif response.status_code in (200, 201):
            upload.resource = response.json()
        elif response.status_code in (404, 410):
            raise StorageError(
                f"{self.describe()}/{upload.name}: the upload session has expired or was cancelled"
            )
        else:
            from google.api_core.exceptions import from_http_response

            raise from_http_response(response)

    def _accept(
        self, name: str, resource: dict[str, Any], sums: UploadSums, retain_until: datetime | None
    ) -> None:
        """Check the stored object's size, checksums and (if one was asked for) lock against what
        was sent; delete it if they differ."""
        problem = _compare(resource, sums)
        if problem is not None:
            self._remove(name, resource)
            raise self.mismatch(name, *problem)
        if retain_until is not None:
            self._check_lock(name, resource, retain_until)

    def _check_lock(self, name: str, resource: dict[str, Any], retain_until: datetime) -> None:
        """Refuse (and delete) an object stored without the lock asked for: a bucket without object
        retention, or a store that ignores the retention metadata (the emulator)."""
        until, mode = _whole_second(retain_until), self._retention_mode()
        found = _shortfall(resource.get("retention") or {}, until, mode)
        if found is None:
            return
        self._remove(name, resource)
        raise StorageError(
            f"{self.describe()}/{name}: Cloud Storage stored the object {found} instead of locked until "
            f"{until:%Y-%m-%d %H:%M:%S} UTC ({mode}) as BACKUP_IMMUTABILITY asks, so it was deleted "
            f"again: {_enable_retention(self.location.container)}"
        )

    def _remove(self, name: str, resource: dict[str, Any]) -> None:
        """Delete the object just written and found wrong, unless it was written again since."""
        blob = self._blob(name)
        remove = functools.partial(blob.delete, if_generation_match=resource.get("generation"), **self._once)
        with contextlib.suppress(StorageError):  # 412: someone else has written it since
            self._call("delete", name, remove, "storage.objects.delete")

    def _abort(self, upload: _Session) -> None:
        """Cancel the session (DELETE answers 499). Nothing of it was ever visible to ``list``."""
        upload.last = b""
        if upload.resource is not None:
            return  # finished: _accept has already dealt with it
        try:
            response = self._client._http.delete(upload.url, timeout=self.destination.timeout)
        except Exception as exc:  # one try only: the failure that led here must surface soon
            error = self._error(exc, "cancel the upload of", upload.name, CREATE)
            raise error from (exc if error is not exc else None)
        if response.status_code not in CANCELLED_CODES:
            raise StorageError(f"cancelling the upload of {upload.name} answered {response.status_code}")


def _compare(resource: dict[str, Any], sums: UploadSums) -> tuple[str, str, str] | None:
    """Return (what, ours, theirs) for the first of size, CRC32C and MD5 that the stored object
    has otherwise than we sent (MD5 only where the service reports one), or None."""
    checks = [
        ("size", str(sums.size), resource.get("size")),
        ("CRC32C", sums.crc32c_base64, resource.get("crc32c")),
    ]
    if resource.get("md5Hash") is not None:
        checks.append(("MD5", sums.md5_base64, resource["md5Hash"]))
    for what, ours, theirs in checks:
        if ours != str(theirs):
            return what, ours, "missing" if theirs is None else str(theirs)
    return None


def _shortfall(stored: dict[str, Any], until: datetime, mode: str) -> str | None:
    """Return how the ``stored`` retention falls short of a lock until ``until`` in ``mode`` (a
    later end is fine; Locked must not come back Unlocked), or None if it does not."""
    stored_until = _rfc3339(stored.get("retainUntilTime"))
    if stored_until is None:
        return "without a lock"
    if stored_until < until or (mode == "Locked" and stored.get("mode") != mode):
        return f"locked until {stored_until:%Y-%m-%d %H:%M:%S} ({stored.get('mode')})"
    return None


def _bucket_problems(where: str, bucket: Any, shortest: timedelta) -> list[str]:
    """Return why ``bucket`` cannot keep BACKUP_IMMUTABILITY's locks, if it cannot."""
    problems = []
    if bucket.object_retention_mode != "Enabled":
        problems.append(
            f"{where}: bucket {bucket.name} does not have object retention, so BACKUP_IMMUTABILITY cannot "
            f"lock backups: {_enable_retention(bucket.name)}"
        )
    period = bucket.retention_period
    if period is not None and period > shortest.total_seconds():
        if bucket.retention_policy_locked:
            fix = (
                "the policy is locked and cannot be shortened: keep backups at least that long "
                "(BACKUP_RETENTION_DAYS, BACKUP_LOGS_RETENTION_DAYS), or use another bucket"
            )
        else:
            seconds = int(shortest.total_seconds())
            fix = (
                f"shorten it to at most {_days(shortest)} (gcloud storage buckets update gs://{bucket.name} "
                f"--retention-period={seconds}s) or remove it (--clear-retention-period): the lock on "
                "each object is what protects it"
            )
        problems.append(
            f"{where}: bucket {bucket.name} has a retention policy that keeps every object "
            f"{_days(timedelta(seconds=period))}, longer than the {_days(shortest)} retention keeps a "
            f"backup, so prune could never delete in time: {fix}"
        )
    return problems


def _enable_retention(bucket: str) -> str:
    """Return how to enable object retention on ``bucket``, or do without locks."""
    return (
        f"enable object retention on bucket {bucket} (Google Cloud console: Cloud Storage > Buckets > "
        f"{bucket} > Protection > Object retention; a new bucket: gcloud storage buckets create "
        f"gs://{bucket} --enable-per-object-retention), or turn BACKUP_IMMUTABILITY off"
    )


def _whole_second(when: datetime) -> datetime:
    """Return ``when`` in UTC, rounded up to the whole second, so that a lock never ends before
    the time promised whatever precision the service keeps."""
    when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    return when if not when.microsecond else when.replace(microsecond=0) + timedelta(seconds=1)


def _rfc3339(text: str | None) -> datetime | None:
    from google.api_core.datetime_helpers import from_rfc3339

    return from_rfc3339(text).astimezone(UTC) if text else None


def _days(span: timedelta) -> str:
    return f"{span.total_seconds() / 86400:g} days"


def _or_missing(call: Callable[[], T], missing: Any) -> Callable[[], T]:
    """Return ``call`` made to return ``missing`` when the object (not its bucket) does not exist."""

    def wrapped() -> T:
        try:
            return call()
        except Exception as exc:
            if _object_missing(exc):
                return missing
            raise

    return wrapped


def _object_missing(exc: Exception) -> bool:
    """Return whether ``exc`` says the object is missing (not the bucket, which it names)."""
    from google.api_core.exceptions import NotFound

    return isinstance(exc, NotFound) and "bucket does not exist" not in str(exc).lower()


def storage_error(
    exc: Exception, destination: Destination, where: str, doing: str, permission: str
) -> Exception:
    """Given an error of the Google libraries or the network while trying to ``doing`` at ``where``,
    return a StorageError saying what to fix and whether a retry may help; other errors unchanged."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    path_variable = destination.variable("BACKUP_STORAGE_PATH")
    key_variable = destination.variable(KEY_VARIABLE)
    bucket = destination.location.container
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, api.NotFound):
        return StorageError(f"{where}: bucket {bucket} does not exist: create it or correct {path_variable}")
    if isinstance(exc, api.Unauthorized | api.Forbidden):
        return StorageError(
            f"{where}: access denied ({exc.code}) to {doing}: the account of {key_variable} (or of the "
            f"application default credentials) needs {permission} on bucket {bucket}"
        )
    if isinstance(exc, api.GoogleAPICallError):
        said = _said(exc)
        if exc.code == 400 and re.search(r"(?i)(crc32c|md5).*match", said):
            said += "; the object was corrupted on the way, so it is not accepted"
        transient = exc.code in TRANSIENT_CODES
        return StorageError(f"{where}: could not {doing}: {exc.code} {said}", transient=transient)
    if isinstance(exc, auth.RefreshError):
        transient = bool(getattr(exc, "retryable", False))
        return StorageError(
            f"{where}: the credentials of {key_variable} were refused: {exc}", transient=transient
        )
    if isinstance(exc, OSError | auth.TransportError):  # requests' errors are OSErrors too
        endpoint = destination.credentials.storage_emulator_host or "storage.googleapis.com"
        return StorageError(f"{where}: cannot reach {endpoint} ({_reason(exc, destination)})", transient=True)
    return exc


def _said(exc: Any) -> str:
    """Return what the service said, without the request's URL (a session URL is a credential)."""
    first = exc.errors[0] if exc.errors and isinstance(exc.errors[0], dict) else {}
    inner = re.search(r'"message":\s*("(?:[^"\\]|\\.)*")', str(exc.message))  # the JSON body's message
    said = first.get("message") or (json.loads(inner.group(1)) if inner else str(exc.message))
    return re.sub(r"https?://\S+", "<url>", said)[:300]


def _reason(exc: Exception, destination: Destination) -> str:
    """Return why a connection failed, in a few words (never the URL, which holds upload ids)."""
    if isinstance(exc, TimeoutError) or "timed out" in str(exc).lower() or "Timeout" in type(exc).__name__:
        return f"no answer within {destination.timeout:g} s; BACKUP_STORAGE_TIMEOUT sets the limit"
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return found.group(1).strip() if found else type(exc).__name__
