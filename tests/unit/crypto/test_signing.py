"""Signed manifests: a detached signature over the stored manifest's bytes, checked against trusted
public keys; any change, an unknown key or a missing signature is refused once keys are
configured. Manifests signed by older releases (the signature embedded, over canonical JSON) still
verify, also after the model gains fields."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.unit.monitoring.test_status import NOW
from tests.unit.monitoring.test_status import manifest as make_manifest
from vq_tasks.catalog.listing import load_manifest, parse_manifest
from vq_tasks.cli.main import main
from vq_tasks.crypto.signing import (
    check,
    detached_signature,
    key_id,
    load_signing_key,
    manifest_document,
    new_signing_key,
    parse_public_keys,
    public_key_text,
)
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import Manifest, manifest_name, signature_name
from vq_tasks.settings import ConfigError, load_settings
from vq_tasks.storage.local import LocalStorage

FIXTURES = Path(__file__).resolve().parents[2] / "data" / "signing"


def signed(manifest: Manifest, key) -> Manifest:
    """``manifest`` as finalize stores it signed, read back: its bytes and their detached signature."""
    document = manifest_document(manifest)
    return parse_manifest(document, "test", detached_signature(document, key).decode())


def stored_as(manifest: Manifest, document: bytes) -> Manifest:
    """The same detached signature beside other bytes (an edited manifest)."""
    return parse_manifest(document, "test", manifest.detached_signature)


BROKER = {"celery_broker_url": "redis://127.0.0.1:1/0"}


@pytest.fixture
def key_pair(tmp_path):
    path = tmp_path / "signing.pem"
    public = new_signing_key(path)
    return load_signing_key(path), {key_id(public): public}, public_key_text(public)


def test_a_signed_manifest_checks_over_its_stored_bytes(key_pair):
    private, trusted, _ = key_pair
    manifest = signed(make_manifest(NOW), private)
    result = check(manifest, trusted)
    assert result.ok and result.actual == f"valid, by {next(iter(trusted))}"
    assert manifest.signature is None and b'"signature"' not in manifest.stored_bytes


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.replace(b'"kind": "manual"', b'"kind": "monthly"'),  # kept for a year, not a month
        lambda d: d.replace(b"  ", b" "),  # the same JSON, formatted otherwise: other bytes
        lambda d: d + b" ",
    ],
)
def test_any_change_to_the_stored_bytes_is_refused(key_pair, edit):
    private, trusted, _ = key_pair
    manifest = signed(make_manifest(NOW), private)
    changed = edit(manifest.stored_bytes)
    assert changed != manifest.stored_bytes
    result = check(stored_as(manifest, changed), trusted)
    assert not result.ok and "changed after signing, or forged" in result.actual


def test_unsigned_forged_or_unknown_manifests_are_refused_once_keys_are_configured(key_pair, tmp_path):
    _, trusted, _ = key_pair
    unsigned = parse_manifest(manifest_document(make_manifest(NOW)), "test")
    assert check(unsigned, trusted).actual == "unsigned" and not check(unsigned, trusted).ok
    new_signing_key(tmp_path / "attacker.pem")
    forged = signed(make_manifest(NOW), load_signing_key(tmp_path / "attacker.pem"))
    assert not check(forged, trusted).ok and "does not match" in check(forged, trusted).actual
    garbage = parse_manifest(manifest_document(make_manifest(NOW)), "test", "not base64 at all!")
    assert not check(garbage, trusted).ok
    assert check(unsigned, {}).ok and "not checked" in check(unsigned, {}).expected


def test_a_manifest_signed_by_an_older_release_still_verifies_after_the_model_gains_fields():
    """The frozen fixture was written as releases before the detached signature wrote it: the
    signature embedded, over the manifest without it as canonical JSON of the model. Checked over
    the stored document, it verifies, also read by a model with a field more (whose own canonical
    form, with that field's default, no longer matches: the defect this replaced)."""
    document = (FIXTURES / "embedded_manifest.json").read_bytes()
    trusted = parse_public_keys([(FIXTURES / "embedded_public_key.txt").read_text().strip()])

    class Later(Manifest):
        retention_lock_until: str | None = None  # a field a later release adds

    for model in (Manifest, Later):
        manifest = model.model_validate_json(document).as_stored(document, None)
        result = check(manifest, trusted)
        assert result.ok and result.actual == f"valid, by {next(iter(trusted))}", model
    for model in (Manifest, Later):  # not noted with its bytes: the old algorithm over the model's
        assert not check(model.model_validate_json(document), trusted).ok, model  # form, which gained "locks"
    edited = document.replace(b'"kind": "manual"', b'"kind": "monthly"')
    assert not check(Manifest.model_validate_json(edited).as_stored(edited, None), trusted).ok


def test_the_detached_signature_checks_with_openssl_alone(key_pair, tmp_path):
    """What the README shows: the public key (base64 of 32 raw bytes) made a PEM file, then
    `openssl pkeyutl -verify -rawin` over the manifest and the decoded .sig."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl")
    private, _, public = key_pair
    document = manifest_document(make_manifest(NOW))
    (tmp_path / "m_manifest.json").write_bytes(document)
    (tmp_path / "m_manifest.json.sig").write_bytes(detached_signature(document, private))
    script = README_CHECK.format(public=public, manifest="m_manifest.json")
    done = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert "Signature Verified Successfully" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 0
    (tmp_path / "m_manifest.json").write_bytes(document.replace(b"manual", b"monthly"))
    done = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0


def readme_check() -> str:
    """The openssl commands of the README's "Signed manifests", with {public} and {manifest}."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    block = readme.split("<!-- openssl-check -->", 2)[1]
    commands = block.split("```sh", 1)[1].split("```", 1)[0]
    return commands.replace("PUBLIC_KEY", "{public}").replace("ID_manifest.json", "{manifest}")


README_CHECK = readme_check()


def test_the_signing_key_command_writes_a_private_file_once_and_prints_the_public_key(tmp_path, capsys):
    path = tmp_path / "key.pem"
    assert main(["signing-key", "-o", str(path)]) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    public = capsys.readouterr().out.splitlines()[-1]
    trusted = parse_public_keys([public])
    assert check(signed(make_manifest(NOW), load_signing_key(path)), trusted).ok
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


def test_a_manifest_changed_in_hand_or_signed_both_ways_is_judged_by_what_is_stored(key_pair):
    """A copy edited after it was read carries no signature of its own; with an embedded
    signature and a .sig, the detached one decides (no fallback to the other)."""
    private, trusted, _ = key_pair
    manifest = signed(make_manifest(NOW), private)
    edited = manifest.model_copy(update={"kind": "monthly"})
    assert not check(edited, trusted).ok and "differs from the bytes" in check(edited, trusted).actual
    document = (FIXTURES / "embedded_manifest.json").read_bytes()  # embedded, by another key
    both = parse_manifest(document, "test", detached_signature(document, private).decode())
    assert check(both, trusted).ok  # the .sig, by the trusted key, over these bytes
    forged = parse_manifest(document, "test", "AAAA")
    embedded_trusted = parse_public_keys([(FIXTURES / "embedded_public_key.txt").read_text().strip()])
    assert not check(forged, embedded_trusted).ok  # a bad .sig is not saved by the embedded one


def test_an_oversized_signature_file_fails_its_check_and_stops_nothing_else(tmp_path, key_pair):
    _, trusted, _ = key_pair
    storage = LocalStorage(tmp_path)
    manifest = make_manifest(NOW)
    with storage.open_write(manifest_name(manifest.backup_id)) as out:
        out.write(manifest_document(manifest))
    with storage.open_write(signature_name(manifest.backup_id)) as out:
        out.write(b"A" * 100_000)
    loaded = load_manifest(storage, manifest.backup_id)  # no error: the listing goes on
    assert not check(loaded, trusted).ok
