"""Azure Blob Storage: BACKUP_STORAGE_PATH is https://<account>.blob.<suffix>/<container>/<prefix>.

Credentials, in order: AZURE_STORAGE_CONNECTION_STRING (its endpoint and key or SAS; the container
and prefix still come from the path), AZURE_STORAGE_KEY (shared key of the path's account), else
azure-identity's DefaultAzureCredential (managed identity, workload identity, ``az login``).

Who checks what, so that bytes changed on the way are never committed:

- a small object is one Put Blob carrying our MD5 as its transactional Content-MD5: the service
  refuses a body that does not match (400); the MD5 the service reports of what it stored is
  compared with ours as well, and a mismatching blob is deleted;
- each block of a large object is one Put Block carrying our MD5 of that part, refused by the
  service on a mismatch; an MD5 echoed in its response is compared too;
- Put Block List commits the blocks in number order with our whole MD5 as the blob's Content-MD5
  (stored, not checked by the service, so that readers can check it); then the committed block
  list (ids, sizes), the blob's size and its stored MD5 are compared with what was sent, and a
  mismatching blob is deleted before the error is raised.

With BACKUP_IMMUTABILITY on, each blob is written with its own version-level immutability policy
(Put Blob or Put Block List carries the until-date and the mode: "Unlocked" for governance,
"Locked" for compliance), which needs a container with version-level immutability. The policy the
service reports afterwards is checked too: a blob stored without the lock asked for is deleted
again and the write fails, so that a backup is never less protected than promised.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import functools
import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, cast

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import (
    BlobClient,
    BlobPrefix,
    BlobProperties,
    BlobServiceClient,
    ContainerClient,
    ContainerProperties,
    ContentSettings,
    ExponentialRetry,
    ImmutabilityPolicy,
)

from vq_tasks.storage.base import ObjectLocked, StorageError, StoredObject, chunk_reader
from vq_tasks.storage.location import Destination
from vq_tasks.storage.upload import MIB, Part, PartedStorage, UploadSums

logger = logging.getLogger(__name__)
DOWNLOAD_CHUNK = 4 * MIB  # the largest range the service returns an MD5 of
MAX_PUT_BLOB = 5000 * MIB  # the service's limit of one Put Blob request
MAX_BLOCK = 4000 * MIB  # the service's limit of one block
PERMISSION_CODES = {
    "AuthorizationFailure",
    "AuthorizationPermissionMismatch",
    "AuthorizationResourceTypeMismatch",
    "AuthorizationServiceMismatch",
    "AuthorizationSourceIPMismatch",
    "AuthorizationProtocolMismatch",
    "InsufficientAccountPermissions",
}
TRANSIENT_CODES = {"ServerBusy", "InternalError", "OperationTimedOut"}
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
LOCKED_CODES = {"BlobImmutableDueToPolicy"}  # a delete refused by an immutability policy or legal hold
POLICY_MODES = {"governance": "Unlocked", "compliance": "Locked"}  # BACKUP_IMMUTABILITY_MODE
REASON = re.compile(r"\[Errno -?\d+\][^'\")]*|(?:Read |Connection )?timed out|Connection (?:reset|aborted)")


@dataclass(frozen=True)
class _Upload:
    """An upload in blocks: the blob, the block-id prefix no other upload uses, and until when
    the blob is to be locked (None: not at all)."""

    name: str
    blob: BlobClient
    prefix: str
    retain_until: datetime | None = None


@dataclass(frozen=True)
class _Block:
    id: str
    size: int


class AzureStorage(PartedStorage):
    """Block blobs under a prefix of one container; large objects are staged as blocks."""

    provider = "Azure_Blob"
    can_lock = True  # version-level immutability: ``retention`` tells a blob's policy
    max_parts = 50_000  # blocks per blob
    min_part_size = 1 * MIB  # Azure takes blocks of any size; the engine's default is kept

    def __init__(self, destination: Destination):
        super().__init__(part_size=destination.part_size, concurrency=destination.concurrency)
        self.destination = destination
        self.location = destination.location
        _check_account(destination)

    @classmethod
    def from_destination(cls, destination: Destination) -> AzureStorage:
        return cls(destination)

    def describe(self) -> str:
        return f"Azure_Blob:{self.location.path}"

    def part_size_for(self, number: int) -> int:
        return min(super().part_size_for(number), MAX_BLOCK)

    def _container(self) -> ContainerClient:
        try:
            return _container_client(self.destination, os.getpid())
        except ValueError:  # the SDK's words on a malformed connection string, which never quote it
            var = self.destination.variable("AZURE_STORAGE_CONNECTION_STRING")
            raise StorageError(f"{self.describe()}: {var} is not a valid connection string") from None

    def _blob(self, name: str) -> BlobClient:
        self._check_name(name)
        return self._container().get_blob_client(self.location.key(name))

    def stat(self, name: str) -> StoredObject | None:
        try:
            props = self._blob(name).get_blob_properties()
        except AzureError as exc:
            if _code(exc) == "BlobNotFound":
                return None
            raise self._error(exc, name) from exc
        return StoredObject(name, props.size, props.last_modified)

    def list(self) -> list[StoredObject]:
        prefix = self.location.list_prefix
        found = []
        try:
            for item in self._container().walk_blobs(name_starts_with=prefix or None, delimiter="/"):
                name = item.name[len(prefix) :]
                if not isinstance(item, BlobPrefix) and name:
                    found.append(StoredObject(name, item.size, item.last_modified))
        except AzureError as exc:
            raise self._error(exc) from exc
        return found

    def delete(self, name: str) -> bool:
        try:
            self._blob(name).delete_blob(delete_snapshots="include")
        except AzureError as exc:
            if _code(exc) == "BlobNotFound":
                return False
            if _code(exc) in LOCKED_CODES:
                raise self._locked(name) from exc
            raise self._error(exc, name) from exc
        return True

    def _locked(self, name: str) -> ObjectLocked:
        """Return the error of a delete refused by an immutability policy, with the policy's end
        where it can be read (a legal hold has none)."""
        until = None
        with contextlib.suppress(StorageError):
            until = self.retention(name)
        when = f"until {until:%Y-%m-%d %H:%M:%S} UTC" if until else "by a legal hold or a policy"
        return ObjectLocked(f"{self.describe()}/{name} is locked {when}", until)

    def retention(self, name: str, version_id: str | None = None) -> datetime | None:
        """Return the expiry of the blob's (or that version's) immutability policy, None without one."""
        try:
            props = self._blob(name).get_blob_properties(version_id=version_id)
        except AzureError as exc:
            if _code(exc) == "BlobNotFound":
                return None
            raise self._error(exc, name) from exc
        return _expiry(props)

    def lock_problems(self, shortest: timedelta) -> builtins.list[str]:
        """Read what the container keeps locked from its properties (the data plane tells whether
        it has version-level immutability, a container-level policy and a legal hold, but not a
        policy's period, which only Azure Resource Manager shows)."""
        try:
            props = self._container().get_container_properties()
        except AzureError as exc:
            raise self._error(exc) from exc
        where, account, container = self.describe(), self.location.account, self.location.container
        return _container_problems(where, account, container, props, shortest)

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[BinaryIO]:
        try:  # the first range is fetched here: a missing blob is noticed before any read
            download = self._blob(name).download_blob(validate_content=True)
        except AzureError as exc:
            if _code(exc) == "BlobNotFound":
                raise FileNotFoundError(f"{self.describe()}/{name} does not exist") from None
            raise self._error(exc, name) from exc
        stream = chunk_reader(download.chunks(), lambda exc: self._error(exc, name, transient=True))
        try:
            yield stream
        finally:
            stream.close()

    def _put_whole(
        self, name: str, data: bytes, sums: UploadSums, retain_until: datetime | None = None
    ) -> None:
        blob = self._blob(name)
        try:
            result = blob.upload_blob(
                data,
                length=len(data),
                overwrite=True,
                max_concurrency=1,
                transactional_content_md5=sums.md5,
                **self._lock(retain_until),
            )
        except AzureError as exc:
            raise self._error(exc, name) from exc
        etag = cast(str, result["etag"])  # the SDK types it str | datetime
        stored = result.get("content_md5")  # what the service computed of the body it stored
        if stored is None:
            stored = self._committed(blob, name, etag).content_settings.content_md5
        if stored is None or bytes(stored) != sums.md5:
            self._discard(blob, etag)
            raise self.mismatch(name, "MD5", sums.md5_base64, _b64(stored))
        if retain_until is not None:
            self._check_lock(blob, name, etag, self._committed(blob, name, etag), retain_until)

    def _committed(self, blob: BlobClient, name: str, etag: str) -> BlobProperties:
        """Return the properties of the blob just committed; delete it if they cannot be read
        (stored but not checked: not accepted either)."""
        try:
            return blob.get_blob_properties()
        except AzureError as exc:
            self._discard(blob, etag)
            raise self._error(exc, name) from exc

    def _lock(self, retain_until: datetime | None) -> dict[str, Any]:
        """Return the arguments of a write locked until ``retain_until`` (none if None)."""
        if retain_until is None:
            return {}
        policy = ImmutabilityPolicy(expiry_time=_whole_second(retain_until), policy_mode=self._policy_mode())
        return {"immutability_policy": policy}

    def _policy_mode(self) -> str:
        return POLICY_MODES[self.destination.lock_mode or "governance"]

    def _check_lock(
        self, blob: BlobClient, name: str, etag: str, props: BlobProperties, retain_until: datetime
    ) -> None:
        """Refuse (and delete) a blob the service stored without the lock asked for: a container
        without version-level immutability, or a store that ignores the policy (Azurite)."""
        until, mode = _whole_second(retain_until), self._policy_mode()
        found = _shortfall(props, until, mode)
        if found is None:
            return
        self._discard(blob, etag)
        container, account = self.location.container, self.location.account
        raise StorageError(
            f"{self.describe()}/{name}: Azure stored the blob {found} instead of locked until "
            f"{until:%Y-%m-%d %H:%M:%S} UTC ({mode}) as BACKUP_IMMUTABILITY asks, so it was deleted "
            f"again: {_enable_vlw(account, container)}"
        )

    def _begin(self, name: str, retain_until: datetime | None = None) -> _Upload:
        return _Upload(name, self._blob(name), uuid.uuid4().hex[:16], retain_until)

    def _send_part(self, upload: _Upload, part: Part) -> _Block:
        block = _Block(f"{upload.prefix}{part.number:05d}", len(part.data))  # same length for every id
        try:
            result = upload.blob.stage_block(
                block.id, part.data, length=block.size, transactional_content_md5=part.md5
            )
        except AzureError as exc:
            raise self._error(exc, upload.name) from exc
        echoed = result.get("content_md5")
        if echoed is not None and bytes(echoed) != part.md5:
            raise self.mismatch(upload.name, f"part {part.number} MD5", part.md5_base64, _b64(echoed))
        return block

    def _complete(self, upload: _Upload, receipts: builtins.list[_Block], sums: UploadSums) -> None:
        try:
            result = upload.blob.commit_block_list(
                [block.id for block in receipts],  # type: ignore[misc]  # the SDK also takes str block ids
                content_settings=ContentSettings(
                    content_md5=sums.md5  # type: ignore[arg-type]  # bytes work; the stub says bytearray
                ),
                **self._lock(upload.retain_until),
            )
        except AzureError as exc:
            raise self._error(exc, upload.name) from exc
        etag = cast(str, result["etag"])  # the SDK types it str | datetime
        try:
            committed, _ = upload.blob.get_block_list("committed")
            props = upload.blob.get_blob_properties()
        except AzureError as exc:  # committed but not checked: not accepted either
            self._discard(upload.blob, etag)
            raise self._error(exc, upload.name) from exc
        stored = [_Block(block.id, block.size) for block in committed]
        difference = _difference(receipts, stored, props.size, props.content_settings.content_md5, sums)
        if difference:
            self._discard(upload.blob, etag)
            raise self.mismatch(upload.name, *difference)
        if upload.retain_until is not None:
            self._check_lock(upload.blob, upload.name, etag, props, upload.retain_until)

    def _abort(self, upload: _Upload) -> None:
        """Uncommitted blocks cannot be deleted one by one: the service drops them a week after the
        last Put Block, or when the blob is next committed, and they are never listed. When the blob
        has no committed version and holds only this upload's blocks, an empty block list is
        committed (only if the blob is still missing) and deleted at once, so that nothing is billed
        for that week; the empty blob is visible for that moment only. One try, no retries.
        Not for a locked upload: the container may give that empty blob a default policy, which
        would keep it, visible, for the policy's period."""
        if upload.retain_until is not None:
            return
        once: dict[str, Any] = {"retry_total": 0}
        try:
            committed, uncommitted = upload.blob.get_block_list("all", **once)
            if committed or not uncommitted or any(not b.id.startswith(upload.prefix) for b in uncommitted):
                return
            result = upload.blob.commit_block_list([], match_condition=MatchConditions.IfMissing, **once)
            upload.blob.delete_blob(
                etag=cast(str, result["etag"]), match_condition=MatchConditions.IfNotModified, **once
            )
        except AzureError as exc:
            if _code(exc) not in {"BlobNotFound", "BlobAlreadyExists", "ConditionNotMet"}:
                raise self._error(exc, upload.name) from exc

    def _discard(self, blob: BlobClient, etag: str) -> None:
        """Delete the blob we just wrote and found wrong, unless it was written again since."""
        try:
            blob.delete_blob(etag=etag, match_condition=MatchConditions.IfNotModified)
        except AzureError as exc:
            logger.warning("could not delete the rejected %s: %s", blob.blob_name, self._error(exc))

    def _error(
        self, exc: Exception, name: str | None = None, *, transient: bool | None = None
    ) -> StorageError:
        """Translate an SDK error into a StorageError that names the place and the fix, never a
        secret; ``transient`` overrides whether a retry may help."""
        error = exc if isinstance(exc, StorageError) else self._translate(exc, name)
        if transient is not None:
            error.transient = transient
        return error

    def _translate(self, exc: Exception, name: str | None) -> StorageError:
        where = f"{self.describe()}/{name}" if name else self.describe()
        container, account = self.location.container, self.location.account
        code, status = _code(exc), getattr(exc, "status_code", None)
        if isinstance(exc, ServiceRequestError | ServiceResponseError):
            return StorageError(f"{where}: cannot reach {self._endpoint()} ({_reason(exc)})", transient=True)
        if code == "ContainerNotFound":
            fix = f"create it or correct {self.destination.variable('BACKUP_STORAGE_PATH')}"
            return StorageError(f"{where}: container {container} does not exist in account {account}: {fix}")
        if _is_authentication(exc, code, status):
            key, text = (
                self.destination.variable(f"AZURE_STORAGE_{v}") for v in ("KEY", "CONNECTION_STRING")
            )
            return StorageError(
                f"{where}: authentication failed ({code or type(exc).__name__}): check {key} or {text}, "
                "or the managed identity when neither is set"
            )
        if code in PERMISSION_CODES:
            return StorageError(
                f"{where}: the credential may not write or read container {container} ({code}): grant it "
                "the Storage Blob Data Contributor role, or use a SAS with read, add, create, write, "
                "delete and list permissions"
            )
        if code == "Md5Mismatch" or (status == 400 and "md5" in str(exc).lower()):
            return StorageError(
                f"{where}: the service computed another MD5 than the one sent ({code}): the upload was "
                "corrupted on the way, so it is not accepted"
            )
        if status is None:  # no answer at all: a broken connection or a client-side failure
            return StorageError(f"{where}: the transfer failed ({_reason(exc)})", transient=True)
        busy = code in TRANSIENT_CODES or status in TRANSIENT_STATUS
        return StorageError(f"{where}: Azure answered HTTP {status} {code or ''}".rstrip(), transient=busy)

    def _endpoint(self) -> str:
        with contextlib.suppress(StorageError):
            client = self._container()
            return f"{client.scheme}://{client.primary_hostname}"
        return f"https://{self.location.account}.blob.{self.location.endpoint_suffix}"


@functools.lru_cache(maxsize=16)
def _container_client(destination: Destination, pid: int) -> ContainerClient:
    """Return the process's client of the destination's container (``pid``: a forked child
    builds its own rather than share its parent's connections)."""
    tries, timeout = destination.retries, destination.timeout
    options: dict[str, Any] = {
        "retry_policy": ExponentialRetry(
            initial_backoff=1,
            increment_base=2,
            random_jitter_range=1,
            retry_total=tries - 1,
            retry_connect=tries - 1,
            retry_read=tries - 1,
            retry_status=tries - 1,
        ),
        "connection_timeout": timeout,
        "read_timeout": timeout,
        "max_single_put_size": MAX_PUT_BLOB,
        "max_single_get_size": DOWNLOAD_CHUNK,
        "max_chunk_get_size": DOWNLOAD_CHUNK,
    }
    credentials, location = destination.credentials, destination.location
    if credentials.azure_storage_connection_string is not None:
        text = credentials.azure_storage_connection_string.get_secret_value()
        service = BlobServiceClient.from_connection_string(text, **options)
    else:
        account_url = f"https://{location.account}.blob.{location.endpoint_suffix}"
        service = BlobServiceClient(account_url, credential=_credential(destination), **options)
    return service.get_container_client(location.container)


def _credential(destination: Destination) -> Any:
    credentials = destination.credentials
    if credentials.azure_storage_key is not None:
        key = credentials.azure_storage_key.get_secret_value()
        return {"account_name": destination.location.account, "account_key": key}
    try:
        from azure.identity import DefaultAzureCredential  # only where no key is given
    except ImportError:
        raise StorageError(
            f"Azure_Blob:{destination.location.path}: without {destination.variable('AZURE_STORAGE_KEY')} "
            "the managed identity is used, which needs the Python package azure-identity: "
            "install vq-backup[cloud]"
        ) from None
    return DefaultAzureCredential()


def _check_account(destination: Destination) -> None:
    """Refuse AZURE_STORAGE_ACCOUNT naming another account than the storage path."""
    credentials, account = destination.credentials, destination.location.account
    named = credentials.azure_storage_account
    if credentials.azure_storage_connection_string is None and named and named != account:
        raise StorageError(
            f"Azure_Blob:{destination.location.path}: {destination.variable('AZURE_STORAGE_ACCOUNT')} is "
            f"{named!r}, but the storage path names the account {account!r}: correct one of them"
        )


def _difference(
    sent: list[_Block], committed: list[_Block], size: int, md5: bytes | bytearray | None, sums: UploadSums
) -> tuple[str, str, str] | None:
    """Return what differs between the upload and the committed blob (what, ours, theirs)."""
    if [b.id for b in committed] != [b.id for b in sent]:
        return "block list", f"the {len(sent)} blocks sent", f"{len(committed)} other or reordered blocks"
    for number, (ours, theirs) in enumerate(zip(sent, committed, strict=True), 1):
        if ours.size != theirs.size:
            return f"block {number}'s size", str(ours.size), str(theirs.size)
    if size != sums.size:
        return "size", str(sums.size), str(size)
    if md5 is None or bytes(md5) != sums.md5:
        return "Content-MD5", sums.md5_base64, _b64(md5)
    return None


def _expiry(props: BlobProperties) -> datetime | None:
    """Return the end of the blob's immutability policy, None without one."""
    expiry = props.immutability_policy.expiry_time
    return expiry.astimezone(UTC) if expiry is not None else None


def _shortfall(props: BlobProperties, until: datetime, mode: str) -> str | None:
    """Return how the blob's policy falls short of a lock until ``until`` in ``mode`` (a later
    end is fine; Locked must not come back unlocked), or None if it does not."""
    expiry, stored_mode = _expiry(props), str(props.immutability_policy.policy_mode or "")
    if expiry is None:
        return "without a lock"
    if expiry < until or (mode == "Locked" and stored_mode.lower() != "locked"):
        return f"locked until {expiry:%Y-%m-%d %H:%M:%S} ({stored_mode})"
    return None


def _whole_second(when: datetime) -> datetime:
    """Return ``when`` in UTC, rounded up to the whole second: the service keeps whole seconds
    (RFC 1123), and a lock must not end before the time promised."""
    when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    return when if not when.microsecond else when.replace(microsecond=0) + timedelta(seconds=1)


def _enable_vlw(account: str | None, container: str) -> str:
    """Return how to give ``container`` version-level immutability, or do without locks."""
    return (
        f"enable version-level immutability on container {container} (a new container: az storage "
        f"container-rm create --storage-account {account} --name {container} --enable-vlw true; an "
        "existing one: Azure portal, container > Access policy > Add policy > Enable version-level "
        f"immutability, or az storage container-rm migrate-vlw --storage-account {account} --name "
        f"{container}; either needs blob versioning on the account: az storage account "
        f"blob-service-properties update --account-name {account} --enable-versioning true), or turn "
        "BACKUP_IMMUTABILITY off"
    )


def _container_problems(
    where: str, account: str | None, container: str, props: ContainerProperties, shortest: timedelta
) -> list[str]:
    """Return why ``container`` cannot keep per-blob locks for BACKUP_IMMUTABILITY, if it cannot."""
    problems = []
    if props.has_legal_hold:
        problems.append(
            f"{where}: container {container} has a legal hold, which keeps every blob until the hold is "
            f"cleared, so prune could never delete a backup after the {_days(shortest)} retention keeps "
            "it: clear the hold (Azure portal: container > Access policy), or use another container"
        )
    if props.immutable_storage_with_versioning_enabled:
        return problems
    if props.has_immutability_policy:
        problems.append(
            f"{where}: container {container} has a container-level retention policy, which locks every "
            "blob for one fixed period (shown only by Azure Resource Manager, so not compared with the "
            f"{_days(shortest)} retention keeps a backup: longer, prune could never delete in time) and "
            "cannot lock a blob until the date BACKUP_IMMUTABILITY sets for it: migrate the container "
            f"to version-level immutability (az storage container-rm migrate-vlw --storage-account "
            f"{account} --name {container}; it needs blob versioning on the account), or turn "
            "BACKUP_IMMUTABILITY off"
        )
    else:
        problems.append(
            f"{where}: container {container} does not have version-level immutability, so "
            f"BACKUP_IMMUTABILITY cannot lock backups: {_enable_vlw(account, container)}"
        )
    return problems


def _days(span: timedelta) -> str:
    return f"{span.total_seconds() / 86400:g} days"


def _is_authentication(exc: Exception, code: str | None, status: int | None) -> bool:
    """A wrong key or no credential at all; Azurite reports a wrong key as AuthorizationFailure."""
    if code == "AuthenticationFailed" or (status is None and isinstance(exc, ClientAuthenticationError)):
        return True
    return code == "AuthorizationFailure" and "failed to authenticate" in str(exc)


def _code(exc: Exception) -> str | None:
    code = getattr(exc, "error_code", None) if isinstance(exc, HttpResponseError) else None
    return str(getattr(code, "value", code)) if code else None


def _reason(exc: Exception) -> str:
    """Return why a connection failed, without the request's URL (it may carry a SAS)."""
    found = REASON.search(str(exc))
    return found.group(0).strip() if found else type(exc).__name__


def _b64(digest: bytes | bytearray | None) -> str:
    return base64.b64encode(digest).decode() if digest else "missing"
