"""Credentials and clients of Google Cloud Storage: anonymous at an emulator, a key file named by
GOOGLE_APPLICATION_CREDENTIALS, else the application default credentials; one client per process."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from vq_tasks.storage.base import StorageError
from vq_tasks.storage.location import Destination

KEY_FILE_LIMIT = 1 << 20
KEY_VARIABLE = "GOOGLE_APPLICATION_CREDENTIALS"


@functools.lru_cache(maxsize=8)
def client_for(destination: Destination, pid: int) -> Any:
    """Return the client of ``destination`` for process ``pid``: a forked worker builds its own."""
    from google.cloud import storage

    credentials, project, options = _credentials(destination)
    project = destination.credentials.google_cloud_project or project
    return storage.Client(project=project, credentials=credentials, client_options=options)


def _credentials(destination: Destination) -> tuple[Any, str | None, Any]:
    """Return the credentials, their project and the client options of ``destination``: anonymous
    at an emulator, from the key file when one is named, else the application default ones."""
    import google.auth
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import DefaultCredentialsError

    settings = destination.credentials
    if settings.storage_emulator_host:
        host = settings.storage_emulator_host
        endpoint = host if "://" in host else f"http://{host}"
        return AnonymousCredentials(), None, ClientOptions(api_endpoint=endpoint)
    if settings.google_application_credentials:
        return (*_key_file(destination, settings.google_application_credentials), None)
    try:
        credentials, project = google.auth.default()
    except DefaultCredentialsError:
        raise StorageError(
            f"{destination.provider}:{destination.location.path}: no Google credentials found: set "
            f"{destination.variable(KEY_VARIABLE)} to a service account key file, or run as a service account"
        ) from None
    return credentials, project, None


def _key_file(destination: Destination, path: Path) -> tuple[Any, str | None]:
    """Return the credentials in the key file ``path`` (a service account key, or a user's
    credentials) and their project. Raise a permanent StorageError naming the variable if the file
    is missing or malformed; the file's content is never quoted."""
    from google.oauth2 import credentials as user
    from google.oauth2 import service_account

    setting = (
        f"{destination.provider}:{destination.location.path}: {destination.variable(KEY_VARIABLE)}={path}"
    )
    try:
        with open(path, "rb") as file:
            info = json.loads(file.read(KEY_FILE_LIMIT))
    except FileNotFoundError:
        raise StorageError(f"{setting}: no such file; point it at a service account key (JSON)") from None
    except OSError as exc:
        raise StorageError(f"{setting}: cannot be read ({exc.strerror}); check its owner and mode") from None
    except ValueError:
        info = None
    kind = info.get("type") if isinstance(info, dict) else None
    try:
        if kind == "service_account":
            return service_account.Credentials.from_service_account_info(info), info.get("project_id")
        if kind == "authorized_user":
            return user.Credentials.from_authorized_user_info(info), info.get("quota_project_id")
    except Exception:
        pass  # missing fields, a broken private key: said below, without the library's details
    raise StorageError(
        f"{setting}: not a valid service account key (JSON); create a new key, or unset the variable "
        "to use the application default credentials (workload identity)"
    )
