"""The start-up checks of REDIS_TLS's files (settings/checks.py, redis_tls_problems): files that
are there, a private key only its owner reads, a certificate and its key together, no file without
REDIS_TLS; each problem stops the settings from loading, naming the variable, never a key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.redis_tls import Certificates, make_certificates
from vq_tasks.settings import ConfigError, Settings, load_settings
from vq_tasks.settings.checks import redis_tls_problems


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def problems_of(**values: Any) -> list[str]:
    """The problems of settings with ``values``, checked by redis_tls_problems alone and when the
    settings load (the line in checks.problems), which must agree."""
    base: dict[str, Any] = {"redis_host": "redis.example", "celery_broker_url": "redis://127.0.0.1:1/0"}
    try:
        load_settings(**base, **values)
        loaded: list[str] = []
    except ConfigError as exc:
        loaded = [line for line in exc.problems if "REDIS_TLS" in line]
    alone = redis_tls_problems(Settings.model_construct(**base, **values))  # defaults, unchecked
    assert alone == loaded
    return alone


def test_complete_tls_settings_have_no_problem(certs: Certificates):
    assert problems_of(redis_tls=True) == []
    assert problems_of(redis_tls=True, redis_tls_ca_file=certs.ca) == []
    full = {"redis_tls_cert_file": certs.client_cert, "redis_tls_key_file": certs.client_key}
    assert problems_of(redis_tls=True, redis_tls_ca_file=certs.ca, **full) == []


def test_files_without_tls_are_a_problem(certs: Certificates):
    (found,) = problems_of(redis_tls=False, redis_tls_ca_file=certs.ca)
    assert "REDIS_TLS_CA_FILE set but REDIS_TLS is false" in found


@pytest.mark.parametrize("given", ["redis_tls_cert_file", "redis_tls_key_file"])
def test_a_certificate_and_its_key_go_together(certs: Certificates, given: str):
    path = certs.client_cert if given == "redis_tls_cert_file" else certs.client_key
    (found,) = problems_of(redis_tls=True, **{given: path})
    assert found == "REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE go together: set both or none"


def test_missing_files_are_named(tmp_path: Path):
    missing = {
        "redis_tls_ca_file": tmp_path / "ca.pem",
        "redis_tls_cert_file": tmp_path / "client.pem",
        "redis_tls_key_file": tmp_path / "client.key",
    }
    found = problems_of(redis_tls=True, **missing)
    assert found == [f"{name.upper()}={str(path)!r}: no such file" for name, path in missing.items()]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_key_others_may_read_is_a_problem(certs: Certificates, tmp_path: Path, mode: int):
    key = tmp_path / "client.key"
    key.write_bytes(certs.client_key.read_bytes())
    key.chmod(mode)
    (found,) = problems_of(redis_tls=True, redis_tls_cert_file=certs.client_cert, redis_tls_key_file=key)
    assert f"REDIS_TLS_KEY_FILE {key} has mode {mode:04o}" in found and "chmod 600" in found
    assert "PRIVATE KEY" not in found


def test_a_key_of_another_certificate_is_a_problem(certs: Certificates):
    (found,) = problems_of(
        redis_tls=True, redis_tls_cert_file=certs.client_cert, redis_tls_key_file=certs.server_key
    )
    assert "are not a PEM certificate and its unencrypted private key" in found
    assert "PRIVATE KEY" not in found


def test_a_ca_file_that_is_no_certificate_is_a_problem(tmp_path: Path):
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    (found,) = problems_of(redis_tls=True, redis_tls_ca_file=junk)
    assert found.startswith(f"REDIS_TLS_CA_FILE {junk} holds no PEM certificate")
