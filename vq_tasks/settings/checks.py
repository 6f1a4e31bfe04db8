"""The checks across variables: what no single setting tells. Each area's check returns one line
per problem, naming its variables, so that start-up lists every problem at once."""

from __future__ import annotations

import logging
import os
import re
import ssl
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vq_tasks.crypto.encryption import load_identities, parse_recipients
from vq_tasks.crypto.signing import key_id, load_signing_key, parse_public_keys
from vq_tasks.errors import PermanentError
from vq_tasks.settings.secrets import APPRISE_URL_FIELDS, split_urls

if TYPE_CHECKING:
    from vq_tasks.settings.model import Settings

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
COMPRESSION_LEVELS = {"gzip": (1, 9), "zstd": (1, 19)}  # zstd's 20-22 need far more memory
URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31})://")
ANY_URL = re.compile(URL_SCHEME.pattern + r"\S*")


def problems(settings: Settings) -> list[str]:
    """Return every problem across variables of ``settings``, of every area."""
    return [
        *destination_problems(settings),
        *encryption_problems(settings),
        *service_problems(settings),
        *signing_problems(settings),
        *task_key_problems(settings),
        *compression_problems(settings),
        *db_tls_problems(settings),
        *redis_tls_problems(settings),
        *alert_url_problems(settings),
    ]


def destination_problems(settings: Settings) -> list[str]:
    """The off-site destination: both its variables or none, and another place than the primary."""
    if bool(settings.backup_offsite_provider) != bool(settings.backup_offsite_path):
        return ["BACKUP_OFFSITE_PROVIDER and BACKUP_OFFSITE_PATH go together: set both or none"]
    offsite, primary = settings.destination("offsite"), settings.destination()
    if offsite is not None and primary is not None and offsite.same_place(primary):
        return ["BACKUP_OFFSITE_PATH is the primary storage path: the copy must go elsewhere"]
    return []


def encryption_problems(settings: Settings) -> list[str]:
    """The encryption recipients and identity file: parseable, and recipients when it is enabled."""
    problems = []
    try:
        recipients = parse_recipients(settings.backup_encryption_recipients)
    except ValueError as exc:
        problems.append(f"BACKUP_ENCRYPTION_RECIPIENTS: {exc}")
        recipients = None
    if settings.backup_encryption_enabled and recipients == []:
        problems.append(
            "BACKUP_ENCRYPTION_ENABLED is true but BACKUP_ENCRYPTION_RECIPIENTS is empty: give at least "
            "one age public key (age1...), e.g. the operators' and an escrow key"
        )
    if settings.backup_encryption_identity_file is not None:
        try:
            load_identities(settings.backup_encryption_identity_file)
        except PermanentError as exc:
            problems.append(str(exc))
    return problems


def service_problems(settings: Settings) -> list[str]:
    """SMTP's TLS and login, and Celery's URLs (never the Redis that is backed up)."""
    found = []
    if settings.smtp_ssl and settings.smtp_starttls:
        found.append("SMTP_SSL and SMTP_STARTTLS exclude each other")
    if (
        settings.smtp_user
        and not (settings.smtp_ssl or settings.smtp_starttls)
        and settings.smtp_host not in LOOPBACK_NAMES
    ):
        found.append(
            f"SMTP_USER is set but neither SMTP_SSL nor SMTP_STARTTLS: the password would cross to "
            f"{settings.smtp_host} in clear text"
        )
    if settings.smtp_ca_file is not None and not settings.smtp_ca_file.is_file():
        found.append(f"SMTP_CA_FILE={str(settings.smtp_ca_file)!r}: no such file")
    if urlsplit(settings.result_backend_url).scheme not in {"redis", "rediss"}:
        found.append(
            "CELERY_RESULT_BACKEND must be a redis:// URL (it holds the chord state and the run lock)"
        )
    urls = {"CELERY_BROKER_URL": settings.celery_broker_url}
    if settings.celery_result_backend is not None:  # otherwise it is the broker, checked already
        urls["CELERY_RESULT_BACKEND"] = settings.celery_result_backend
    for name, url in urls.items():
        if is_backed_up_redis(settings, url.get_secret_value()):
            found.append(
                f"{name} points at the Redis that is backed up ({settings.redis_host}:"
                f"{settings.redis_port}); restoring it would wipe Celery's state: use another Redis"
            )
        found += rediss_problems(name, url.get_secret_value())
    return found


def rediss_problems(name: str, url: str) -> list[str]:
    """A rediss:// URL must have the server's certificate checked, in the word both kombu and
    redis-py read (redis-py refuses CERT_REQUIRED; Celery's result backend fails without it)."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return []
    reqs = dict(parse_qsl(parts.query)).get("ssl_cert_reqs")
    if reqs != "required":  # optional and none would take any certificate: TLS without knowing who
        return [
            f"{name}: a rediss:// URL needs ssl_cert_reqs=required (in lower case), not {reqs or 'nothing'}: "
            "e.g. ...?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem"
        ]
    return []


def signing_problems(settings: Settings) -> list[str]:
    """The signing key file, and the public keys manifests are checked against."""
    found = []
    if settings.backup_signing_key_file is not None:
        try:
            load_signing_key(settings.backup_signing_key_file)
        except PermanentError as exc:
            found.append(str(exc))
    try:
        parse_public_keys(settings.backup_signing_public_keys)
    except ValueError as exc:
        found.append(f"BACKUP_SIGNING_PUBLIC_KEYS: {exc}")
    return found


def task_key_problems(settings: Settings) -> list[str]:
    """The key that signs destructive tasks, the keys workers accept, and that the one is among
    the others when a process has both (its own tasks would be refused otherwise)."""
    found, own = [], None
    if settings.backup_task_key_file is not None:
        try:
            own = key_id(load_task_key(settings.backup_task_key_file).public_key())
        except PermanentError as exc:
            found.append(str(exc))
    try:
        trusted = parse_public_keys(settings.backup_task_public_keys)
    except ValueError as exc:
        return [*found, f"BACKUP_TASK_PUBLIC_KEYS: {exc}"]
    if own is not None and trusted and own not in trusted:
        found.append(
            f"BACKUP_TASK_KEY_FILE holds key {own}, which is not in BACKUP_TASK_PUBLIC_KEYS: the prunes "
            "and restores this process sends would be refused"
        )
    return found


def load_task_key(path: Path) -> Ed25519PrivateKey:
    """Return the Ed25519 private key of BACKUP_TASK_KEY_FILE ``path``, in the format of
    BACKUP_SIGNING_KEY_FILE. Raise PermanentError naming the variable and file, never its content."""
    try:
        return load_signing_key(path)
    except PermanentError as exc:
        raise PermanentError(str(exc).replace("BACKUP_SIGNING_KEY_FILE", "BACKUP_TASK_KEY_FILE", 1)) from None


def compression_problems(settings: Settings) -> list[str]:
    """COMPRESSION_LEVEL within the range of COMPRESSION_ALGORITHM."""
    low, high = COMPRESSION_LEVELS[settings.compression_algorithm]
    level = settings.compression_level
    if level is not None and not low <= level <= high:
        return [f"COMPRESSION_LEVEL={level}: {settings.compression_algorithm} takes {low} to {high}"]
    return []


def is_backed_up_redis(settings: Settings, url: str) -> bool:
    """Return whether ``url`` is a Redis URL of the Redis that is backed up (REDIS_HOST, REDIS_PORT)."""
    parts = urlsplit(url)
    if parts.scheme not in {"redis", "rediss"}:
        return False
    host = parts.hostname or "localhost"
    same_host = host == settings.redis_host or {host, settings.redis_host} <= LOOPBACK_NAMES
    return same_host and (parts.port or 6379) == settings.redis_port


def redis_tls_problems(settings: Settings) -> list[str]:
    """REDIS_TLS's files: set only with REDIS_TLS, each one there, the certificate and its key
    together and matching, the key readable by its owner only (it is a secret). Messages name
    the variables and files, never a key's content."""
    named = {
        name: path
        for name, path in (
            ("REDIS_TLS_CA_FILE", settings.redis_tls_ca_file),
            ("REDIS_TLS_CERT_FILE", settings.redis_tls_cert_file),
            ("REDIS_TLS_KEY_FILE", settings.redis_tls_key_file),
        )
        if path is not None
    }
    found = []
    if named and not settings.redis_tls:
        found.append(f"{', '.join(named)} set but REDIS_TLS is false: set REDIS_TLS=true or unset them")
    if ("REDIS_TLS_CERT_FILE" in named) != ("REDIS_TLS_KEY_FILE" in named):
        found.append("REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE go together: set both or none")
    found += [f"{name}={str(path)!r}: no such file" for name, path in named.items() if not path.is_file()]
    key = settings.redis_tls_key_file
    if key is not None and key.is_file() and stat.S_IMODE(key.stat().st_mode) & 0o077:
        found.append(
            f"REDIS_TLS_KEY_FILE {key} has mode {stat.S_IMODE(key.stat().st_mode):04o}: other users could"
            " read the private key; make it mode 600 (chmod 600) or stricter"
        )
    return found or _redis_tls_files_load(settings)


def _redis_tls_files_load(settings: Settings) -> list[str]:
    """REDIS_TLS_CA_FILE holds certificates, and REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE a
    certificate and its private key (unencrypted): what the connection would load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca, cert, key = settings.redis_tls_ca_file, settings.redis_tls_cert_file, settings.redis_tls_key_file
    found = []
    try:
        if ca is not None:
            context.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as exc:
        found.append(f"REDIS_TLS_CA_FILE {ca} holds no PEM certificate ({_ssl_reason(exc)})")
    try:
        if cert is not None:
            context.load_cert_chain(cert, key, password=lambda: b"")
    except (OSError, ssl.SSLError) as exc:
        found.append(
            f"REDIS_TLS_CERT_FILE {cert} and REDIS_TLS_KEY_FILE {key} are not a PEM certificate and its"
            f" unencrypted private key ({_ssl_reason(exc)})"
        )
    return found


def _ssl_reason(exc: OSError) -> str:
    """Given an error loading a TLS file, return its reason in a few words."""
    return getattr(exc, "reason", None) or exc.strerror or str(exc)


def db_tls_problems(settings: Settings) -> list[str]:
    """PostgreSQL's DB_SSL* files, checked at start-up rather than at the first connection: each one
    there, the client certificate and its key together, the key private as libpq demands (it refuses
    the key otherwise), a CA for a verify-* DB_SSLMODE; and no PGSSL* variable in the environment
    that differs (it is not read: pg_dump, psql and psycopg take DB_SSL* only, and ignoring it
    quietly could weaken TLS). Messages name variables and files, never a key's content."""
    tls = {"MODE": settings.db_sslmode, "ROOTCERT": settings.db_sslrootcert}
    tls |= {"CERT": settings.db_sslcert, "KEY": settings.db_sslkey}
    found = [
        f"DB_SSL{name}={str(path)!r}: no such file"
        for name, path in tls.items()
        if isinstance(path, Path) and not path.is_file()
    ]
    if (settings.db_sslcert is None) != (settings.db_sslkey is None):
        found.append("DB_SSLCERT and DB_SSLKEY go together: set both or none")
    key, uid = settings.db_sslkey, os.geteuid()
    if key is not None and key.is_file():
        owner, mode = key.stat().st_uid, stat.S_IMODE(key.stat().st_mode)
        if not os.access(key, os.R_OK):
            found.append(f"DB_SSLKEY={str(key)!r}: this worker's user (uid {uid}) cannot read it")
        elif owner not in (uid, 0) or mode & (0o077 if owner == uid else 0o037):
            found.append(
                f"DB_SSLKEY={str(key)!r} (mode {mode:04o}, owner uid {owner}) is not private to this "
                f"worker's user, and libpq refuses a key others may read: chown it to uid {uid} and chmod 600"
            )
    default_ca = Path.home() / ".postgresql" / "root.crt"
    if (
        settings.db_sslmode.startswith("verify")
        and settings.db_sslrootcert is None
        and not default_ca.is_file()
    ):
        found.append(
            f"DB_SSLMODE={settings.db_sslmode} checks the server's certificate, but DB_SSLROOTCERT is unset "
            f"and libpq's default {default_ca} does not exist: set DB_SSLROOTCERT to the provider's CA bundle"
        )
    for name, value in tls.items():
        wanted, inherited = None if value is None else str(value), os.environ.get(f"PGSSL{name}")
        if inherited not in (None, wanted):
            found.append(
                f"PGSSL{name}={inherited!r} is in the environment but not read (pg_dump, psql and psycopg "
                f"take DB_SSL{name}={wanted or 'unset'}): set DB_SSL{name} and unset PGSSL{name}"
            )
    return found


def alert_url_problems(settings: Settings) -> list[str]:
    """Each URL of BACKUP_ALERT_URLS and NOTIFICATION_URLS is an Apprise URL Apprise can load: a
    known scheme and the tokens it needs. Messages name the variable, the URL's position and its
    scheme, never the URL (it holds tokens)."""
    found = []
    for name in APPRISE_URL_FIELDS:
        value = getattr(settings, name)
        urls = split_urls(value.get_secret_value()) if value is not None else []
        found += [
            f"{name.upper()}: URL {position} {problem}"
            for position, url in enumerate(urls, start=1)
            if (problem := apprise_url_problem(url))
        ]
    return found


def apprise_url_problem(url: str) -> str | None:
    """Return why Apprise cannot load ``url`` (naming its scheme only), or None when it can."""
    quiet_apprise()  # before the import: Apprise logs as it loads
    import apprise

    scheme = URL_SCHEME.match(url)
    if scheme is None:
        return "is no URL (scheme://...): see https://github.com/caronc/apprise/wiki for the forms"
    if apprise.Apprise.instantiate(url) is not None:
        return None
    if scheme[1].lower() not in apprise.NotificationManager():
        return f"({scheme[1]}://): Apprise knows no such scheme (slack, workflows, tgram, json, ...)"
    return f"({scheme[1]}://) is not one Apprise can use: a token or part of it is missing or malformed"


class AppriseLogGuard(logging.Filter):
    """Stop every record of Apprise's logger before any handler sees it: Apprise logs URLs whole
    ("Unparseable URL ...") and tokens it finds invalid. The last warning of each thread is kept,
    its URLs cut to their scheme, for whoever called Apprise to report as the reason (take)."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            try:
                self._local.text = without_urls(record.getMessage())
            except Exception:  # a malformed record of Apprise's: its template says enough
                self._local.text = without_urls(str(record.msg))
        return False

    def take(self) -> str:
        """Return the last warning of this thread since the previous take ("" if none)."""
        text, self._local.text = getattr(self._local, "text", ""), ""
        return text


def quiet_apprise() -> AppriseLogGuard:
    """Return the guard on Apprise's logger, put there (and the logger set to WARNING) the first time."""
    logger = logging.getLogger("apprise")
    for guard in logger.filters:
        if isinstance(guard, AppriseLogGuard):
            return guard
    guard = AppriseLogGuard()
    logger.addFilter(guard)
    logger.setLevel(logging.WARNING)
    return guard


def without_urls(text: str) -> str:
    """Return ``text`` with every URL in it cut to its scheme (``json://...``)."""
    return ANY_URL.sub(r"\1://...", text)
