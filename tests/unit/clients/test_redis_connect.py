"""redis_connect without a server: the TLS context built from the settings, the redis-py client's
options, AUTH with an ACL user, settings for a redis-server of our own, and TLS failures turned into
messages that name the setting to fix."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.redis_tls import Certificates, make_certificates, openssl
from vq_tasks.clients.redis_connect import (
    HandshakeTimeout,
    TLSConnection,
    auth_args,
    plain_settings,
    redis_client,
    tls_context,
    tls_error,
)
from vq_tasks.clients.redis_wire import ReplyReader, client_error, command
from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.restore.drill import scratch_settings
from vq_tasks.settings import Settings, load_settings
from vq_tasks.sources.redis import request_rdb

PASSWORD = "unit-Pa$$-w0rd"
WHERE = "Redis 127.0.0.1:6380"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def settings(**values: Any) -> Settings:
    defaults: dict[str, Any] = {
        "redis_host": "redis.example",
        "redis_port": 6380,
        "redis_password": PASSWORD,
        "celery_broker_url": "redis://127.0.0.1:1/0",
    }
    return load_settings(**{**defaults, **values})


def only_the_test_ca(context: ssl.SSLContext) -> bool:
    """Whether ``context`` trusts the tests' CA and no other."""
    return [repr(ca["subject"]) for ca in context.get_ca_certs()] == ["((('commonName', 'vq test CA'),),)"]


def test_no_tls_no_context():
    assert tls_context(settings()) is None


def test_the_context_checks_the_server_against_the_ca_file_only(certs: Certificates):
    context = tls_context(settings(redis_tls=True, redis_tls_ca_file=certs.ca))
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert only_the_test_ca(context)  # not the system's CAs besides


def test_without_a_ca_file_the_system_cas_are_trusted():
    context = tls_context(settings(redis_tls=True))
    assert context is not None and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == ssl.create_default_context().cert_store_stats()["x509_ca"]


def test_the_client_certificate_is_loaded(certs: Certificates, monkeypatch: pytest.MonkeyPatch):
    tls = settings(
        redis_tls=True,
        redis_tls_ca_file=certs.ca,
        redis_tls_cert_file=certs.client_cert,
        redis_tls_key_file=certs.client_key,
    )
    loaded: list[tuple[Any, ...]] = []
    real = ssl.SSLContext.load_cert_chain

    def spy(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loaded.append(args)
        real(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    tls_context(tls)
    assert loaded == [(certs.client_cert, certs.client_key)]


def test_a_key_of_another_certificate_is_refused_naming_both_settings(certs: Certificates):
    tls = settings(
        redis_tls=True,
        redis_tls_cert_file=certs.client_cert,
        redis_tls_key_file=certs.client_key,
    ).model_copy(update={"redis_tls_key_file": certs.server_key})  # past the start-up checks
    with pytest.raises(PermanentError, match=r"REDIS_TLS_CERT_FILE .* and REDIS_TLS_KEY_FILE") as caught:
        tls_context(tls)
    assert "PRIVATE KEY" not in str(caught.value)


def test_an_encrypted_key_fails_without_asking_for_a_passphrase(certs: Certificates, tmp_path: Path):
    locked = tmp_path / "locked.key"
    openssl(
        "pkey", "-in", certs.client_key, "-out", locked, "-aes256", "-passout", "env:HOME"
    )  # a passphrase from the environment, never argv
    tls = settings(redis_tls=True).model_copy(
        update={"redis_tls_cert_file": certs.client_cert, "redis_tls_key_file": locked}
    )
    with pytest.raises(PermanentError, match="REDIS_TLS_KEY_FILE"):
        tls_context(tls)


def test_a_missing_ca_file_is_named(tmp_path: Path):
    tls = settings(redis_tls=True).model_copy(update={"redis_tls_ca_file": tmp_path / "gone.pem"})
    with pytest.raises(PermanentError, match=r"REDIS_TLS_CA_FILE .*gone\.pem"):
        tls_context(tls)


def test_the_client_has_the_settings_user_password_timeouts_and_no_retry():
    client = redis_client(settings(redis_username="backup", redis_timeout=7), db=3)
    options = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.connection.Connection
    assert (options["host"], options["port"], options["db"]) == ("redis.example", 6380, 3)
    assert (options["username"], options["password"]) == ("backup", PASSWORD)
    assert options["socket_timeout"] == options["socket_connect_timeout"] == 7
    assert options["retry"].get_retries() == 0
    client.close()


def test_the_tls_client_uses_our_context(certs: Certificates):
    client = redis_client(
        settings(redis_tls=True, redis_tls_ca_file=certs.ca), timeout=2, decode_responses=True
    )
    pool = client.connection_pool
    assert pool.connection_class is TLSConnection
    assert only_the_test_ca(pool.connection_kwargs["ssl_context"])
    assert pool.connection_kwargs["socket_timeout"] == 2 and pool.connection_kwargs["decode_responses"]
    client.close()


def test_auth_args():
    assert auth_args("backup", "pw") == ("AUTH", "backup", "pw")
    assert auth_args("backup", None) == ("AUTH", "backup", "")  # a nopass user takes any
    assert auth_args(None, "pw") == ("AUTH", "pw")
    assert auth_args(None, None) == ()


class Feed:
    """A recv_into that hands out canned bytes."""

    def __init__(self, data: bytes):
        self.data = data

    def __call__(self, view: memoryview) -> int:
        size = min(len(view), len(self.data))
        view[:size] = self.data[:size]
        self.data = self.data[size:]
        return size


def test_request_rdb_logs_in_as_the_acl_user():
    sent: list[bytes] = []
    reader = ReplyReader(Feed(b"+OK\r\n+OK\r\n+OK\r\n"), WHERE, secrets=[PASSWORD])
    request_rdb(sent.append, reader, PASSWORD, "backup")
    assert sent[0] == command("AUTH", "backup", PASSWORD)
    assert sent[-1] == command("SYNC")


def test_a_refused_acl_login_names_both_settings_never_the_password():
    reader = ReplyReader(
        Feed(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"), WHERE, secrets=[PASSWORD]
    )
    with pytest.raises(PermanentError, match=r"REDIS_PASSWORD\) or user \(REDIS_USERNAME") as caught:
        request_rdb(lambda data: None, reader, PASSWORD, "backup")
    assert PASSWORD not in str(caught.value)


def test_settings_of_our_own_server_have_no_tls_and_no_user(certs: Certificates):
    live = settings(redis_username="backup", redis_tls=True, redis_tls_ca_file=certs.ca)
    for own in (plain_settings(live, "127.0.0.1", 4242, "own-pw"), scratch_settings(live, 4242, "own-pw")):
        assert (own.redis_host, own.redis_port, own.redis_username) == ("127.0.0.1", 4242, None)
        assert own.redis_password is not None and own.redis_password.get_secret_value() == "own-pw"
        assert not own.redis_tls and own.redis_tls_ca_file is None and tls_context(own) is None
    assert live.redis_tls and live.redis_username == "backup"  # the live settings are untouched


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code, error.verify_message = code, message
    return error


def ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] ...")
    error.reason = reason
    return error


def raised_by_redis_py(cause: BaseException) -> redis.exceptions.ConnectionError:
    """A ConnectionError raised while handling ``cause``, as redis-py raises its own."""
    try:
        try:
            raise cause
        except OSError:
            raise redis.exceptions.ConnectionError("Error while reading from socket")  # noqa: B904
    except redis.exceptions.ConnectionError as error:
        return error


@pytest.mark.parametrize(
    "cause, kind, text",
    [
        (verify_error(20, "unable to get local issuer certificate"), PermanentError, "REDIS_TLS_CA_FILE"),
        (verify_error(10, "certificate has expired"), PermanentError, "certificate has expired"),
        (verify_error(62, "Hostname mismatch"), PermanentError, "REDIS_HOST"),
        (verify_error(64, "IP address mismatch"), PermanentError, "REDIS_HOST"),
        (ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), PermanentError, "REDIS_TLS_CERT_FILE"),
        (ssl_error("WRONG_VERSION_NUMBER"), PermanentError, "does not speak TLS"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), TransientError, "REDIS_TLS_CERT_FILE"),
        (HandshakeTimeout("the TLS handshake timed out"), TransientError, "REDIS_TLS"),
    ],
)
def test_tls_failures_name_the_setting_to_fix(cause: BaseException, kind: type[Exception], text: str):
    for error in (cause, raised_by_redis_py(cause)):
        found = tls_error(error, WHERE)
        assert isinstance(found, kind) and text in str(found) and WHERE in str(found)
    mapped = client_error(raised_by_redis_py(cause), WHERE, PASSWORD)
    assert isinstance(mapped, kind) and text in str(mapped)


def test_other_failures_are_no_tls_failure():
    assert tls_error(ConnectionRefusedError(111, "Connection refused"), WHERE) is None
    assert tls_error(raised_by_redis_py(ConnectionResetError(104, "reset")), WHERE) is None
    assert tls_error(ssl_error("SOMETHING_ELSE"), WHERE) is None
