"""Encryption from settings to storage and back, on real backups in a Local storage made by the
pipeline's own store step: the names, the manifest, verify with, without and with the wrong key,
extract decrypting on the fly (and writing nothing without the key), the off-site copy, and the
start-up checks of the encryption settings."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from tests.unit.crypto.test_age import tool
from tests.unit.verify.test_verify import (
    BACKUP_ID,
    BROKER,
    NOW,
    STARTED,
    manifest_of,
    rdb,
    sql_dump,
    stage,
    stage_config,
    stage_database,
    stage_redis,
)
from vq_tasks.backup import pipeline
from vq_tasks.backup.bundle import copy_staged, write_bundle
from vq_tasks.backup.objects import store_object
from vq_tasks.backup.offsite import copy_backup
from vq_tasks.catalog.listing import backup_sets
from vq_tasks.crypto import encryption
from vq_tasks.crypto.age import AgeReader, X25519Identity
from vq_tasks.crypto.encryption import KeyUnavailable, fingerprint, load_identities, parse_recipients
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import (
    COMPONENTS,
    COMPRESSIONS,
    TAR_SUFFIX,
    Compression,
    Manifest,
    bundle_name,
    data_names,
    logs_name,
    manifest_name,
    split_object_name,
    stored_name,
)
from vq_tasks.restore.extract import extract_to
from vq_tasks.settings import ConfigError, Settings, load_settings
from vq_tasks.sources.files import archive_logs
from vq_tasks.storage import open_storage
from vq_tasks.storage.local import LocalStorage
from vq_tasks.streams.readers import open_tar_stream
from vq_tasks.verify.run import report_rows, summary, verify_backup


def key_file(folder: Path, name: str, *identities: X25519Identity, mode: int = 0o600) -> Path:
    path = folder / name
    lines = [f"# public key: {i.recipient}\n{i.secret_text()}\n" for i in identities]
    path.write_text("# created by the test\n" + "".join(lines))
    path.chmod(mode)
    return path


@dataclass
class Encrypted:
    settings: Settings
    storage: LocalStorage
    manifest: Manifest
    operator: X25519Identity
    escrow: X25519Identity
    keys: Path  # the operator's identity file

    def without_key(self) -> Settings:
        return self.settings.model_copy(update={"backup_encryption_identity_file": None})

    def with_key(self, path: Path) -> Settings:
        return self.settings.model_copy(update={"backup_encryption_identity_file": path})

    def path(self, name: str) -> Path:
        return self.storage.root / name


def make_encrypted(tmp_path: Path, compression: Compression = "gzip") -> Encrypted:
    """Stage the four parts as dump tasks do, then store them as finalize does (its _store and
    bundle writer, the manifest as it builds it), encrypted to two recipients."""
    operator, escrow = X25519Identity.generate(), X25519Identity.generate()
    keys = key_file(tmp_path, "operator.txt", operator)
    settings = load_settings(
        backup_staging_dir=tmp_path / "staging",
        backup_storage_path=str(tmp_path / "backups"),
        compression_enabled=compression != "none",
        compression_algorithm="gzip" if compression == "none" else compression,
        backup_encryption_enabled=True,
        backup_encryption_recipients=f"{operator.recipient}, {escrow.recipient}",
        backup_encryption_identity_file=str(keys),
        **BROKER,
    )
    config = tmp_path / "etc" / "vq"
    config.mkdir(parents=True)
    (config / "app.yaml").write_text("queues: 3\n")
    logs = tmp_path / "log" / "vq"
    logs.mkdir(parents=True)
    (logs / "app.log").write_text("".join(f"line {i}\n" for i in range(30_000)))
    parts = {
        "database": stage_database(settings, sql_dump(50_000)),
        "redis": stage_redis(settings, rdb(200_000)),
        "config": stage_config(settings, config),
        "logs": stage(settings, "logs", lambda out: archive_logs([str(logs)], out, 7)),
    }
    storage = open_storage(settings)
    recipients = encryption.recipients_of(settings)
    bundle = store_object(
        storage,
        bundle_name(BACKUP_ID, compression, encrypted=True),
        lambda out: write_bundle(out, parts, compression, STARTED),
        recipients,
    )
    logs_file = store_object(
        storage,
        stored_name(parts["logs"].member, True),
        lambda out: copy_staged(parts["logs"], out),
        recipients,
    )
    manifest = manifest_of(parts, bundle, logs_file, compression, encryption=encryption.info_of(recipients))
    with storage.open_write(manifest_name(BACKUP_ID)) as out:
        out.write(manifest.model_dump_json(indent=2).encode())
    return Encrypted(settings, storage, manifest, operator, escrow, keys)


@pytest.fixture
def backup(tmp_path) -> Encrypted:
    return make_encrypted(tmp_path)


def results(rows) -> dict[tuple[str, str], tuple[str, str]]:
    return {(row[0], row[1]): (row[3], row[4]) for row in rows}


def unpacked(data: bytes, compression: str) -> bytes:
    """The data inside gzip members or zstd frames (or ``data`` itself)."""
    if compression == "gzip":
        return gzip.decompress(data)
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
    return data


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_stored_files_are_age_files_named_dot_age_with_checksums_of_their_bytes(tmp_path, compression):
    backup = make_encrypted(tmp_path, compression)
    suffix = TAR_SUFFIX[compression]
    names = sorted(p.name for p in backup.storage.root.iterdir())
    assert names == sorted(
        [f"{BACKUP_ID}{suffix}.age", f"{BACKUP_ID}_logs{suffix}.age", manifest_name(BACKUP_ID)]
    )
    for stored in backup.manifest.files:
        raw = backup.path(stored.name).read_bytes()
        assert raw.startswith(b"age-encryption.org/v1\n-> X25519 ")
        assert stored.size == len(raw) and stored.sha256 == hashlib.sha256(raw).hexdigest()
        assert stored.md5 == hashlib.md5(raw).hexdigest()
    # the components' checksums are of the plaintext, which either recipient's key opens
    bundle = backup.path(backup.manifest.files[0].name)
    for identity in (backup.operator, backup.escrow):
        with open(bundle, "rb") as f:
            plain = AgeReader(f, [identity]).read()
        opened = unpacked(plain, compression)
        assert opened[257:262] == b"ustar" and b"database.sql" in opened[:512]
    logs = backup.manifest.components["logs"]
    assert logs.member == f"{BACKUP_ID}_logs{suffix}" and logs.stored_in == logs.member + ".age"


def test_the_manifest_is_plain_json_with_fingerprints_and_no_key(backup):
    text = backup.path(manifest_name(BACKUP_ID)).read_text()
    document = json.loads(text)
    operator, escrow = str(backup.operator.recipient), str(backup.escrow.recipient)
    assert document["encryption"] == {
        "format": "age",
        "recipients": [fingerprint(operator), fingerprint(escrow)],
    }
    assert fingerprint(operator) == hashlib.sha256(operator.encode()).hexdigest()[:16]
    for secret_or_key in ("AGE-SECRET-KEY", "age1", operator, escrow, backup.operator.secret_text()):
        assert secret_or_key not in text


def test_age_names_belong_to_their_backup_everywhere():
    for suffix, role in (
        (".tar.gz.age", "bundle"),
        (".tar.zst.age", "bundle"),
        (".tar.age", "bundle"),
        ("_logs.tar.gz.age", "logs"),
        ("_logs.tar.zst.age", "logs"),
    ):
        assert split_object_name(BACKUP_ID + suffix, "virtualqueue_backup") == (BACKUP_ID, role)
    names = {bundle_name(BACKUP_ID, c, True) for c in COMPRESSIONS} | {logs_name(BACKUP_ID, "none", True)}
    assert names <= set(data_names(BACKUP_ID))
    assert bundle_name(BACKUP_ID, "gzip") == f"{BACKUP_ID}.tar.gz"
    assert bundle_name(BACKUP_ID, "zstd", True) == f"{BACKUP_ID}.tar.zst.age"


def test_catalog_and_the_clean_up_of_an_incomplete_run_see_the_age_files(backup):
    [found] = backup_sets(backup.storage.list(), "virtualqueue_backup")
    assert found.complete and set(found.roles) == {"bundle", "logs", "manifest"}
    backup.path(manifest_name(BACKUP_ID)).unlink()  # as if the run died before its manifest
    assert pipeline._remove_incomplete(backup.storage, BACKUP_ID) is False
    assert backup.storage.list() == []


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_verify_with_the_key_checks_the_decrypted_contents(tmp_path, compression):
    backup = make_encrypted(tmp_path, compression)
    report = verify_backup(backup.storage, backup.settings, BACKUP_ID, now=NOW)
    assert report.ok and report.outcome == "ok", [r for r in report_rows(report) if r[-1] != "OK"]
    found = results(report_rows(report))
    bundle = backup.manifest.files[0].name
    assert found[(bundle, "readable")] == ("read to the end", "OK")
    checked = {(c.component, check.check) for c in report.components for check in c.checks}
    assert {("database", "rows"), ("redis", "crc64"), ("config", "files"), ("logs", "files")} <= checked
    assert summary(report) == (f"{BACKUP_ID}: all OK", True)
    escrow_file = key_file(tmp_path, "escrow.txt", X25519Identity.generate(), backup.escrow)
    assert verify_backup(backup.storage, backup.with_key(escrow_file), BACKUP_ID, now=NOW).ok


def test_verify_without_the_key_checks_the_stored_files_and_says_contents_not_checked(backup):
    report = verify_backup(backup.storage, backup.without_key(), BACKUP_ID, now=NOW)
    assert not report.ok and report.outcome == "not checked"
    rows = report_rows(report)
    assert not [r for r in rows if r[-1] == "MISMATCH"]
    found = results(rows)
    for stored in backup.manifest.files:
        for check in ("size", "md5", "sha256"):
            assert found[(stored.name, check)][1] == "OK"
        assert found[(stored.name, "contents")] == (
            "not checked: encrypted, BACKUP_ENCRYPTION_IDENTITY_FILE not set",
            "NOT CHECKED",
        )
    unchecked_components = {r[0].split(" ")[0] for r in rows if r[-1] == "NOT CHECKED" and r[1] == "contents"}
    assert set(COMPONENTS) <= unchecked_components
    line, verified = summary(report)
    assert not verified and "contents NOT CHECKED" in line


def test_verify_with_the_wrong_key_names_the_fingerprints(backup, tmp_path):
    stranger = X25519Identity.generate()
    wrong = key_file(tmp_path, "wrong.txt", stranger)
    report = verify_backup(backup.storage, backup.with_key(wrong), BACKUP_ID, now=NOW)
    assert report.outcome == "not checked"
    reason = results(report_rows(report))[(backup.manifest.files[0].name, "contents")][0]
    assert "none of the identities in BACKUP_ENCRYPTION_IDENTITY_FILE opens" in reason
    assert fingerprint(backup.operator.recipient) in reason and fingerprint(backup.escrow.recipient) in reason
    assert fingerprint(stranger.recipient) in reason
    assert "AGE-SECRET-KEY" not in json.dumps(report.model_dump(mode="json"))


def test_a_changed_encrypted_bundle_is_a_mismatch_with_or_without_the_key(backup):
    bundle = backup.path(backup.manifest.files[0].name)
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    bundle.write_bytes(bytes(data))
    with_key = verify_backup(backup.storage, backup.settings, BACKUP_ID, now=NOW)
    found = results(report_rows(with_key))
    assert with_key.outcome == "mismatch"
    assert found[(bundle.name, "sha256")][1] == "MISMATCH"
    assert "does not authenticate" in found[(bundle.name, "readable")][0]
    without = verify_backup(backup.storage, backup.without_key(), BACKUP_ID, now=NOW)
    assert without.outcome == "mismatch"  # the stored file's checksums need no key
    assert results(report_rows(without))[(bundle.name, "sha256")][1] == "MISMATCH"


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_extract_decrypts_on_the_fly_and_checks_every_component(tmp_path, compression):
    backup = make_encrypted(tmp_path, compression)
    out = tmp_path / "out"
    out.mkdir()
    targets = {c: out / c for c in COMPONENTS}
    lines: list[str] = []
    extract_to(backup.storage, backup.manifest, targets, lines.append, settings=backup.settings)
    for component, path in targets.items():
        content = backup.manifest.components[component].content
        data = path.read_bytes()
        plain = unpacked(data, compression) if component == "logs" else data
        assert hashlib.sha256(plain).hexdigest() == content.sha256, component
    with open_tar_stream(targets["logs"]) as tar:
        assert any(name.endswith("app.log") for name in tar.getnames())
    assert any("checksums OK" in line for line in lines)


def test_extract_without_or_with_the_wrong_key_writes_nothing(backup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    targets = {c: out / c for c in COMPONENTS}
    bundle = backup.manifest.files[0].name
    with pytest.raises(KeyUnavailable) as failure:
        extract_to(backup.storage, backup.manifest, targets, settings=backup.without_key())
    assert str(failure.value) == (
        f"BACKUP_ENCRYPTION_IDENTITY_FILE is not set: {bundle} is encrypted (age); the private key is "
        "needed to verify contents and restore"
    )
    assert list(out.iterdir()) == []
    wrong = key_file(tmp_path, "wrong.txt", X25519Identity.generate())
    for only in ({"logs": out / "logs"}, targets):
        with pytest.raises(KeyUnavailable, match="none of the identities in BACKUP_ENCRYPTION_IDENTITY_FILE"):
            extract_to(backup.storage, backup.manifest, only, settings=backup.with_key(wrong))
        assert list(out.iterdir()) == []


def test_extract_of_a_changed_encrypted_file_fails_and_removes_what_it_wrote(backup, tmp_path):
    logs = backup.path(backup.manifest.components["logs"].stored_in)
    data = bytearray(logs.read_bytes())
    data[-10] ^= 0x01  # in its last chunk, found only once the rest was written out
    logs.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PermanentError, match=r"_logs\.tar\.gz\.age: chunk \d+ of the age payload does not"):
        extract_to(backup.storage, backup.manifest, {"logs": out / "logs"}, settings=backup.settings)
    assert list(out.iterdir()) == []


def test_the_off_site_copy_copies_the_encrypted_bytes_without_a_key(backup, tmp_path):
    target = LocalStorage(tmp_path / "offsite")
    copy_backup(backup.storage, target, BACKUP_ID)
    for stored in backup.manifest.files:
        assert (tmp_path / "offsite" / stored.name).read_bytes() == backup.path(stored.name).read_bytes()
    assert verify_backup(target, backup.settings, BACKUP_ID, now=NOW).ok


# --- settings and keys ---


def test_recipients_are_checked_by_position_and_a_pasted_private_key_is_not_echoed():
    good = X25519Identity.generate()
    secret = X25519Identity.generate().secret_text()
    with pytest.raises(ValueError) as failure:
        parse_recipients([str(good.recipient), "age1notakey", secret])
    message = str(failure.value)
    assert "entry 2 is not an age X25519 recipient" in message and "entry 3 is a private key" in message
    assert secret not in message and "age1notakey" not in message
    assert parse_recipients([f" {good.recipient} "]) == [good.recipient]


def test_settings_refuse_bad_encryption_configuration_listing_every_problem(tmp_path):
    identity = X25519Identity.generate()
    open_file = key_file(tmp_path, "open.txt", identity, mode=0o644)
    with pytest.raises(ConfigError) as failure:
        load_settings(
            backup_encryption_enabled=True,
            backup_encryption_recipients=f"{identity.secret_text()}",
            backup_encryption_identity_file=str(open_file),
            **BROKER,
        )
    problems = failure.value.problems
    assert any("BACKUP_ENCRYPTION_RECIPIENTS: entry 1 is a private key" in p for p in problems)
    assert any(f"BACKUP_ENCRYPTION_IDENTITY_FILE {open_file} has mode 0644" in p for p in problems)
    assert identity.secret_text() not in str(failure.value)
    with pytest.raises(ConfigError, match="BACKUP_ENCRYPTION_RECIPIENTS is empty"):
        load_settings(backup_encryption_enabled=True, **BROKER)
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("# fine\nAGE-SECRET-KEY-1NOTVALID\n")
    garbage.chmod(0o400)
    with pytest.raises(ConfigError, match="line 2 is not an age") as failure:
        load_settings(backup_encryption_identity_file=str(garbage), **BROKER)
    assert "NOTVALID" not in str(failure.value)
    with pytest.raises(ConfigError, match="No such file"):
        load_settings(backup_encryption_identity_file=str(tmp_path / "missing.txt"), **BROKER)
    fine = load_settings(
        backup_encryption_enabled=True,
        backup_encryption_recipients=str(identity.recipient),
        backup_encryption_identity_file=str(key_file(tmp_path, "ok.txt", identity, mode=0o400)),
        **BROKER,
    )
    assert encryption.recipients_of(fine) == [identity.recipient]
    assert encryption.identities_of(fine)[0].recipient == identity.recipient
    assert encryption.recipients_of(load_settings(**BROKER)) is None


def test_identity_files_from_age_keygen_load_and_others_are_refused(tmp_path):
    made = tmp_path / "key.txt"
    subprocess.run([tool("age-keygen"), "-o", str(made)], capture_output=True, check=True)
    assert made.stat().st_mode & 0o777 == 0o600  # age-keygen writes it so
    [identity] = load_identities(made)
    assert f"# public key: {identity.recipient}" in made.read_text()
    made.chmod(0o640)
    with pytest.raises(PermanentError, match="has mode 0640") as failure:
        load_identities(made)
    assert "AGE-SECRET-KEY" not in str(failure.value)
