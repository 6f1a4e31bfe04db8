"""One way to reach the Redis that is backed up, restored and drilled against (REDIS_* settings):
the TLS context (REDIS_TLS and its files), redis-py clients, the AUTH command of our own
connections (with REDIS_USERNAME, an ACL user), and TLS failures turned into messages naming the
setting to fix. Managed Redis services (Azure Cache for Redis, ElastiCache with in-transit
encryption, Memorystore) need TLS and often an ACL user.

Never for Celery's Redis (coordination.py: its URL says how to connect) nor for the redis-server
of our own that a restore loads the RDB into (``plain_settings``).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, TypeVar

import redis
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry

from vq_tasks.errors import BackupError, PermanentError, TransientError
from vq_tasks.settings import Settings

Failure = TypeVar("Failure", bound=BaseException)
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
NAME_MISMATCH = (62, 64)
# the server refused our client certificate, or wanted one and got none
CLIENT_CERT_REASONS = (
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_HANDSHAKE_FAILURE",  # TLS 1.2's answer to no certificate (or no common cipher)
)
# what comes back when the port does not speak TLS
NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE")


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Given settings, return the TLS context for the Redis (None when REDIS_TLS is off): the
    server's certificate checked against REDIS_TLS_CA_FILE (unset: the system's CAs) and its
    name against REDIS_HOST, TLS 1.2 or newer, and the client certificate if one is set. Raise
    PermanentError naming the setting whose file cannot be used, never the key's content."""
    if not settings.redis_tls:
        return None
    ca_file = settings.redis_tls_ca_file
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise PermanentError(f"REDIS_TLS_CA_FILE {ca_file}: {_reason(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = settings.redis_tls_cert_file, settings.redis_tls_key_file
    if cert is not None:
        try:
            context.load_cert_chain(cert, key, password=lambda: b"")  # encrypted: fail, never prompt
        except (OSError, ssl.SSLError) as exc:
            raise PermanentError(
                f"REDIS_TLS_CERT_FILE {cert} and REDIS_TLS_KEY_FILE {key}: {_reason(exc)}"
            ) from None
    return context


def _reason(exc: OSError) -> str:
    """Given an error of ssl or the file system, return its reason in a few words."""
    return getattr(exc, "reason", None) or exc.strerror or str(exc)


def redis_client(
    settings: Settings, db: int = 0, *, timeout: float | None = None, decode_responses: bool = False
) -> redis.Redis:
    """Given settings naming the Redis, return a redis-py client of database ``db``: REDIS_HOST,
    REDIS_PORT, REDIS_USERNAME and REDIS_PASSWORD, TLS as tls_context says, ``timeout`` seconds
    (default REDIS_TIMEOUT) to connect and for each reply, and no retry (the tasks retry, with
    backoff). Its errors are redis-py's: turn them into ours with redis_wire.client_error."""
    seconds = settings.redis_timeout if timeout is None else timeout
    user, password = settings.redis_username, password_of(settings)
    options: dict[str, Any] = {
        "host": settings.redis_host,
        "port": settings.redis_port,
        "db": db,
        "username": user,
        "password": "" if user and password is None else password,  # as auth_args logs in
        "socket_timeout": seconds,
        "socket_connect_timeout": seconds,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": decode_responses,
    }
    context = tls_context(settings)
    if context is None:
        return redis.Redis(**options)
    pool = redis.ConnectionPool(connection_class=TLSConnection, ssl_context=context, **options)
    return redis.Redis.from_pool(pool)  # the client closes the pool with it


class HandshakeTimeout(TimeoutError):
    """The server accepted the connection but did not complete the TLS handshake in time: most
    likely it does not speak TLS on that port (a plain Redis waits for a command instead)."""


def _handshake(context: ssl.SSLContext, sock: socket.socket, host: str) -> ssl.SSLSocket:
    """Given a TLS context and a connected socket, return it wrapped once the handshake is done,
    the server's certificate checked against ``host``; close the socket if that fails. Raise
    ssl.SSLError, or HandshakeTimeout."""
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except TimeoutError:
        sock.close()
        raise HandshakeTimeout("the TLS handshake timed out") from None
    except BaseException:
        sock.close()
        raise


class TLSConnection(redis.connection.Connection):
    """redis-py's TCP connection wrapped in our TLS context, checked against the host's name:
    the same context and checks as our own sockets (open_socket), not redis-py's SSLConnection,
    which builds another context from its own options."""

    def __init__(self, *, ssl_context: ssl.SSLContext, **options: Any):
        self._ssl_context = ssl_context
        super().__init__(**options)

    def _connect(self) -> socket.socket:
        return _handshake(self._ssl_context, super()._connect(), self.host)


def open_socket(settings: Settings) -> socket.socket:
    """Given settings naming the Redis, return a socket connected to it, with TLS when REDIS_TLS
    (the handshake done, the server's name checked), waiting up to REDIS_TIMEOUT for each step.
    Raise OSError as the socket module does (ssl.SSLError, HandshakeTimeout for TLS), or
    PermanentError as tls_context does."""
    context = tls_context(settings)
    address = (settings.redis_host, settings.redis_port)
    sock = socket.create_connection(address, timeout=settings.redis_timeout)
    if context is None:
        return sock
    return _handshake(context, sock, settings.redis_host)


def password_of(settings: Settings) -> str | None:
    """Given settings, return REDIS_PASSWORD, or None when it is unset or empty."""
    secret = settings.redis_password
    if secret is None:
        return None
    return secret.get_secret_value() or None


def auth_args(username: str | None, password: str | None) -> tuple[str, ...]:
    """Given REDIS_USERNAME and REDIS_PASSWORD, return the AUTH command that logs in, or () when
    there is nothing to log in with: ``AUTH user password`` for an ACL user (Redis 6+; a user
    without a password takes any), ``AUTH password`` for the default user."""
    if username:
        return ("AUTH", username, password or "")
    if password:
        return ("AUTH", password)
    return ()


def plain_settings(settings: Settings, host: str, port: int, password: str) -> Settings:
    """Given settings, return them naming instead a redis-server of our own (a restore's
    throwaway, a drill's scratch server) at ``host``:``port`` with ``password``: the default
    user, no TLS, as that server is started."""
    return settings.model_copy(
        update={
            "redis_host": host,
            "redis_port": port,
            "redis_username": None,
            "redis_password": SecretStr(password),
            "redis_tls": False,
            "redis_tls_ca_file": None,
            "redis_tls_cert_file": None,
            "redis_tls_key_file": None,
        }
    )


def tls_error(exc: BaseException, where: str) -> BackupError | None:
    """Given an error met talking to the Redis named ``where`` (redis-py's, with the ssl error
    as its cause or context, or the ssl error itself), return the error that says which setting
    to fix: PermanentError for what a retry cannot fix (the server's certificate, no TLS on the
    port), TransientError for a TLS connection closed (a client certificate the server did not
    take looks so, as does a lost connection; a handshake that does not end). None if no TLS
    failure is behind it."""
    if _in_chain(exc, HandshakeTimeout) is not None:
        return TransientError(
            f"{where} did not complete the TLS handshake in time (REDIS_TIMEOUT): does it speak"
            " TLS on that port? Check REDIS_PORT and REDIS_TLS"
        )
    found = _in_chain(exc, ssl.SSLError)
    if found is None:
        return None
    if isinstance(found, ssl.SSLCertVerificationError):
        return _verify_error(found, where)
    if isinstance(found, ssl.SSLEOFError):
        return TransientError(
            f"{where} closed the TLS connection ({found}): if it asks for client"
            " certificates, set REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE to one its CA signed"
        )
    reason = getattr(found, "reason", None) or ""  # set by OpenSSL's errors
    if reason in CLIENT_CERT_REASONS:
        return PermanentError(
            f"{where} refused the TLS connection ({reason.lower()}): it wants a client certificate"
            " it trusts: set REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE"
        )
    if reason in NOT_TLS_REASONS:
        return PermanentError(
            f"{where} does not speak TLS on this port ({reason.lower()}): check REDIS_PORT (the"
            " provider's TLS port, e.g. 6380 on Azure) or unset REDIS_TLS"
        )
    return None


def _verify_error(exc: ssl.SSLCertVerificationError, where: str) -> PermanentError:
    """Given a failed check of the server's certificate, return the error naming what to fix."""
    detail = exc.verify_message or str(exc)
    if exc.verify_code in NAME_MISMATCH:
        return PermanentError(
            f"{where}: its TLS certificate is not for that name ({detail}): set REDIS_HOST to a"
            " name the certificate lists (the service's host name, not an IP address)"
        )
    return PermanentError(
        f"{where}: its TLS certificate failed the check ({detail}): REDIS_TLS_CA_FILE must name"
        " the CA that signed it (the provider's CA bundle; unset, the system's CAs are used)"
    )


def _in_chain(exc: BaseException | None, kind: type[Failure]) -> Failure | None:
    """Given an error, return the error of ``kind`` it is or was raised from (redis-py chains
    the socket's error), if any."""
    for _ in range(10):
        if exc is None or isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
