"""Storage providers, chosen by BACKUP_STORAGE_PROVIDER (and BACKUP_OFFSITE_PROVIDER) and imported
only when used, so that a worker needs only the SDK of the provider it writes to."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vq_tasks.settings import Settings
    from vq_tasks.storage.base import Storage
    from vq_tasks.storage.location import Destination

PROVIDERS: dict[str, str] = {
    "Local": "vq_tasks.storage.local:LocalStorage",
    "AWS_S3": "vq_tasks.storage.s3:S3Storage",
    "Azure_Blob": "vq_tasks.storage.azure:AzureStorage",
    "Google_Cloud": "vq_tasks.storage.gcs:GCSStorage",
}
SDK_PACKAGES = {
    "AWS_S3": "boto3",
    "Azure_Blob": "azure-storage-blob",
    "Google_Cloud": "google-cloud-storage",
}
ROLES = ("primary", "offsite")


def open_destination(destination: Destination) -> Storage:
    """Given a destination, return its provider's storage. Raise StorageError naming the package
    to install when the provider's SDK is missing."""
    from vq_tasks.storage.base import StorageError

    module_name, class_name = PROVIDERS[destination.provider].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = SDK_PACKAGES.get(destination.provider, exc.name)
        raise StorageError(
            f"{destination.provider} needs the Python package {package} ({exc}); install vq-backup[cloud]"
        ) from None
    return getattr(module, class_name).from_destination(destination)


def open_storage(settings: Settings, role: str = "primary") -> Storage:
    """Given settings, return the storage of the primary or the off-site destination. Raise
    StorageError if ``role`` is "offsite" and none is configured. With BACKUP_IMMUTABILITY on, a
    store that keeps versions is read as the backups were committed (``storage.committed``)."""
    from vq_tasks.storage.base import StorageError

    destination = settings.destination(role)
    if destination is None:
        raise StorageError("no off-site destination: set BACKUP_OFFSITE_PROVIDER and BACKUP_OFFSITE_PATH")
    storage = open_destination(destination)
    if destination.lock_mode is not None and storage.keeps_versions:
        from vq_tasks.storage.committed import CommittedView

        return CommittedView(storage, settings.backup_name_prefix)  # a delete marker hides nothing
    return storage
