"""The one settings model (model): every environment variable VQ Backup reads, validated at start-up,
with the checks across variables (checks) and secrets read from ``<NAME>_FILE`` (secrets)."""

from vq_tasks.settings.checks import LOOPBACK_NAMES
from vq_tasks.settings.model import (
    ConfigError,
    Settings,
    crontab_from_expression,
    get_settings,
    load_settings,
)

__all__ = [
    "LOOPBACK_NAMES",
    "ConfigError",
    "Settings",
    "crontab_from_expression",
    "get_settings",
    "load_settings",
]
