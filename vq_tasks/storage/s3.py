"""AWS S3, or an S3-compatible store reached through AWS_ENDPOINT_URL: BACKUP_STORAGE_PATH is
s3://bucket/prefix. Writes go through the shared multipart engine; every part and the committed
object are checked against the ETags S3 reports (the MD5 of what it stored), so bytes changed on
the way are refused and never left committed."""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, NoReturn

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from vq_tasks.manifest import manifest_name
from vq_tasks.storage.base import ObjectLocked, ObjectVersion, StorageError, StoredObject, chunk_reader
from vq_tasks.storage.location import Credentials, Destination
from vq_tasks.storage.upload import MIB, Part, PartedStorage, UploadSums
from vq_tasks.streams.stages import CHUNK_SIZE

MANIFEST_SUFFIX = manifest_name("")
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
BAD_CREDENTIALS = {
    "InvalidAccessKeyId": "the access key in {id} is not known to S3",
    "SignatureDoesNotMatch": "the signature does not match: {secret} is not the secret of {id}",
    "ExpiredToken": "the temporary credentials have expired: renew {token}",
    "InvalidToken": "the session token in {token} is not valid",
    "TokenRefreshRequired": "the temporary credentials have expired: renew {token}",
}
TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
ACCESS_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
WRONG_REGION = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}
# what an operation needs: (verb for the message, IAM permission)
PERMISSIONS = {
    "PutObject": ("write to", "s3:PutObject"),
    "CreateMultipartUpload": ("write to", "s3:PutObject"),
    "UploadPart": ("write to", "s3:PutObject"),
    "CompleteMultipartUpload": ("write to", "s3:PutObject"),
    "AbortMultipartUpload": ("abort uploads in", "s3:AbortMultipartUpload"),
    "GetObject": ("read from", "s3:GetObject"),
    "HeadObject": ("read from", "s3:GetObject and s3:ListBucket"),
    "ListObjectsV2": ("list", "s3:ListBucket"),
    "ListMultipartUploads": ("list the uploads of", "s3:ListBucketMultipartUploads"),
    "DeleteObject": ("delete from", "s3:DeleteObject and, with BACKUP_IMMUTABILITY, s3:DeleteObjectVersion"),
    "ListObjectVersions": ("list the versions in", "s3:ListBucketVersions"),
    "GetObjectLockConfiguration": (
        "read the Object Lock configuration of",
        "s3:GetBucketObjectLockConfiguration",
    ),
    "PutObjectRetention": ("lock objects in", "s3:PutObjectRetention"),
}
ALL_PERMISSIONS = (
    "s3:PutObject, s3:GetObject, s3:ListBucket, s3:DeleteObject, s3:AbortMultipartUpload, "
    "s3:ListBucketMultipartUploads"
)


@dataclass(frozen=True)
class _Upload:
    """An S3 multipart upload in progress."""

    name: str
    key: str
    upload_id: str
    retain_until: datetime | None = None


class S3Storage(PartedStorage):
    """Objects are keys under one prefix of a bucket; large ones are sent as multipart uploads."""

    provider = "AWS_S3"
    keeps_versions = True  # Object Lock needs versioning: BACKUP_IMMUTABILITY reads as committed
    can_lock = True
    max_parts = 10_000
    min_part_size = 5 * MIB

    def __init__(self, destination: Destination):
        super().__init__(part_size=destination.part_size, concurrency=destination.concurrency)
        self.destination = destination
        self.location = destination.location
        self.bucket = destination.location.container
        self._tuning = (destination.credentials, destination.retries, destination.timeout, self.concurrency)
        with self._translated():
            _client(*self._tuning)  # now: S3's service model takes a few MiB, better not mid-upload

    @classmethod
    def from_destination(cls, destination: Destination) -> S3Storage:
        return cls(destination)

    @property
    def client(self) -> Any:
        """This process's client of the destination (built once, never pickled)."""
        return _client(*self._tuning)

    def describe(self) -> str:
        return f"{self.provider}:{self.location.path}"

    def _where(self, name: str | None = None) -> str:
        return f"{self.describe()}/{name}" if name else self.describe()

    # writing: the five primitives of the multipart engine

    def _put_whole(self, name: str, data: bytes, sums: UploadSums, retain_until: datetime | None) -> None:
        key, lock = self.location.key(name), self._lock(retain_until)
        if lock and name.endswith(MANIFEST_SUFFIX):  # a manifest planted before ours is never overwritten
            lock["IfNoneMatch"] = "*"
        try:
            with self._translated(name):  # Content-MD5: also the integrity header Object Lock requires
                reply = self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, ContentMD5=sums.md5_base64, **lock
                )
        except StorageError as exc:
            if isinstance(exc.__cause__, ClientError) and _code(exc.__cause__) == "PreconditionFailed":
                raise StorageError(
                    f"{self._where(name)} exists already, written by someone else before this backup "
                    "committed it: not overwritten; look at who holds the storage credentials"
                ) from exc
            raise
        self._check_etag(name, reply, sums.md5.hex(), committed=True)
        if retain_until is not None:
            self._ensure_locked(name, reply.get("VersionId"), retain_until)

    def _begin(self, name: str, retain_until: datetime | None) -> _Upload:
        key, lock = self.location.key(name), self._lock(retain_until)
        with self._translated(name):  # every part then carries Content-MD5, as Object Lock requires
            reply = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, **lock)
        return _Upload(name, key, reply["UploadId"], retain_until)

    def _ensure_locked(self, name: str, version_id: str | None, retain_until: datetime) -> None:
        """Check that the version just written is locked until ``retain_until``, and lock it where
        the store did not (S3-compatible stores, moto among them, may ignore the lock headers of a
        multipart upload): a backup is never left less protected than promised without an error."""
        if (self.retention(name, version_id) or datetime.min.replace(tzinfo=UTC)) >= _aware(retain_until):
            return
        retention = {
            "Mode": (self.destination.lock_mode or "governance").upper(),
            "RetainUntilDate": retain_until,
        }
        with self._translated(name):
            self.client.put_object_retention(
                Bucket=self.bucket, Key=self.location.key(name), Retention=retention, **_version(version_id)
            )

    def _lock(self, retain_until: datetime | None) -> dict[str, Any]:
        """Return the Object Lock arguments of a write locked until ``retain_until`` (none if None)."""
        if retain_until is None:
            return {}
        mode = (self.destination.lock_mode or "governance").upper()
        return {"ObjectLockMode": mode, "ObjectLockRetainUntilDate": _aware(retain_until)}

    def _send_part(self, upload: _Upload, part: Part) -> dict[str, Any]:
        with self._translated(upload.name):
            reply = self.client.upload_part(
                Bucket=self.bucket,
                Key=upload.key,
                UploadId=upload.upload_id,
                PartNumber=part.number,
                Body=part.data,
                ContentMD5=part.md5_base64,
            )
        self._check_etag(f"{upload.name} part {part.number}", reply, part.md5.hex(), committed=False)
        return {"PartNumber": part.number, "ETag": reply["ETag"]}

    def _complete(self, upload: _Upload, receipts: list[Any], sums: UploadSums) -> None:
        combined = hashlib.md5(b"".join(sums.part_md5s), usedforsecurity=False).hexdigest()
        with self._translated(upload.name):
            reply = self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=upload.key,
                UploadId=upload.upload_id,
                MultipartUpload={"Parts": receipts},
            )
        self._check_etag(upload.name, reply, f"{combined}-{len(receipts)}", committed=True)
        found = self.stat(upload.name)
        if found is None or found.size != sums.size:
            theirs = "missing" if found is None else f"{found.size} bytes"
            self._refuse(upload.name, "size", f"{sums.size} bytes", theirs, committed=True)
        if upload.retain_until is not None:
            self._ensure_locked(upload.name, reply.get("VersionId"), upload.retain_until)

    def _abort(self, upload: _Upload) -> None:
        try:
            with self._translated(upload.name):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id
                )
        except StorageError as exc:
            if not isinstance(exc.__cause__, ClientError) or _code(exc.__cause__) != "NoSuchUpload":
                raise  # NoSuchUpload: completed or aborted already

    def _check_etag(self, name: str, reply: dict[str, Any], ours: str, *, committed: bool) -> None:
        """Compare the ETag S3 returned with the MD5 we sent; on a difference, delete what was
        committed and raise the permanent mismatch error. With SSE-KMS or SSE-C the ETag is no MD5,
        and S3's own check of Content-MD5 is what protects the upload."""
        if reply.get("ServerSideEncryption", "AES256") != "AES256" or reply.get("SSECustomerAlgorithm"):
            return
        theirs = reply.get("ETag", "").strip('"')
        if theirs != ours:
            self._refuse(name, "ETag", ours, theirs, committed=committed)

    def _refuse(self, name: str, what: str, ours: str, theirs: str, *, committed: bool) -> NoReturn:
        """Raise the permanent mismatch error, after deleting the object if it was committed."""
        error = self.mismatch(name, what, ours, theirs)
        if committed:
            try:
                self._discard(name)
            except StorageError as exc:
                raise StorageError(f"{error}; deleting it failed too, delete it by hand ({exc})") from exc
        raise error

    def _discard(self, name: str) -> None:
        with self._translated(name):
            self.client.delete_object(Bucket=self.bucket, Key=self.location.key(name))

    # reading, listing, deleting

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[BinaryIO]:
        self._check_name(name)
        with self._translated(name):
            body = self.client.get_object(Bucket=self.bucket, Key=self.location.key(name))["Body"]
        try:
            yield chunk_reader(body.iter_chunks(CHUNK_SIZE), functools.partial(self._download_error, name))
        finally:
            body.close()

    def _download_error(self, name: str, exc: Exception) -> Exception:
        if isinstance(exc, ClientError | BotoCoreError):
            return self._error(exc, name)
        return StorageError(f"{self._where(name)}: the download broke off ({exc})", transient=True)

    def stat(self, name: str) -> StoredObject | None:
        self._check_name(name)
        try:
            with self._translated(name):
                head = self.client.head_object(Bucket=self.bucket, Key=self.location.key(name))
        except FileNotFoundError:
            return None
        return StoredObject(name, head["ContentLength"], _aware(head["LastModified"]))

    def list(self) -> list[StoredObject]:
        prefix = self.location.list_prefix
        found = []
        with self._translated():
            pages = self.client.get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                for item in page.get("Contents", []):
                    name = item["Key"][len(prefix) :]
                    if name:  # "prefix/" itself: a folder marker some consoles create
                        found.append(StoredObject(name, item["Size"], _aware(item["LastModified"])))
        return found

    def delete(self, name: str) -> bool:
        """Delete ``name``; with BACKUP_IMMUTABILITY on, every version of it (a plain delete would
        only hide a locked object behind a delete marker), raising ObjectLocked at the first one
        still locked."""
        if self.destination.lock_mode is None:
            if self.stat(name) is None:
                return False
            self._discard(name)
            return True
        versions = [v for v in self.list_versions(name) if v.name == name]
        for version in versions:  # newest first: a locked original stays, behind nothing new
            self._delete_version(version)
        return any(not v.delete_marker for v in versions)

    def _delete_version(self, version: ObjectVersion) -> None:
        key = self.location.key(version.name)
        try:
            with self._translated(version.name):
                self.client.delete_object(Bucket=self.bucket, Key=key, VersionId=version.version_id)
        except StorageError as exc:
            if version.delete_marker or not isinstance(exc.__cause__, ClientError):
                raise
            if _code(exc.__cause__) not in ACCESS_DENIED:
                raise
            until = self.retention(version.name, version.version_id)
            if until is None or until <= datetime.now(UTC):
                raise  # denied for another reason (a lock that ended): the permission error says which
            raise ObjectLocked(
                f"{self._where(version.name)} is locked until {until:%Y-%m-%d %H:%M} UTC", until
            ) from exc

    def retention(self, name: str, version_id: str | None = None) -> datetime | None:
        self._check_name(name)
        try:
            with self._translated(name):
                head = self.client.head_object(
                    Bucket=self.bucket, Key=self.location.key(name), **_version(version_id)
                )
        except FileNotFoundError:
            return None
        until = head.get("ObjectLockRetainUntilDate")
        return _aware(until) if until is not None else None

    def list_versions(self, starting: str = "") -> builtins.list[ObjectVersion]:
        """Return every version and delete marker directly under the root whose name starts with
        ``starting``, sorted by name and, for each name, the current one first, then newest first."""
        root = self.location.list_prefix
        found = []
        with self._translated():
            pages = self.client.get_paginator("list_object_versions")
            for page in pages.paginate(Bucket=self.bucket, Prefix=root + starting, Delimiter="/"):
                for item in page.get("Versions", []):
                    found.append(_version_of(item, root, marker=False))
                for item in page.get("DeleteMarkers", []):
                    found.append(_version_of(item, root, marker=True))
        found = [v for v in found if v.name]
        return sorted(found, key=lambda v: (v.name, not v.latest, -v.modified.timestamp()))

    @contextlib.contextmanager
    def open_read_version(self, name: str, version_id: str) -> Iterator[BinaryIO]:
        """Return a binary stream of one version of ``name`` (a locked original behind a delete
        marker or a later overwrite)."""
        self._check_name(name)
        with self._translated(name):
            reply = self.client.get_object(
                Bucket=self.bucket, Key=self.location.key(name), VersionId=version_id
            )
        body = reply["Body"]
        try:
            yield chunk_reader(body.iter_chunks(CHUNK_SIZE), functools.partial(self._download_error, name))
        finally:
            body.close()

    def lock_problems(self, shortest: timedelta) -> builtins.list[str]:
        """Object Lock must be on (it needs versioning, which it turns on). A bucket's default
        retention does not matter: every object we write carries its own retain-until date."""
        try:
            with self._translated():
                config = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and _code(cause) == "ObjectLockConfigurationNotFoundError":
                config = {}
            else:
                raise
        if config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
            return [
                f"{self.describe()}: bucket {self.bucket} has no Object Lock, so BACKUP_IMMUTABILITY cannot "
                f"lock backups: turn it on (aws s3api put-bucket-versioning --bucket {self.bucket} "
                "--versioning-configuration Status=Enabled, then aws s3api put-object-lock-configuration "
                f"--bucket {self.bucket} --object-lock-configuration ObjectLockEnabled=Enabled) or turn "
                "BACKUP_IMMUTABILITY off"
            ]
        return []

    def abort_stale_uploads(self, started_before: datetime) -> builtins.list[str]:
        """Abort the multipart uploads directly under the prefix begun before ``started_before``."""
        prefix, cutoff = self.location.list_prefix, _aware(started_before)
        aborted = []
        with self._translated():
            pages = self.client.get_paginator("list_multipart_uploads")
            stale = [
                _Upload(upload["Key"][len(prefix) :], upload["Key"], upload["UploadId"])
                for page in pages.paginate(Bucket=self.bucket, Prefix=prefix)
                for upload in page.get("Uploads", [])
                if _aware(upload["Initiated"]) < cutoff
            ]
        for upload in stale:
            if upload.name and "/" not in upload.name:
                self._abort(upload)
                aborted.append(upload.name)
        return aborted

    # errors

    @contextlib.contextmanager
    def _translated(self, name: str | None = None) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, name) from exc

    def _error(self, exc: ClientError | BotoCoreError, name: str | None) -> Exception:
        """Return the StorageError (or FileNotFoundError) that says what failed and how to fix it."""
        where = self._where(name)
        if isinstance(exc, ClientError):
            return self._client_error(exc, name)
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"{where}: no AWS credentials found: set {self._env('AWS_ACCESS_KEY_ID')} and "
                f"{self._env('AWS_SECRET_ACCESS_KEY')}, or give the machine an IAM role"
            )
        endpoint = self.client.meta.endpoint_url
        if isinstance(exc, SSLError):
            return StorageError(f"{where}: TLS with {endpoint} failed ({exc}); check AWS_CA_BUNDLE")
        if isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError):
            return StorageError(
                f"{where}: cannot reach {endpoint} within {self.destination.timeout:g} s "
                f"({type(exc).__name__}); check the network and {self._env('AWS_ENDPOINT_URL')}",
                transient=True,
            )
        return StorageError(f"{where}: {exc}")

    def _client_error(self, exc: ClientError, name: str | None) -> Exception:
        code, status = _code(exc), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        where, env = self._where(name), self._env
        if code in NOT_FOUND and name:
            return FileNotFoundError(f"{where} does not exist")
        if code == "NoSuchBucket":
            return StorageError(
                f"{where}: bucket {self.bucket} does not exist in {self.client.meta.region_name}: "
                f"create it or correct {self._path_variable}"
            )
        if code in BAD_CREDENTIALS:
            names = {"id": env("AWS_ACCESS_KEY_ID"), "secret": env("AWS_SECRET_ACCESS_KEY")}
            problem = BAD_CREDENTIALS[code].format(**names, token=env("AWS_SESSION_TOKEN"))
            return StorageError(
                f"{where}: S3 refused the credentials: {problem}; correct {names['id']} and {names['secret']}"
            )
        if code in ACCESS_DENIED:
            return StorageError(f"{where}: access denied: {self._denied(exc.operation_name, code == '403')}")
        if code in WRONG_REGION:
            return StorageError(
                f"{where}: bucket {self.bucket} is in another region: correct {env('AWS_REGION')}"
            )
        transient = code in TRANSIENT_CODES or status >= 500
        reason = exc.response.get("Error", {}).get("Message") or (
            "busy or failing" if transient else "refused"
        )
        return StorageError(f"{where}: S3 answered {code or status}: {reason}", transient=transient)

    def _denied(self, operation: str, bare: bool) -> str:
        """Say which permission ``operation`` lacks; ``bare``: a HEAD's 403, which also wrong keys give."""
        verb, permission = PERMISSIONS.get(operation, ("use", ALL_PERMISSIONS))
        keys = f" (or {self._env('AWS_ACCESS_KEY_ID')}/{self._env('AWS_SECRET_ACCESS_KEY')} are wrong)"
        return (
            f"the credentials may not {verb} bucket {self.bucket}{keys if bare else ''}; "
            f"grant {permission} (a backup needs {ALL_PERMISSIONS})"
        )

    @property
    def _path_variable(self) -> str:
        return self.destination.variable("BACKUP_STORAGE_PATH")

    def _env(self, name: str) -> str:
        """Return the variable that sets ``name`` for this destination."""
        return self.destination.variable(name)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _version(version_id: str | None) -> dict[str, str]:
    return {"VersionId": version_id} if version_id else {}


def _version_of(item: dict[str, Any], root: str, *, marker: bool) -> ObjectVersion:
    return ObjectVersion(
        name=item["Key"][len(root) :],
        version_id=item["VersionId"],
        modified=_aware(item["LastModified"]),
        size=0 if marker else item["Size"],
        latest=item["IsLatest"],
        delete_marker=marker,
    )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@functools.lru_cache(maxsize=32)
def _client(credentials: Credentials, retries: int, timeout: float, concurrency: int) -> Any:
    """Return an S3 client for these credentials and tuning; cleared in a forked child, so each
    worker process builds its own."""
    keys: dict[str, Any] = {}
    if credentials.aws_access_key_id and credentials.aws_secret_access_key:
        keys["aws_access_key_id"] = credentials.aws_access_key_id
        keys["aws_secret_access_key"] = credentials.aws_secret_access_key.get_secret_value()
        if credentials.aws_session_token:
            keys["aws_session_token"] = credentials.aws_session_token.get_secret_value()
    config = Config(
        retries={"mode": "standard", "total_max_attempts": retries},  # BACKUP_STORAGE_RETRIES counts attempts
        connect_timeout=timeout,
        read_timeout=timeout,
        max_pool_connections=max(10, concurrency + 2),
        s3={"addressing_style": "path"} if credentials.aws_endpoint_url else {},
        request_checksum_calculation="when_required",  # Content-MD5 and ETags check every upload
        response_checksum_validation="when_required",
        user_agent_extra="vq-backup",
    )
    session = boto3.session.Session(region_name=credentials.aws_region, **keys)
    return session.client("s3", endpoint_url=credentials.aws_endpoint_url, config=config)


os.register_at_fork(after_in_child=_client.cache_clear)
