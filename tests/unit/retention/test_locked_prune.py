"""Prune meets a retention lock: the file stays, its backup keeps its other files, the others
are deleted, and nothing fails."""

from __future__ import annotations

from datetime import UTC, datetime

from vq_tasks.retention.plan import Locked, apply
from vq_tasks.retention.policy import Deletion
from vq_tasks.storage.base import ObjectLocked
from vq_tasks.storage.local import LocalStorage

UNTIL = datetime(2027, 1, 1, tzinfo=UTC)


class LocksOne(LocalStorage):
    def __init__(self, root, locked: str):
        super().__init__(root)
        self.locked = locked

    def delete(self, name: str) -> bool:
        if name == self.locked:
            raise ObjectLocked(f"{name} is locked", UNTIL)
        return super().delete(name)


def test_a_locked_manifest_keeps_its_backup_whole_and_spares_no_other(tmp_path):
    storage = LocksOne(tmp_path, "a_manifest.json")
    names = ["a_manifest.json", "a.tar.gz", "b_manifest.json", "b.tar.gz"]
    for name in names:
        with storage.open_write(name) as out:
            out.write(b"x")
    deletions = [Deletion(backup, order, f"{backup}{suffix}", "old") for backup in "ab"
                 for order, suffix in enumerate(("_manifest.json", ".tar.gz"))]  # fmt: skip
    done: list[list[Deletion]] = []
    locked = apply(storage, deletions, done.append)
    assert locked == [Locked(deletions[0], UNTIL)]
    assert sorted(o.name for o in storage.list()) == ["a.tar.gz", "a_manifest.json"]
    assert [[d.name for d in group] for group in done] == [["b_manifest.json", "b.tar.gz"]]
