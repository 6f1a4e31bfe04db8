"""Backups as they were committed, on a store that keeps versions (S3 with Object Lock): what an
attacker did afterwards, with the workers' own credentials, changes nothing that is read.

A delete marker hides an object from a plain listing and a plain read, and an overwrite replaces
its current version; the locked version written by the backup stays. This view lists and reads,
for every object of a backup, the version that belonged to it when its manifest was committed:
the manifest's first version (a manifest is written once, last), and of every other object the
newest version not later than that (a step that ran twice wrote it twice; the later one is the
one the manifest describes). An object whose current version is another one is listed with
``tampered`` saying what happened to it, so that verify reports it; one hidden by a delete marker
counts as deleted once its lock has ended (a prune's own delete before BACKUP_IMMUTABILITY was
on, or a delete after the date). A backup without a manifest is listed as it currently is.

What this cannot tell, chosen as it is by the store's modification times (to the second): an
overwrite within the second of the commit; a multipart overwrite begun before the commit and
completed after it (S3 dates it by its start); a manifest planted before ours and hidden by a
delete marker (a manifest is written create-only, so one left current stops the backup instead).
Verify then finds the checksums or the signature wrong, which with BACKUP_IMMUTABILITY counts as
tampering; the locked original is still in the bucket. Choosing by the version ids the writes
returned would close this; they differ in the off-site copy, whose manifest is the same bytes.
"""

from __future__ import annotations

import builtins
import contextlib
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

from vq_tasks.manifest import manifest_name, split_object_name
from vq_tasks.storage.base import ObjectVersion, Storage, StoredObject
from vq_tasks.streams.stages import Writer

HIDDEN = "hidden by a delete marker after the backup was committed"
OVERWRITTEN = "overwritten after the backup was committed"


class CommittedView(Storage):
    """``inner`` (a store that keeps versions) read as committed; writes and deletes go to it."""

    def __init__(self, inner: Any, prefix: str):
        self.inner = inner
        self.prefix = prefix  # BACKUP_NAME_PREFIX: which names are whose backup's
        self.provider = inner.provider  # type: ignore[misc]
        self.can_lock = inner.can_lock  # type: ignore[misc]

    def list(self) -> builtins.list[StoredObject]:
        return [_stored(version, tampered) for version, tampered in self._resolve(self.inner.list_versions())]

    def stat(self, name: str) -> StoredObject | None:
        found = self._committed(name)
        return None if found is None else _stored(*found)

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[BinaryIO]:
        found = self._committed(name)
        if found is None:
            raise FileNotFoundError(f"{self.describe()}/{name} does not exist")
        version, tampered = found
        reader = (
            self.inner.open_read(name)
            if tampered is None
            else self.inner.open_read_version(name, version.version_id)
        )
        with reader as stream:
            yield stream

    def retention(self, name: str, version_id: str | None = None) -> datetime | None:
        if version_id is None:
            found = self._committed(name)
            version_id = None if found is None else found[0].version_id
        return self.inner.retention(name, version_id)

    def open_write(
        self, name: str, retain_until: datetime | None = None
    ) -> contextlib.AbstractContextManager[Writer]:
        return self.inner.open_write(name, retain_until)

    def delete(self, name: str) -> bool:
        return self.inner.delete(name)

    def describe(self) -> str:
        return self.inner.describe()

    def abort_stale_uploads(self, started_before: datetime) -> builtins.list[str]:
        return self.inner.abort_stale_uploads(started_before)

    def lock_problems(self, shortest: timedelta) -> builtins.list[str]:
        return self.inner.lock_problems(shortest)

    def _committed(self, name: str) -> tuple[ObjectVersion, str | None] | None:
        """Return the committed version of ``name`` and what happened to it since, or None."""
        versions = self.inner.list_versions(name)
        split = split_object_name(name, self.prefix)
        if split is not None and split[1] != "manifest":
            versions += self.inner.list_versions(manifest_name(split[0]))
        return next((found for found in self._resolve(versions) if found[0].name == name), None)

    def _resolve(
        self, versions: builtins.list[ObjectVersion]
    ) -> builtins.list[tuple[ObjectVersion, str | None]]:
        """Given versions (current first, then newest first, for each name), return for each name
        that has one its committed version and what happened to it since (None: nothing)."""
        by_name: dict[str, builtins.list[ObjectVersion]] = defaultdict(list)
        for version in versions:
            if version not in by_name[version.name]:
                by_name[version.name].append(version)
        committed_at = self._commit_times(by_name)
        found = []
        for name, history in by_name.items():
            split = split_object_name(name, self.prefix)
            chosen = _choose(
                history, split[1] if split else None, committed_at.get(split[0]) if split else None
            )
            if chosen is None:
                continue
            current = history[0]
            tampered = None if current == chosen else HIDDEN if current.delete_marker else OVERWRITTEN
            if tampered == HIDDEN and not self._still_locked(chosen):
                continue  # deleted once its lock ended (or by a prune before BACKUP_IMMUTABILITY)
            found.append((chosen, tampered))
        return found

    def _still_locked(self, version: ObjectVersion) -> bool:
        until = self.inner.retention(version.name, version.version_id)
        return until is not None and until > datetime.now(UTC)

    def _commit_times(self, by_name: dict[str, builtins.list[ObjectVersion]]) -> dict[str, datetime]:
        """Return backup id -> when its manifest was first written, for each manifest seen."""
        times = {}
        for name, history in by_name.items():
            split = split_object_name(name, self.prefix)
            written = [v.modified for v in history if not v.delete_marker]
            if split is not None and split[1] == "manifest" and written:
                times[split[0]] = min(written)
        return times


def _choose(
    history: builtins.list[ObjectVersion], role: str | None, committed_at: datetime | None
) -> ObjectVersion | None:
    """Return the version of one object that its backup committed: see the module's docstring.
    Without a manifest, the current version, if it is no delete marker."""
    written = [v for v in history if not v.delete_marker]
    if not written:
        return None
    if role == "manifest":
        return min(written, key=lambda v: v.modified)
    if committed_at is None:
        return None if history[0].delete_marker else history[0]
    before = [v for v in written if v.modified <= committed_at]
    if not before:
        return min(written, key=lambda v: v.modified)
    return max(before, key=lambda v: v.modified)  # ties: the first listed, the current one


def _stored(version: ObjectVersion, tampered: str | None) -> StoredObject:
    return StoredObject(version.name, version.size, version.modified, tampered)
