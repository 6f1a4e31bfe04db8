"""Restore config and log archives, refusing any entry that would land outside its target.

Every entry is checked before anything is written: a refused archive writes nothing. An entry
must lie under one of the roots the backup recorded (so a tampered archive cannot reach, say,
``etc/passwd`` when restoring to ``/``), must not be absolute or climb with ``..``, and a link
must point inside the same root. Modes are kept. Logs restore only into a folder of their own,
never over the live logs.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
from pathlib import Path

from pydantic import BaseModel

from vq_tasks.errors import PermanentError
from vq_tasks.streams import CHUNK_SIZE, DamagedStream, open_tar_stream

ALLOWED_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE)


class FilesRestoreResult(BaseModel):
    target: str
    files: list[str]


def refusals(members: list[tarfile.TarInfo], roots: list[str]) -> list[str]:
    """Return why each unacceptable entry is refused (an empty list: all may be written)."""
    allowed = [root.strip("/") for root in roots]
    links: set[str] = set()
    found = []
    for member in members:
        reason = _refusal(member, allowed, links)
        if reason:
            found.append(f"{member.name}: {reason}")
        if member.issym():
            links.add(posixpath.normpath(member.name))
    return found


def _refusal(member: tarfile.TarInfo, roots: list[str], links: set[str]) -> str | None:
    name = member.name
    if name.startswith("/") or ".." in name.split("/"):
        return "absolute or climbing path"
    if member.type not in ALLOWED_TYPES:
        return "not a file, folder or symlink"
    parents = posixpath.normpath(name).split("/")[:-1]
    if any("/".join(parents[: i + 1]) in links for i in range(len(parents))):
        return "below a symlink of the same archive"
    root = _root_of(name, roots)
    if root is None:
        return f"outside the backed-up roots {', '.join('/' + r for r in roots)}"
    if member.issym():
        if member.linkname.startswith("/"):
            return f"link to an absolute path {member.linkname}"
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
        if _root_of(resolved, [root]) is None:
            return f"link pointing out of {'/' + root}: {member.linkname}"
    return None


def _root_of(name: str, roots: list[str]) -> str | None:
    normal = posixpath.normpath(name)
    for root in roots:
        if normal == root or normal.startswith(root + "/"):
            return root
    return None


def read_members(archive: Path) -> list[tarfile.TarInfo]:
    """Return the entries of a (possibly compressed) tar, read as a stream."""
    try:
        with open_tar_stream(archive) as tar:
            return list(tar)
    except (tarfile.TarError, OSError, EOFError, DamagedStream) as exc:
        raise PermanentError(f"{archive.name} cannot be read as a tar archive: {exc}") from None


def restore_files(archive: Path, roots: list[str], target: Path) -> FilesRestoreResult:
    """Extract ``archive`` under ``target`` (entries keep their paths below it, modes kept).
    Raise PermanentError listing every refused entry, having written nothing."""
    members = read_members(archive)
    refused = refusals(members, roots)
    if refused:
        raise PermanentError(
            f"refusing to restore {archive.name}; nothing was written: " + "; ".join(refused)
        )
    target.mkdir(parents=True, exist_ok=True)
    keep_modes = _extraction_filter(roots)
    with open_tar_stream(archive) as tar:
        for member in tar:  # checked above; the tar filter still guards against what slipped by
            tar.extract(member, target, filter=keep_modes)
    return FilesRestoreResult(target=str(target), files=[m.name for m in members])


def _extraction_filter(roots: list[str]):
    """Return tarfile's extraction filter for ``roots``: the ``tar`` filter's checks, the entry's
    permission bits (group write included) but never setuid, setgid or sticky, and the entry's
    folder must really lie under its root on disk (a link already there must not carry it away)."""
    allowed = [root.strip("/") for root in roots]

    def keep_modes(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        checked = tarfile.tar_filter(member, dest)
        root = _root_of(member.name, allowed)
        if root is None or posixpath.normpath(member.name) != root:
            parent = os.path.realpath(os.path.join(dest, posixpath.dirname(member.name)))
            top = os.path.realpath(os.path.join(dest, root or ""))
            if root is None or not (parent + "/").startswith(top + "/"):
                raise tarfile.OutsideDestinationError(member, parent)
        return checked.replace(mode=member.mode & 0o777, deep=False)

    return keep_modes


def changed_files(archive: Path, target: Path) -> list[str]:
    """Return the regular files of ``archive`` whose copy under ``target`` is missing or differs."""
    changed = []
    with open_tar_stream(archive) as tar:
        for member in tar:
            if not member.isfile():
                continue
            on_disk = target / member.name
            if not on_disk.is_file() or _sha256_file(on_disk) != _sha256_member(tar, member):
                changed.append("/" + member.name if str(target) == "/" else str(on_disk))
    return changed


def _sha256_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    digest = hashlib.sha256()
    stream = tar.extractfile(member)
    while stream is not None and (chunk := stream.read(CHUNK_SIZE)):
        digest.update(chunk)
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def check_logs_target(target: Path, live_log_paths: list[str]) -> None:
    """Refuse a logs restore target that is, holds or lies inside a live log folder."""
    resolved = Path(os.path.realpath(target))
    for live in live_log_paths:
        live_path = Path(os.path.realpath(live))
        if resolved == live_path or live_path in resolved.parents or resolved in live_path.parents:
            raise PermanentError(
                f"logs restore only into a folder of their own: {target} overlaps the live logs {live}"
            )
