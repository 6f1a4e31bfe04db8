"""Storage providers, chosen by BACKUP_STORAGE_PROVIDER and imported only when used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vq_tasks.settings import Settings
    from vq_tasks.storage.base import Storage

PROVIDERS: dict[str, str] = {
    "Local": "vq_tasks.storage.local:LocalStorage",
}


def open_storage(settings: Settings) -> Storage:
    """Given settings, return the configured provider's storage (validated by the settings)."""
    module_name, class_name = PROVIDERS[settings.backup_storage_provider].split(":")
    provider = getattr(importlib.import_module(module_name), class_name)
    return provider.from_settings(settings)
