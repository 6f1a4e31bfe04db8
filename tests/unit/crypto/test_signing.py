"""Signed manifests: a signature over the canonical manifest, checked against trusted public keys;
any change, an unknown key or a missing signature is refused once keys are configured."""

from __future__ import annotations

import os
import stat

import pytest

from tests.unit.monitoring.test_status import NOW
from tests.unit.monitoring.test_status import manifest as make_manifest
from vq_tasks.cli.main import main
from vq_tasks.crypto.signing import (
    check,
    key_id,
    load_signing_key,
    new_signing_key,
    parse_public_keys,
    public_key_text,
    sign,
)
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import Manifest
from vq_tasks.settings import ConfigError, load_settings

BROKER = {"celery_broker_url": "redis://127.0.0.1:1/0"}


@pytest.fixture
def key_pair(tmp_path):
    path = tmp_path / "signing.pem"
    public = new_signing_key(path)
    return load_signing_key(path), {key_id(public): public}, public_key_text(public)


def test_a_signed_manifest_checks_and_survives_storage_as_json(key_pair):
    private, trusted, _ = key_pair
    signed = sign(make_manifest(NOW), private)
    stored = Manifest.model_validate_json(signed.model_dump_json(indent=2))  # as written and read back
    result = check(stored, trusted)
    assert result.ok and result.actual == f"valid, by {signed.signature.key_id}"


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "monthly"},  # kept for a year instead of a month
        {"duration_seconds": 91.0},
        {"tool_version": "9.9"},
    ],
)
def test_any_change_after_signing_is_refused(key_pair, change):
    private, trusted, _ = key_pair
    tampered = sign(make_manifest(NOW), private).model_copy(update=change)
    result = check(tampered, trusted)
    assert not result.ok and "changed after signing, or forged" in result.actual


def test_a_changed_file_checksum_is_refused(key_pair):
    private, trusted, _ = key_pair
    signed = sign(make_manifest(NOW), private)
    files = [f.model_copy(update={"sha256": "1" * 64}) for f in signed.files]
    assert not check(signed.model_copy(update={"files": files}), trusted).ok


def test_unsigned_forged_or_unknown_manifests_are_refused_once_keys_are_configured(key_pair, tmp_path):
    _, trusted, _ = key_pair
    unsigned = make_manifest(NOW)
    assert check(unsigned, trusted).actual == "unsigned" and not check(unsigned, trusted).ok
    new_signing_key(tmp_path / "attacker.pem")
    forged = sign(unsigned, load_signing_key(tmp_path / "attacker.pem"))
    assert not check(forged, trusted).ok and "unknown key" in check(forged, trusted).actual
    claimed = forged.signature.model_copy(update={"key_id": next(iter(trusted))})  # claims a trusted id
    assert not check(forged.model_copy(update={"signature": claimed}), trusted).ok
    assert check(unsigned, {}).ok and "not checked" in check(unsigned, {}).expected


def test_the_signing_key_command_writes_a_private_file_once_and_prints_the_public_key(tmp_path, capsys):
    path = tmp_path / "key.pem"
    assert main(["signing-key", "-o", str(path)]) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    public = capsys.readouterr().out.splitlines()[-1]
    trusted = parse_public_keys([public])
    assert check(sign(make_manifest(NOW), load_signing_key(path)), trusted).ok
    before = path.read_bytes()
    assert main(["signing-key", "-o", str(path)]) == 1
    assert path.read_bytes() == before


def test_bad_keys_stop_start_up_without_showing_them(tmp_path, key_pair):
    not_a_key = tmp_path / "wrong.pem"
    not_a_key.write_text("secret-looking-text\n")
    with pytest.raises(ConfigError, match="can be read by others than its owner: chmod 600 it"):
        load_settings(**BROKER, backup_signing_key_file=not_a_key)
    not_a_key.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        load_settings(**BROKER, backup_signing_key_file=not_a_key, backup_signing_public_keys="AAAA,bm9wZQ==")
    text = str(caught.value)
    assert f"BACKUP_SIGNING_KEY_FILE {not_a_key} is not an unencrypted PEM private key" in text
    assert "entry 1 is not" in text and "entry 2 is not" in text and "secret-looking-text" not in text
    _, _, public = key_pair
    assert load_settings(**BROKER, backup_signing_public_keys=public).backup_signing_public_keys == [public]
    with pytest.raises(PermanentError, match="never overwritten"):
        new_signing_key(not_a_key)
