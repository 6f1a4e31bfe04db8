"""Which backup ``latest`` names: the newest complete one, never one dated more than CLOCK_SKEW
ahead; for a restore or an extract, the newest whose manifest can be read, names only its own files
and (with BACKUP_SIGNING_PUBLIC_KEYS) is signed, read from the newest down."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from vq_tasks.catalog.backup_set import CLOCK_SKEW
from vq_tasks.catalog.listing import backup_sets, load_manifest
from vq_tasks.catalog.trust import manifest_problems
from vq_tasks.crypto import signing
from vq_tasks.errors import BackupError, PermanentError, is_transient
from vq_tasks.manifest import (
    parse_backup_id,
)
from vq_tasks.settings import Settings
from vq_tasks.storage.base import Storage

logger = logging.getLogger(__name__)


def resolve_backup_id(
    storage: Storage,
    settings: Settings,
    requested: str,
    now: datetime | None = None,
    restorable: bool = False,
) -> str:
    """Given a backup id or ``latest``, return the backup id: for ``latest`` the newest complete
    backup not dated after ``now`` + CLOCK_SKEW (a later id is forged or from a wrong clock). With
    ``restorable`` (a restore, an extract), the newest whose manifest can be read, names its own
    backup's files and, with BACKUP_SIGNING_PUBLIC_KEYS, is signed: a forged newer manifest must not
    stand in the way of restoring the real one; it is logged. A drill and verify take the newest as
    it is, so that such a manifest fails them loudly. Raise PermanentError for a string that is not
    a backup id (such as one with ``../``), or ``latest`` with no such backup; a storage error that
    may pass is raised as it is."""
    prefix = settings.backup_name_prefix
    if requested == "latest":
        limit = (now or datetime.now(UTC)) + CLOCK_SKEW
        complete = [b for b in backup_sets(storage.list(), prefix) if b.complete]
        for ahead in (b for b in complete if b.started > limit):
            logger.warning(
                "latest: %s is dated in the future, not taken for the latest backup", ahead.backup_id
            )
        keys = signing.trusted_keys(settings) if restorable else {}
        newest_first = (b.backup_id for b in reversed(complete) if b.started <= limit)
        chosen = next(  # a restore reads manifests from the newest down, to the first it trusts
            (i for i in newest_first if not restorable or _restorable(storage, i, prefix, keys)), None
        )
        if chosen is None:
            what = "complete backup" + (" with a trusted manifest" if restorable else "")
            raise PermanentError(f"no {what} in {storage.describe()}")
        return chosen
    try:
        parse_backup_id(requested, prefix)
    except ValueError as exc:
        raise PermanentError(f"{exc} (or 'latest')") from None
    return requested


def _restorable(storage: Storage, backup_id: str, prefix: str, keys: signing.PublicKeys) -> bool:
    """Whether ``backup_id``'s manifest can be read, names only its own files and its signature
    holds (``keys``: BACKUP_SIGNING_PUBLIC_KEYS); log why not. Raise a storage error that may pass."""
    try:
        manifest = load_manifest(storage, backup_id)
    except BackupError as exc:
        if is_transient(exc):
            raise
        problems = [str(exc)]
    else:
        problems = manifest_problems(manifest, backup_id, prefix)
        distrusted = signing.distrust(manifest, keys)
        problems += [f"manifest signature {distrusted}"] if distrusted else []
    if problems:
        logger.warning("latest: %s is not taken for the latest backup: %s", backup_id, "; ".join(problems))
    return not problems
