"""The committed-version rule of a store that keeps versions (storage.committed), on listings as
S3's ListObjectVersions gives them: what the backup wrote is read, whatever came after."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from vq_tasks.storage.base import ObjectVersion
from vq_tasks.storage.committed import HIDDEN, OVERWRITTEN, CommittedView

T0 = datetime(2026, 12, 6, 2, 0, tzinfo=UTC)
ID = "vq_20261206_020000"
MANIFEST, BUNDLE = f"{ID}_manifest.json", f"{ID}.tar.gz"


def version(name: str, vid: str, seconds: int, size: int = 10, latest: bool = False, marker: bool = False):
    return ObjectVersion(name, vid, T0 + timedelta(seconds=seconds), 0 if marker else size, latest, marker)


class Versions:
    """A store's version listing, as S3Storage.list_versions returns it."""

    provider = "AWS_S3"
    can_lock = True

    def __init__(self, *versions: ObjectVersion, locked: frozenset[str] = frozenset(("b1", "m1"))):
        self.versions = sorted(versions, key=lambda v: (v.name, not v.latest, -v.modified.timestamp()))
        self.locked = locked  # version ids still under a lock

    def retention(self, name: str, version_id: str | None = None) -> datetime | None:
        return datetime.now(UTC) + timedelta(days=1) if version_id in self.locked else None

    def list_versions(self, starting: str = "") -> list[ObjectVersion]:
        return [v for v in self.versions if v.name.startswith(starting)]


def resolved(*versions: ObjectVersion, locked=frozenset(("b1", "m1"))) -> dict[str, tuple[str, str | None]]:
    view = CommittedView(Versions(*versions, locked=locked), "vq")
    return {o.name: (o.size, o.tampered) for o in view.list()}


def test_an_untouched_backup_is_read_as_it_is():
    found = resolved(version(BUNDLE, "b1", 1, latest=True), version(MANIFEST, "m1", 2, latest=True))
    assert found == {BUNDLE: (10, None), MANIFEST: (10, None)}


def test_a_delete_marker_hides_nothing():
    found = resolved(
        version(BUNDLE, "b1", 1, size=7),
        version(BUNDLE, "d1", 9, latest=True, marker=True),
        version(MANIFEST, "m1", 2, latest=True),
    )
    assert found[BUNDLE] == (7, HIDDEN)


def test_a_hidden_object_whose_lock_ended_counts_as_deleted():
    pruned_before = resolved(
        version(BUNDLE, "b1", 1),
        version(BUNDLE, "d1", 9, latest=True, marker=True),
        version(MANIFEST, "m1", 2),
        version(MANIFEST, "d2", 9, latest=True, marker=True),
        locked=frozenset(),
    )
    assert pruned_before == {}


def test_an_overwrite_after_the_commit_is_not_read():
    found = resolved(
        version(BUNDLE, "b1", 1, size=7),
        version(BUNDLE, "evil", 9, size=3, latest=True),
        version(MANIFEST, "m1", 2, size=5),
        version(MANIFEST, "forged", 9, size=4, latest=True),
    )
    assert found == {BUNDLE: (7, OVERWRITTEN), MANIFEST: (5, OVERWRITTEN)}


def test_a_step_that_wrote_twice_before_the_commit_is_read_at_its_last_write():
    found = resolved(
        version(BUNDLE, "dead-execution", 1, size=6),
        version(BUNDLE, "heir", 2, size=7, latest=True),
        version(MANIFEST, "m1", 3, latest=True),
    )
    assert found[BUNDLE] == (7, None)


def test_a_backup_without_manifest_is_read_as_it_currently_is():
    gone = resolved(version(BUNDLE, "b1", 1), version(BUNDLE, "d1", 2, latest=True, marker=True))
    assert gone == {}  # deleted (by a prune before BACKUP_IMMUTABILITY, say): not listed
    running = resolved(version(BUNDLE, "b1", 1, latest=True))
    assert running == {BUNDLE: (10, None)}


def test_stat_of_one_name_sees_its_manifest_too():
    view = CommittedView(
        Versions(
            version(BUNDLE, "b1", 1, size=7),
            version(BUNDLE, "evil", 9, size=3, latest=True),
            version(MANIFEST, "m1", 2, latest=True),
        ),
        "vq",
    )
    found = view.stat(BUNDLE)
    assert found is not None and (found.size, found.tampered) == (7, OVERWRITTEN)
    assert view.stat("vq_20261206_020000_logs.tar.gz") is None
