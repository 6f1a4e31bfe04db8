"""The one settings model: every environment variable VQ Backup reads, validated at start-up.

Names are the operators' guide's, unchanged. Every secret can also come from a file named by
``<NAME>_FILE`` (Docker secrets). Bad configuration raises :class:`ConfigError`, which lists every
problem at once and never echoes a secret.
"""

from __future__ import annotations

import difflib
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from vq_tasks.manifest import Compression
from vq_tasks.settings import checks, secrets
from vq_tasks.settings.secrets import CREDENTIAL_FIELDS, OFFSITE, SECRET_FIELDS, SecretFileSource
from vq_tasks.storage import PROVIDERS
from vq_tasks.storage.location import (
    ENDPOINT_FIELDS,
    CredentialFields,
    Credentials,
    Destination,
    parse_location,
    without_credentials,
)

CommaList = Annotated[list[str], NoDecode]
CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
CELERY_SCHEMES = {"redis", "rediss", "amqp", "amqps", "pyamqp", "filesystem"}
DEFAULT_COMPRESSION_LEVEL = {"gzip": 6, "zstd": 3}

# The off-site destination's credentials: each field of CredentialFields (the one declaration),
# named with the prefix BACKUP_OFFSITE_. mypy cannot follow a generated base class, so it is shown
# a plain model: these fields are read by name only (destination("offsite"), secret_values).
if TYPE_CHECKING:
    OffsiteCredentialFields = BaseModel
else:
    OffsiteCredentialFields = create_model(
        "OffsiteCredentialFields",
        **{OFFSITE + name: (info.annotation, info) for name, info in CredentialFields.model_fields.items()},
    )


class ConfigError(Exception):
    """Configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


class Settings(BaseSettings, CredentialFields, OffsiteCredentialFields):
    """Every setting of VQ Backup; field ``x_y`` is read from the environment variable ``X_Y``.

    The cloud credentials and endpoints (AWS_REGION, AZURE_STORAGE_KEY, ...) are CredentialFields',
    named as the SDKs name them; unset: the SDK's default chain. The off-site destination takes
    each from BACKUP_OFFSITE_<NAME>, else from <NAME>, except the endpoints and the connection
    string (they say where, not who): see :meth:`destination`."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    # Schedule and retention
    backup_schedule: str = "0 2 * * *"
    backup_drill_schedule: str = "0 4 1 * *"
    backup_prune_schedule: str = "30 */6 * * *"
    backup_timezone: str = "UTC"
    backup_retention_days: int = Field(30, ge=1)
    backup_logs_retention_days: int = Field(7, ge=1)
    backup_weekly_retention_weeks: int = Field(12, ge=0)
    backup_monthly_retention_months: int = Field(12, ge=0)
    backup_logs_window_days: int = Field(7, ge=1)
    backup_name_prefix: str = Field("virtualqueue_backup", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

    # Anomaly checks: each backup compared with the good complete backups before it
    backup_anomaly_window: int = Field(7, ge=0, le=100)  # 0: no comparison
    backup_anomaly_table_drop_percent: int = Field(50, ge=1, le=100)
    backup_anomaly_rows_drop_percent: int = Field(50, ge=1, le=100)
    backup_anomaly_keys_drop_percent: int = Field(50, ge=1, le=100)
    backup_anomaly_size_drop_percent: int = Field(50, ge=1, le=100)
    backup_anomaly_table_gone: bool = True
    backup_anomaly_config_gone: bool = True
    backup_anomaly_min_rows: int = Field(1000, ge=0)  # smaller tables (and totals) are not compared
    backup_anomaly_min_keys: int = Field(1000, ge=0)
    backup_anomaly_min_bytes: int = Field(1 << 20, ge=0)
    backup_anomaly_keep_good: int = Field(3, ge=0)

    # Storage and staging
    backup_storage_provider: str = "Local"
    backup_storage_path: str = "/var/backups/virtualqueue"
    backup_staging_dir: Path = Path("/var/tmp/vq-backup/staging")
    compression_enabled: bool = True
    compression_algorithm: Literal["gzip", "zstd"] = "gzip"
    compression_level: int | None = Field(None, ge=1, le=22)  # unset: the algorithm's default
    compression_threads: int = Field(2, ge=1, le=64)
    backup_upload_part_size_mb: int = Field(8, ge=5, le=4096)
    backup_upload_concurrency: int = Field(4, ge=1, le=32)
    backup_storage_retries: int = Field(5, ge=1, le=20)
    backup_storage_timeout: float = Field(60.0, gt=0)

    # Off-site copy: a second destination, with its own credentials (OffsiteCredentialFields)
    backup_offsite_provider: str | None = None
    backup_offsite_path: str | None = None

    # Encryption (age format, X25519 recipients: workers hold public keys only) and signed manifests
    backup_encryption_enabled: bool = False
    backup_encryption_recipients: CommaList = []
    backup_encryption_identity_file: Path | None = None
    backup_signing_key_file: Path | None = None
    backup_signing_public_keys: CommaList = []

    # Immutable backups: every stored object locked by the provider until retention lets it go
    backup_immutability: bool = False
    backup_immutability_mode: Literal["governance", "compliance"] = "governance"

    # Who may send destructive tasks (a forced restore, prune): Ed25519 keys, as for manifests
    backup_task_key_file: Path | None = None
    backup_task_public_keys: CommaList = []
    backup_task_authorization_max_age: int = Field(24 * 3600, ge=60)

    # What is backed up
    backup_config_paths: CommaList = ["/etc/virtualqueue"]
    backup_log_paths: CommaList = ["/var/log/virtualqueue"]
    db_host: str = "localhost"
    db_port: int = Field(5432, ge=1, le=65535)
    db_name: str = "virtualqueue"
    db_user: str = "postgres"
    db_password: SecretStr | None = None
    db_connect_timeout: int = Field(10, ge=1)
    # TLS to PostgreSQL, given to pg_dump, psql and psycopg alike (libpq's sslmode and files)
    db_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    db_sslrootcert: Path | None = None
    db_sslcert: Path | None = None
    db_sslkey: Path | None = None  # a secret file: mode 600
    pg_bin_dir: Path | None = None
    redis_host: str = "localhost"
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_username: str | None = None  # an ACL user; unset: the default user
    redis_password: SecretStr | None = None
    redis_timeout: float = Field(30.0, gt=0)
    # TLS to the Redis that is backed up (and restored, and drilled against)
    redis_tls: bool = False
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = None  # a secret file: mode 600
    # how the RDB is taken: SYNC (replication), DUMP (a logical snapshot), or auto (SYNC where allowed)
    redis_backup_method: Literal["auto", "sync", "dump"] = "auto"

    # Restore
    redis_server_bin: Path | None = None
    db_maintenance_db: str = "postgres"
    backup_restore_jobs: int | None = Field(None, ge=1, le=64)  # unset: the CPUs, at most 8
    backup_restore_config_dir: Path | None = None
    backup_restore_logs_dir: Path = Path("/var/tmp/vq-backup/restored-logs")
    app_healthcheck_url: str | None = None
    backup_audit_log: Path | None = Path("/var/log/vq-backup/audit.jsonl")

    # Celery: never the Redis that is backed up
    celery_broker_url: SecretStr = SecretStr("redis://localhost:6380/0")
    celery_result_backend: SecretStr | None = None
    backup_task_time_limit: int = Field(6 * 3600, ge=60)
    backup_lock_ttl: int = Field(1800, ge=5)
    backup_worker_lost_after: int = Field(60, ge=6, le=3600)
    backup_retry_max: int = Field(3, ge=0)
    backup_retry_backoff: float = Field(30.0, gt=0)

    # Alerts
    notification_email: str | None = None
    notification_urls: SecretStr | None = None  # Apprise URLs, comma- or space-separated
    backup_alert_on_failure: bool = True
    backup_alert_email: str | None = None
    backup_alert_urls: SecretStr | None = None
    smtp_host: str = "localhost"
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    smtp_ssl: bool = False
    smtp_from: str = "vq-backup@localhost"
    smtp_timeout: float = Field(30.0, gt=0)
    smtp_ca_file: Path | None = None
    backup_stale_after_hours: float = Field(26.0, gt=0)
    backup_storage_min_free_percent: float = Field(10.0, ge=0, lt=100)
    backup_storage_quota_gb: float | None = Field(None, gt=0)
    backup_offsite_storage_quota_gb: float | None = Field(None, gt=0)

    # Monitoring: the exporter (vq-backup exporter) and the checks behind alerts and /healthz
    backup_exporter_host: str = "0.0.0.0"
    backup_exporter_port: int = Field(8080, ge=1, le=65535)
    backup_monitor_interval: float = Field(60.0, ge=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, SecretFileSource(settings_cls), env_settings)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        """An empty value of an optional variable means unset (compose's ``${AWS_REGION:-}``)."""
        if not isinstance(data, dict):
            return data
        optional = {
            name
            for name, field in cls.model_fields.items()
            if not field.is_required() and type(None) in get_args(field.annotation)
        }
        return {
            key: None if value == "" and key.lower() in optional else value for key, value in data.items()
        }

    @field_validator(*SECRET_FIELDS, mode="before")
    @classmethod
    def _secret_file_usable(cls, value: Any) -> Any:
        return secrets.usable(value)

    @field_validator(
        "backup_config_paths",
        "backup_log_paths",
        "backup_encryption_recipients",
        "backup_signing_public_keys",
        "backup_task_public_keys",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("backup_schedule", "backup_drill_schedule", "backup_prune_schedule")
    @classmethod
    def _cron_parses(cls, value: str) -> str:
        crontab_from_expression(value)
        return value

    @field_validator("compression_algorithm", mode="before")
    @classmethod
    def _algorithm_lowercase(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("backup_timezone")
    @classmethod
    def _timezone_known(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as UTC)") from None
        return value

    @field_validator("backup_storage_provider", "backup_offsite_provider")
    @classmethod
    def _provider_known(cls, value: str | None) -> str | None:
        if value is None or value in PROVIDERS:
            return value
        close = difflib.get_close_matches(value, PROVIDERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown provider {value!r}{hint} (available: {', '.join(PROVIDERS)})")

    @field_validator("celery_broker_url", "celery_result_backend")
    @classmethod
    def _celery_url_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and urlsplit(value.get_secret_value()).scheme not in CELERY_SCHEMES:
            raise ValueError("must be a redis://, rediss://, amqp:// or filesystem:// URL")
        return value

    @field_validator("backup_storage_path", "backup_offsite_path")
    @classmethod
    def _path_fits_provider(cls, value: str | None, info: ValidationInfo) -> str | None:
        offsite = info.field_name == "backup_offsite_path"
        provider_field = "backup_offsite_provider" if offsite else "backup_storage_provider"
        provider = info.data.get(provider_field)  # absent when the provider itself is invalid
        if value is not None and provider:
            parse_location(provider, value)
        return value

    @model_validator(mode="after")
    def _fit_together(self) -> Settings:
        """Check what no single field tells, every area at once, so that start-up lists every problem."""
        problems = checks.problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def compression(self) -> Compression:
        """What parts are compressed with: COMPRESSION_ALGORITHM, or none if not COMPRESSION_ENABLED."""
        return self.compression_algorithm if self.compression_enabled else "none"

    @property
    def effective_compression_level(self) -> int:
        """COMPRESSION_LEVEL, or when unset the algorithm's default: 6 for gzip, 3 for zstd."""
        return self.compression_level or DEFAULT_COMPRESSION_LEVEL[self.compression_algorithm]

    @property
    def restore_jobs(self) -> int:
        """Connections a database restore loads over: BACKUP_RESTORE_JOBS, or the CPUs, at most 8
        (more than the CPUs only helps a server elsewhere with more of them)."""
        return self.backup_restore_jobs or min(os.cpu_count() or 1, 8)

    @property
    def result_backend_url(self) -> str:
        """The result backend, which defaults to the broker when it is a Redis."""
        backend = self.celery_result_backend or self.celery_broker_url
        return backend.get_secret_value()

    def destination(self, role: str = "primary") -> Destination | None:
        """Return the primary destination, or the off-site one (None when not configured). The
        off-site one takes each credential from BACKUP_OFFSITE_<NAME>, else from <NAME>."""
        if role == "primary":
            provider, path, prefix = self.backup_storage_provider, self.backup_storage_path, ""
        elif role == "offsite":
            if not (self.backup_offsite_provider and self.backup_offsite_path):
                return None
            provider, path, prefix = self.backup_offsite_provider, self.backup_offsite_path, OFFSITE
        else:
            raise ValueError(f"unknown destination {role!r} (primary or offsite)")
        values = {}
        for name in CREDENTIAL_FIELDS:
            own = getattr(self, prefix + name)
            inherited = None if name in ENDPOINT_FIELDS else getattr(self, name)
            values[name] = own if own is not None or not prefix else inherited
        return Destination(
            role=role,
            location=parse_location(provider, path),
            credentials=Credentials(**values),
            part_size=self.backup_upload_part_size_mb << 20,
            concurrency=self.backup_upload_concurrency,
            retries=self.backup_storage_retries,
            timeout=self.backup_storage_timeout,
            lock_mode=self.backup_immutability_mode if self.backup_immutability else None,
        )

    def secret_values(self) -> list[str]:
        """Return every secret string in these settings (passwords, and those inside URLs)."""
        return secrets.secret_values(self)


def crontab_from_expression(expression: str) -> Any:
    """Given a five-field cron expression, return Celery's crontab. Raise ValueError if malformed."""
    from celery.schedules import crontab

    fields = expression.split()
    if len(fields) != len(CRON_FIELDS):
        raise ValueError(f"cron expression {expression!r} needs 5 fields (minute hour day month weekday)")
    try:
        return crontab(**dict(zip(CRON_FIELDS, fields, strict=True)))
    except Exception as exc:  # celery raises ValueError or ParseException
        raise ValueError(f"cron expression {expression!r} is invalid: {exc}") from None


def _describe(error: ErrorDetails) -> str:
    """Return one line for a pydantic error: the variable, its value if not secret, the problem."""
    message = re.sub(r"^Value error, ", "", error["msg"])
    if not error["loc"]:
        return message  # checks across variables: each line names its variables
    name = str(error["loc"][0]).upper()
    if name.lower() in SECRET_FIELDS or isinstance(error.get("input"), dict | list):
        return f"{name}: {message}"
    shown = error.get("input")
    if name.endswith("_PATH") and isinstance(shown, str):
        shown = without_credentials(shown)
    return f"{name}={shown!r}: {message}"


def load_settings(**overrides: Any) -> Settings:
    """Return settings read from the environment (and ``overrides``). Raise ConfigError listing
    every problem at once."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        raise ConfigError([part for line in lines for part in line.split("\n")]) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process's settings, read once."""
    return load_settings()
