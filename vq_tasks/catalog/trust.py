"""How far a manifest read from storage is trusted (it may be forged).

A manifest is trusted only as far as it names files of its own backup: its ``backup_id`` is the one
asked for, every stored file is that backup's bundle or logs archive (never another backup's file,
never a path), every component is stored in one of them, and its member has the name the pipeline
gives it. Restore and extract then never open a name that the manifest made up.
"""

from __future__ import annotations

from vq_tasks.errors import PermanentError
from vq_tasks.manifest import (
    BUNDLED,
    COMPRESSIONS,
    Manifest,
    member_name,
    split_object_name,
)


def manifest_problems(manifest: Manifest, backup_id: str, prefix: str) -> list[str]:
    """Given a manifest read as ``backup_id``'s, return what in it names anything but that backup's
    own files (an empty list: nothing)."""
    found = []
    if manifest.backup_id != backup_id:
        found.append(f"it names backup {manifest.backup_id!r}, not {backup_id}")
    roles: dict[str, str] = {}
    for stored in manifest.files:
        owner = split_object_name(stored.name, prefix)
        if owner is None or owner[0] != backup_id or owner[1] in ("manifest", "signature", "acceptance"):
            found.append(f"stored file {stored.name!r} is not a data file of {backup_id}")
        elif stored.name in roles:
            found.append(f"stored file {stored.name!r} is listed twice")
        else:
            roles[stored.name] = owner[1]
    for component, entry in manifest.components.items():
        role = roles.get(entry.stored_in)
        wanted_role = "bundle" if component in BUNDLED else "logs"
        if role != wanted_role:
            found.append(f"{component} is stored in {entry.stored_in!r}, not a {wanted_role} of {backup_id}")
            continue
        if component not in BUNDLED:  # the logs archive is a member of its own: one of this backup's
            if split_object_name(entry.member, prefix) != (backup_id, "logs"):
                found.append(f"logs' member is {entry.member!r}, not a logs archive of {backup_id}")
            continue
        names = {member_name(component, backup_id, c) for c in COMPRESSIONS}
        if entry.member not in names:
            found.append(f"{component}'s member is {entry.member!r}, not {' or '.join(sorted(names))}")
    return found


def check_manifest(manifest: Manifest, backup_id: str, prefix: str) -> Manifest:
    """Return ``manifest`` if it names only ``backup_id``'s own files. Raise PermanentError
    listing every name that is not (nothing is read or written for such a manifest)."""
    problems = manifest_problems(manifest, backup_id, prefix)
    if problems:
        raise PermanentError(
            f"the manifest of {backup_id} is not trusted, nothing was read or written: " + "; ".join(problems)
        )
    return manifest
