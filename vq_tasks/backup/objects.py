"""Writing a backup's stored objects: through a hash stage (encrypted on the way when asked),
checked for the size storage holds, committed only after the caller's fence."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from vq_tasks.crypto import encryption
from vq_tasks.crypto.age import X25519Recipient
from vq_tasks.manifest import StoredFile
from vq_tasks.storage.base import Storage, StorageError
from vq_tasks.streams.stages import HashStage, Writer


def store_object(
    storage: Storage,
    name: str,
    write: Callable[[Writer], object],
    recipients: list[X25519Recipient] | None = None,
    fence: Callable[[], None] = lambda: None,
    retain_until: datetime | None = None,
) -> StoredFile:
    """Write one object through a hash stage, encrypted to ``recipients`` on the way if any (the
    checksums are then those of the encrypted bytes, as stored), and check that storage holds
    exactly that size. ``fence`` is called before the object is committed; it is locked until
    ``retain_until`` if given."""
    with storage.open_write(name, retain_until) as out:
        hashed = HashStage(out)  # in this thread: a background one would hold its chunks in flight
        if recipients:
            sealed = encryption.encrypting(hashed, recipients)
            write(sealed)
            sealed.close()
        else:
            write(hashed)
        fence()
    checks = hashed.checksums()
    stored = storage.stat(name)
    if stored is None or stored.size != checks.size:
        found = "nothing" if stored is None else f"{stored.size} bytes"
        raise StorageError(f"{storage.describe()}/{name}: wrote {checks.size} bytes, storage has {found}")
    return StoredFile(name=name, size=checks.size, md5=checks.md5, sha256=checks.sha256)


def commit_object(
    storage: Storage, name: str, data: bytes, fence: Callable[[], None], retain_until: datetime | None = None
) -> None:
    """Store the small object ``name`` (locked until ``retain_until`` if given); ``fence`` is
    called before it is committed."""
    with storage.open_write(name, retain_until) as out:
        out.write(data)
        fence()
