"""The off-site copy between two real Local storages: files checked on the way, manifest last,
nothing complete-looking after a failure, catch-up of missed backups."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.unit.verify.test_verify import BACKUP_ID, make_backup, write_signed
from vq_tasks.backup.offsite import copy_backup, missing_backups, sync
from vq_tasks.catalog.latest import resolve_backup_id
from vq_tasks.catalog.listing import backup_sets, readable_manifests
from vq_tasks.crypto.signing import key_id, load_signing_key, new_signing_key, public_key_text
from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.manifest import data_names, manifest_name, signature_name
from vq_tasks.retention.plan import with_kinds
from vq_tasks.storage.local import LocalStorage
from vq_tasks.verify.run import verify_backup


def test_copy_is_identical_and_verifies(tmp_path):
    backup = make_backup(tmp_path)
    target = LocalStorage(tmp_path / "offsite")
    size = copy_backup(backup.storage, target, BACKUP_ID)
    assert size == sum(f.size for f in backup.manifest.files) + target.stat(manifest_name(BACKUP_ID)).size
    for stored in backup.manifest.files:
        assert (tmp_path / "offsite" / stored.name).read_bytes() == (
            tmp_path / "backups" / stored.name
        ).read_bytes()
    assert verify_backup(target, backup.settings, BACKUP_ID).ok
    assert copy_backup(backup.storage, target, BACKUP_ID) == 0  # already there: nothing copied again


def test_damaged_source_is_not_copied_and_leaves_no_manifest(tmp_path):
    backup = make_backup(tmp_path)
    bundle = tmp_path / "backups" / backup.manifest.files[0].name
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    bundle.write_bytes(bytes(data))
    target = LocalStorage(tmp_path / "offsite")
    with pytest.raises(PermanentError, match="does not match its manifest"):
        copy_backup(backup.storage, target, BACKUP_ID)
    assert target.list() == []  # the damaged file was not committed, and no manifest


def test_missing_source_file_fails_clearly(tmp_path):
    backup = make_backup(tmp_path)
    (tmp_path / "backups" / backup.manifest.files[0].name).unlink()
    target = LocalStorage(tmp_path / "offsite")
    with pytest.raises(PermanentError, match="missing from"):
        copy_backup(backup.storage, target, BACKUP_ID)
    assert target.stat(manifest_name(BACKUP_ID)) is None


def test_logs_gone_by_retention_are_skipped(tmp_path):
    backup = make_backup(tmp_path)
    logs = backup.manifest.components["logs"].stored_in
    (tmp_path / "backups" / logs).unlink()
    target = LocalStorage(tmp_path / "offsite")
    copy_backup(backup.storage, target, BACKUP_ID)
    assert target.stat(manifest_name(BACKUP_ID)) is not None and target.stat(logs) is None


def test_sync_copies_only_what_is_missing_within_the_window(tmp_path):
    backup = make_backup(tmp_path)
    target = LocalStorage(tmp_path / "offsite")
    prefix = backup.settings.backup_name_prefix
    started = backup.manifest.started_at
    assert missing_backups(backup.storage, target, prefix, started + timedelta(seconds=1)) == []
    assert missing_backups(backup.storage, target, prefix, started - timedelta(days=1)) == [BACKUP_ID]
    result = sync(backup.storage, target, prefix, datetime(2000, 1, 1, tzinfo=UTC))
    assert result.copied == [BACKUP_ID]
    assert missing_backups(backup.storage, target, prefix, started - timedelta(days=1)) == []


class PrunedMeanwhile(LocalStorage):
    """A target where a concurrent prune deletes the bundle while the logs archive is copied."""

    def __init__(self, root, bundle: str):
        super().__init__(root)
        self._bundle = bundle

    def open_write(self, name: str, retain_until=None):
        if name.endswith("_logs.tar.gz"):
            self.delete(self._bundle)
        return super().open_write(name, retain_until)


def test_a_file_pruned_during_the_copy_keeps_the_manifest_out(tmp_path):
    backup = make_backup(tmp_path)
    target = PrunedMeanwhile(tmp_path / "offsite", backup.manifest.files[0].name)
    with pytest.raises(TransientError, match="vanished"):
        copy_backup(backup.storage, target, BACKUP_ID)
    assert target.stat(manifest_name(BACKUP_ID)) is None  # retried later, never falsely complete


def test_sync_goes_on_past_a_damaged_backup(tmp_path):
    backup = make_backup(tmp_path)
    bundle = tmp_path / "backups" / backup.manifest.files[0].name
    bundle.write_bytes(b"damaged")
    target = LocalStorage(tmp_path / "offsite")
    result = sync(
        backup.storage, target, backup.settings.backup_name_prefix, datetime(2000, 1, 1, tzinfo=UTC)
    )
    assert result.copied == [] and list(result.failed) == [BACKUP_ID]
    assert "does not match its manifest" in result.failed[BACKUP_ID]


def test_with_signing_keys_a_manifest_that_fails_its_signature_is_never_copied(tmp_path):
    """The backup is unsigned (as a forged one would be) and BACKUP_SIGNING_PUBLIC_KEYS holds a
    key: the copy refuses it before reading any file, the sync lists it as failed."""
    backup = make_backup(tmp_path)
    public = new_signing_key(tmp_path / "signing.pem")
    keys = {key_id(public): public}
    target = LocalStorage(tmp_path / "offsite")
    with pytest.raises(PermanentError, match="manifest signature unsigned; not copied"):
        copy_backup(backup.storage, target, BACKUP_ID, keys=keys)
    result = sync(backup.storage, target, "virtualqueue_backup", datetime(2000, 1, 1, tzinfo=UTC), keys=keys)
    assert list(result.failed) == [BACKUP_ID] and target.list() == []
    assert copy_backup(backup.storage, target, BACKUP_ID) > 0, "without keys nothing is checked"


def test_a_signed_backup_is_copied_with_its_signature_first_and_pruned_with_it(tmp_path):
    """The detached .sig goes off-site before the manifest; the copy verifies with the key alone;
    the .sig is one of the backup's objects for listings and prune."""
    backup = make_backup(tmp_path)
    public = new_signing_key(tmp_path / "signing.pem")
    write_signed(backup.storage, backup.manifest, load_signing_key(tmp_path / "signing.pem"))
    keys = {key_id(public): public}
    target = LocalStorage(tmp_path / "offsite")
    written: list[str] = []
    real = target.open_write
    target.open_write = lambda name, until=None: written.append(name) or real(name, until)  # type: ignore[method-assign]
    copy_backup(backup.storage, target, BACKUP_ID, keys=keys)
    assert written[-2:] == [signature_name(BACKUP_ID), manifest_name(BACKUP_ID)]
    keyed = backup.settings.model_copy(update={"backup_signing_public_keys": [public_key_text(public)]})
    report = verify_backup(target, keyed, BACKUP_ID)
    assert report.ok and f"valid, by {key_id(public)}" in str(report.model_dump())
    (entry,) = backup_sets(target.list(), "virtualqueue_backup")
    assert entry.roles["signature"] == [signature_name(BACKUP_ID)]
    assert signature_name(BACKUP_ID) in data_names(BACKUP_ID)  # removed with a failed run's files


def test_latest_and_the_next_kind_ignore_forged_and_future_dated_manifests(tmp_path, caplog):
    """A manifest dated in 2099 is not the latest; with signing keys an unsigned manifest neither
    counts for the next backup's kind (it would make it a daily instead of a monthly) nor is
    believed for retention (kept as monthly, never the newest)."""
    backup = make_backup(tmp_path)
    prefix = backup.settings.backup_name_prefix
    future = "virtualqueue_backup_20990101_000000"
    with backup.storage.open_write(manifest_name(future)) as out:
        out.write(backup.storage.read_bytes(manifest_name(BACKUP_ID)))
    assert resolve_backup_id(backup.storage, backup.settings, "latest") == BACKUP_ID
    assert f"{future} is dated in the future" in caplog.text
    public = new_signing_key(tmp_path / "signing.pem")
    keys = {key_id(public): public}
    assert [m.backup_id for m in readable_manifests(backup.storage, prefix)] == [BACKUP_ID, BACKUP_ID]
    assert readable_manifests(backup.storage, prefix, keys) == []
    sets = with_kinds(backup.storage, backup_sets(backup.storage.list(), prefix), keys=keys)
    assert [(s.kind, s.trusted) for s in sets] == [(None, False), (None, False)]
