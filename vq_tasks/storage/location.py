"""Where backups go: BACKUP_STORAGE_PATH parsed in the operators' guide's form for its provider,
and the credentials and tuning a provider is opened with."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, SecretStr

PATH_FORMS = {
    "Local": "a folder, such as /var/backups/virtualqueue",
    "AWS_S3": "s3://bucket/prefix",
    "Azure_Blob": "https://account.blob.core.windows.net/container/prefix",
    "Google_Cloud": "gs://bucket/prefix",
}
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._\-]{1,220}[a-z0-9]$")
CONTAINER = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9\-]{1,61}[a-z0-9]$")
# where a destination is, not who may use it: never taken over from the primary by the off-site copy
ENDPOINT_FIELDS = ("aws_endpoint_url", "azure_storage_connection_string", "storage_emulator_host")
AZURE_HOST = re.compile(r"^(?P<account>[a-z0-9]{3,24})\.blob\.(?P<suffix>[a-z0-9.\-]+)$")


@dataclass(frozen=True)
class Location:
    """A parsed storage path: the bucket (container, or folder for Local), the prefix inside it
    without surrounding slashes, and for Azure the account and endpoint suffix."""

    provider: str
    container: str
    prefix: str = ""
    account: str | None = None
    endpoint_suffix: str | None = None
    path: str = ""

    def key(self, name: str) -> str:
        """Return the full object key of ``name``."""
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def list_prefix(self) -> str:
        """The key prefix every object of this location starts with."""
        return f"{self.prefix}/" if self.prefix else ""

    def same_place(self, other: Location) -> bool:
        """Return whether both locations name the same place, however their paths are spelled."""
        fields = ("provider", "container", "prefix", "account")
        return all(getattr(self, f) == getattr(other, f) for f in fields)

    def __str__(self) -> str:
        return self.path


def parse_location(provider: str, path: str) -> Location:
    """Given a provider name and a storage path, return the location. Raise ValueError that shows
    the expected form when the path does not fit the provider."""
    form = PATH_FORMS[provider]
    if provider == "Local":
        if not path or "://" in path:
            raise ValueError(f"{provider} needs {form}, not {path!r}")
        return Location(provider, str(Path(path)), path=path)
    parts = urlsplit(path)
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(  # never echoed: a SAS token or a key may be in there
            f"{provider} paths carry no query, fragment or user info (a SAS token or key?): give "
            "credentials in their own variables, the path as "
            f"{form}"
        )
    if provider == "Azure_Blob":
        return _azure(parts, path, form)
    scheme, pattern = ("s3", BUCKET) if provider == "AWS_S3" else ("gs", GCS_BUCKET)
    if parts.scheme != scheme or not parts.netloc:
        raise ValueError(f"{provider} needs {form}, not {path!r}")
    if not pattern.match(parts.netloc):
        raise ValueError(f"{parts.netloc!r} is not a valid bucket name (lower case, digits, '.', '-')")
    return Location(provider, parts.netloc, _prefix(parts.path), path=path)


def without_credentials(path: str) -> str:
    """Return ``path`` without user info, query and fragment, which may hold a key or SAS token."""
    parts = urlsplit(path)
    if not parts.scheme:
        return path
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def _azure(parts, path: str, form: str) -> Location:
    host = AZURE_HOST.match(parts.hostname or "")
    segments = [s for s in parts.path.split("/") if s]
    if parts.scheme != "https" or host is None or not segments:
        raise ValueError(f"Azure_Blob needs {form}, not {path!r}")
    container = segments[0]
    if not CONTAINER.match(container):
        raise ValueError(f"{container!r} is not a valid container name (3-63 of a-z, 0-9, '-')")
    return Location(
        "Azure_Blob",
        container,
        "/".join(segments[1:]),
        account=host.group("account"),
        endpoint_suffix=host.group("suffix"),
        path=path,
    )


def _prefix(path: str) -> str:
    segments = [s for s in path.split("/") if s]
    if any(s in {".", ".."} for s in segments):
        raise ValueError(f"the prefix {path!r} must not contain '.' or '..'")
    return "/".join(segments)


class CredentialFields(BaseModel):
    """The credentials and endpoints of a destination, as the SDKs name them; declared only here.
    Settings has these fields twice: as they are (the primary destination's, AWS_REGION) and
    prefixed (the off-site one's, BACKUP_OFFSITE_AWS_REGION). None means: use the SDK's own
    default (instance role, managed identity, application default credentials)."""

    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    aws_region: str | None = None
    aws_endpoint_url: str | None = None
    azure_storage_account: str | None = None
    azure_storage_key: SecretStr | None = None
    azure_storage_connection_string: SecretStr | None = None
    google_application_credentials: Path | None = None
    google_cloud_project: str | None = None
    storage_emulator_host: str | None = None


class Credentials(CredentialFields):
    """The credentials of one destination, frozen and hashable: clients are cached by them."""

    model_config = ConfigDict(frozen=True)


@dataclass(frozen=True)
class Destination:
    """One place backups are written to: ``role`` is "primary" or "offsite"."""

    role: str
    location: Location
    credentials: Credentials
    part_size: int = 8 << 20
    concurrency: int = 4
    retries: int = 5
    timeout: float = 60.0
    lock_mode: str | None = None  # BACKUP_IMMUTABILITY_MODE when BACKUP_IMMUTABILITY is on

    @property
    def provider(self) -> str:
        return self.location.provider

    def same_place(self, other: Destination) -> bool:
        """Return whether both destinations are the same place: same location, same endpoint."""
        ours, theirs = self.credentials, other.credentials
        same_endpoint = all(getattr(ours, f) == getattr(theirs, f) for f in ENDPOINT_FIELDS)
        return same_endpoint and self.location.same_place(other.location)

    def variable(self, name: str) -> str:
        """Return the environment variable that sets ``name`` for this destination, for messages:
        BACKUP_OFFSITE_<NAME> for the off-site one, else <NAME>; BACKUP_STORAGE_PATH likewise."""
        if self.role != "offsite":
            return name
        return "BACKUP_OFFSITE_PATH" if name == "BACKUP_STORAGE_PATH" else f"BACKUP_OFFSITE_{name}"
