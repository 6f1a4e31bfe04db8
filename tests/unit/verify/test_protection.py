"""The protection checks of verify and what counts as an integrity failure: an object gone while
locked, hidden or overwritten after its commit, locked for less than promised, a failed signature;
with BACKUP_IMMUTABILITY a stored file whose checksums differ from its manifest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from vq_tasks.manifest import LockInfo, Manifest
from vq_tasks.monitoring.integrity import integrity_failures
from vq_tasks.storage.base import StoredObject
from vq_tasks.storage.local import LocalStorage
from vq_tasks.verify.protection import protection_checks

NOW = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)


class Locked(LocalStorage):
    """A Local folder whose objects report a lock until ``until``, and ``tampered`` for some."""

    can_lock = True

    def __init__(self, root, until: datetime | None, tampered: dict[str, str] | None = None):
        super().__init__(root)
        self.until, self.tampered = until, tampered or {}

    def retention(self, name: str, version_id: str | None = None) -> datetime | None:
        return self.until

    def stat(self, name: str) -> StoredObject | None:
        found = super().stat(name)
        return found and StoredObject(found.name, found.size, found.modified, self.tampered.get(name))


@pytest.fixture
def signed_manifest() -> Manifest:
    """A manifest of no files (what the protection checks read of it is its locks)."""
    return Manifest(
        backup_id="vq_20261206_020000",
        kind="manual",
        started_at=NOW - timedelta(hours=1),
        finished_at=NOW,
        duration_seconds=3600.0,
        tool_version="test",
        compression="gzip",
        files=[],
        components={},
    )


def manifest_with_locks(manifest, until: datetime):
    return manifest.model_copy(update={"locks": LockInfo(mode="governance", until=until, logs_until=until)})


def stored(tmp_path, storage, name: str) -> None:
    with storage.open_write(name) as out:
        out.write(b"x")


def checks_of(storage, manifest, name):
    return {c.check: (c.ok, c.actual) for c in protection_checks(storage, manifest, name, NOW)}


def test_an_object_locked_as_promised_and_untouched_passes(tmp_path, signed_manifest):
    manifest = manifest_with_locks(signed_manifest, NOW + timedelta(days=7))
    storage = Locked(tmp_path, NOW + timedelta(days=7))
    stored(tmp_path, storage, "a.tar.gz")
    assert checks_of(storage, manifest, "a.tar.gz") == {
        "locked until": (True, "locked until 2026-12-13 03:00:00 UTC")
    }


def test_gone_hidden_or_underlocked_fail(tmp_path, signed_manifest):
    manifest = manifest_with_locks(signed_manifest, NOW + timedelta(days=7))
    storage = Locked(tmp_path, NOW + timedelta(days=1), {"a.tar.gz": "hidden by a delete marker"})
    stored(tmp_path, storage, "a.tar.gz")
    found = checks_of(storage, manifest, "a.tar.gz")
    assert found["unchanged"] == (False, "hidden by a delete marker")
    assert found["locked until"] == (False, "locked until 2026-12-07 03:00:00 UTC")
    assert checks_of(storage, manifest, "gone.tar.gz") == {"present while locked": (False, "missing")}


def test_nothing_is_promised_once_the_lock_ended_or_without_locks(tmp_path, signed_manifest):
    storage = Locked(tmp_path, None)
    stored(tmp_path, storage, "a.tar.gz")
    assert checks_of(storage, manifest_with_locks(signed_manifest, NOW - timedelta(days=1)), "a.tar.gz") == {}
    assert checks_of(storage, signed_manifest, "gone.tar.gz") == {}  # the checksum rows say it is missing


def test_integrity_failures_are_the_attack_rows_and_locked_files_checksums():
    rows = [
        ("m_manifest.json", "signature", "Ed25519 by k", "signature does not match", "MISMATCH"),
        ("b.tar.gz", "sha256", "aa", "bb", "MISMATCH"),
        ("b.tar.gz", "unchanged", "as committed", "overwritten", "MISMATCH"),
        ("database (database.sql)", "sha256", "cc", "dd", "MISMATCH"),
        ("b.tar.gz", "size", "1", "1", "OK"),
    ]
    unlocked = integrity_failures(rows, set())
    assert [(subject, check) for subject, check, _ in unlocked] == [
        ("m_manifest.json", "signature"),
        ("b.tar.gz", "unchanged"),
    ]
    locked = integrity_failures(rows, {"m_manifest.json", "b.tar.gz"})
    assert ("b.tar.gz", "unchanged", "sha256 bb, not as its manifest says") in locked and len(locked) == 3
