"""Which settings are secrets, reading them from ``<NAME>_FILE`` (Docker secrets), and finding every
secret string in the settings so that messages can be redacted."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import SecretStr
from pydantic_settings import PydanticBaseSettingsSource

from vq_tasks.storage.location import CredentialFields

if TYPE_CHECKING:
    from vq_tasks.settings.model import Settings

CREDENTIAL_FIELDS = tuple(CredentialFields.model_fields)
OFFSITE = "backup_offsite_"  # the prefix of the off-site destination's credential fields
CLOUD_SECRETS = tuple(
    name for name, field in CredentialFields.model_fields.items() if SecretStr in get_args(field.annotation)
)
SECRET_FIELDS = (
    "db_password",
    "redis_password",
    "smtp_password",
    "celery_broker_url",
    "celery_result_backend",
    "backup_alert_urls",
    "notification_urls",
    *CLOUD_SECRETS,
    *(OFFSITE + name for name in CLOUD_SECRETS),
)
CONNECTION_STRING_SECRETS = re.compile(r"(?:AccountKey|SharedAccessSignature)=([^;]+)", re.IGNORECASE)


class _Unreadable(str):
    """Marks a secret whose ``*_FILE`` could not be used; :func:`usable` reports it."""


def usable(value: Any) -> Any:
    """Return ``value``. Raise ValueError saying why if it stands for a ``*_FILE`` that could not
    be used (the message names the variables and the file, never a secret)."""
    if isinstance(value, _Unreadable):
        raise ValueError(str(value))
    return value


class SecretFileSource(PydanticBaseSettingsSource):
    """Read ``<NAME>_FILE`` for every secret field; both forms set at once is an error."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in SECRET_FIELDS:
            env_name = name.upper()
            path = os.environ.get(f"{env_name}_FILE")
            if not path:
                continue
            if os.environ.get(env_name):
                values[name] = _Unreadable(f"set {env_name} or {env_name}_FILE, not both")
                continue
            try:
                values[name] = Path(path).read_text().rstrip("\r\n")
            except OSError as exc:
                values[name] = _Unreadable(f"{env_name}_FILE {path}: {exc.strerror}")
        return values


def secret_values(settings: Settings) -> list[str]:
    """Return every secret string in ``settings`` (passwords, and those inside URLs: each Apprise
    URL whole and its secret parts)."""
    found = []
    for name in SECRET_FIELDS:
        value = getattr(settings, name)
        if value is None:
            continue
        text = value.get_secret_value()
        if name.startswith("celery_"):
            password = urlsplit(text).password or ""
            found += [password, unquote(password)]  # as typed in the URL, and decoded
        elif name.endswith("connection_string"):
            found += [text, *CONNECTION_STRING_SECRETS.findall(text)]
        elif name in APPRISE_URL_FIELDS:
            found += [text, *(part for url in split_urls(text) for part in [url, *url_secret_parts(url)])]
        else:
            found.append(text)
    return sorted({text for text in found if text})


APPRISE_URL_FIELDS = ("backup_alert_urls", "notification_urls")
MIN_SECRET_PART = 6  # shorter pieces of a URL are words of any message, replaced everywhere otherwise
PUBLIC_HOSTS = {"localhost"}
PLAIN_WORD = re.compile(r"[a-z]+(?:[-_][a-z]+)*")  # webhook, services, alert-hooks: no token


def split_urls(text: str) -> list[str]:
    """Return the Apprise URLs of BACKUP_ALERT_URLS or NOTIFICATION_URLS: separated by commas or
    whitespace."""
    return [url for url in re.split(r"[\s,]+", text) if url]


def url_secret_parts(url: str) -> list[str]:
    """Return the pieces of Apprise URL ``url`` that may be secrets, as typed and decoded: its user,
    password and query values; and those of its host (unless it names a machine: a dot, localhost,
    an IP), port (Telegram's bot token sits there) and path segments that are no plain word (a token
    has digits or capitals; Slack, Teams and Discord put theirs in the host and path). Pieces under
    MIN_SECRET_PART characters are left out: they would be replaced in every message (the whole URL,
    redacted as well, covers them)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # a malformed [IPv6] host: the whole URL is all there is to redact
        return []
    userinfo, _, hostport = parts.netloc.rpartition("@")
    has_port = hostport.rfind(":") > hostport.rfind("]")  # [IPv6] hosts hold colons too
    host, _, port = hostport.rpartition(":") if has_port else (hostport, "", "")
    pieces = parts.path.split("/")
    if port and not port.isdigit():
        pieces += [hostport, port, host]
    if not ("." in host or host.startswith("[") or host.lower() in PUBLIC_HOSTS):
        pieces.append(host)
    pieces = [piece for piece in pieces if not PLAIN_WORD.fullmatch(unquote(piece))]
    pieces += [*userinfo.split(":", 1), *(value for _, value in parse_qsl(parts.query))]
    pieces += [value for pair in parts.query.split("&") for value in pair.split("=", 1)[1:]]
    decoded = [unquote(piece) for piece in pieces]
    return sorted({piece for piece in [*pieces, *decoded] if len(piece) >= MIN_SECRET_PART})
