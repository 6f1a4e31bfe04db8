"""Restore config and log archives, refusing any entry that would land outside its target.

Every entry is checked before anything is written, against the archive and against what is on
disk already: a refused archive writes nothing. An entry must lie under one of the roots the backup
recorded (so a tampered archive cannot reach, say, ``etc/passwd`` when restoring to ``/``), must not
be absolute or climb with ``..``, and must be a regular file, a folder or a symlink: hard links,
devices and FIFOs are refused (our archives never hold them: a hard-linked file is stored as a copy
of its own, so a hard link means an archive that is not ours). A symlink must point inside its root,
followed through the archive's other links and the links already on disk, never climbing above the
root on the way; nothing is written below a symlink of the archive, and a folder on disk must not
lead out of the root. A regular file is written to a new file beside its place and renamed over it,
so an existing symlink or hard link there is replaced, never written through. Modes are kept
(never setuid, setgid or sticky). Logs restore only into a folder of their own, never over the
live logs.

As each file or folder is written, tarfile's ``tar`` extraction filter checks again that it lands
inside the target (a link put on disk since the check). Python has the filters from 3.11.4 (PEP 706);
on 3.11.0 to 3.11.3 ``_checked`` makes the same checks and the same modes itself (see FILTERS).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import posixpath
import tarfile
import uuid
from pathlib import Path

from pydantic import BaseModel

from vq_tasks.errors import PermanentError
from vq_tasks.streams.readers import DamagedStream, forget_members, open_tar_stream
from vq_tasks.streams.stages import CHUNK_SIZE

ALLOWED_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE)
TYPE_NAMES = {
    tarfile.LNKTYPE: "a hard link (our archives store hard-linked files as copies)",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}
MAX_ENTRIES = 500_000  # far more than a config or logs folder holds; a TarInfo each is kept in memory
MAX_LINK_HOPS = 40  # as Linux follows at most
NAME_MAX, PATH_MAX = 255, 4096
# tarfile's extraction filters (and TarInfo.replace) came with Python 3.11.4. Without them, each
# entry is checked by _checked before tarfile writes it; the tests set False to take that path anywhere.
FILTERS = hasattr(tarfile, "tar_filter")


class ExtractRefused(Exception):
    """What _checked raises where the ``tar`` filter would raise tarfile.FilterError."""


# what writing an entry raises when the disk changed since the check and would carry it out
REFUSED_ON_WRITE: tuple[type[Exception], ...] = (
    (ExtractRefused, tarfile.FilterError) if FILTERS else (ExtractRefused,)
)


class FilesRestoreResult(BaseModel):
    target: str
    files: list[str]


def refusals(members: list[tarfile.TarInfo], roots: list[str], target: Path | None = None) -> list[str]:
    """Return why each unacceptable entry is refused (an empty list: all may be written); with
    ``target``, also those that what is on disk under it would carry out of their root."""
    allowed = [root.strip("/") for root in roots]
    links = {posixpath.normpath(m.name): m.linkname for m in members if m.issym()}
    files = {posixpath.normpath(m.name) for m in members if not m.isdir() and not m.issym()}
    seen: dict[str, str] = {}
    found = []
    for member in members:
        reason = _refusal(member, allowed, links, seen) or _below(member, links, files)
        if reason is None and target is not None:
            reason = _disk_refusal(member, allowed, links, target)
        if reason:
            found.append(f"{member.name}: {reason}")
    return found


def _refusal(
    member: tarfile.TarInfo, roots: list[str], links: dict[str, str], seen: dict[str, str]
) -> str | None:
    """Return why ``member`` may not be written whatever is on disk, or None."""
    name = member.name
    problem = _name_problem(name)
    if problem:
        return problem
    if member.type not in ALLOWED_TYPES:
        return (
            TYPE_NAMES.get(member.type, f"an entry of type {member.type!r}")
            + ", not a file, folder or symlink"
        )
    normal = posixpath.normpath(name)
    root = _root_of(normal, roots)
    if root is None:
        return f"outside the backed-up roots {', '.join('/' + r for r in roots)}"
    kind = "symlink" if member.issym() else "folder" if member.isdir() else "file"
    earlier, seen[normal] = seen.get(normal), kind
    if earlier is not None and (earlier != kind or kind == "symlink"):  # a file or folder twice: fine
        return f"appears twice in the archive (as a {earlier} and a {kind})"
    if kind == "symlink":
        return _link_problem(normal, member.linkname, root, links)
    return None


def _below(member: tarfile.TarInfo, links: dict[str, str], files: set[str]) -> str | None:
    """Return why ``member`` cannot go where its folder is a symlink or a file of the archive."""
    parents = posixpath.normpath(member.name).split("/")[:-1]
    for i in range(len(parents)):
        folder = "/".join(parents[: i + 1])
        if folder in links:
            return "below a symlink of the same archive"
        if folder in files:
            return f"below {folder}, a file of the same archive"
    return None


def _name_problem(name: str) -> str | None:
    if not name or "\0" in name:
        return "an empty name or one with a NUL byte"
    if name.startswith("/"):
        return "absolute or climbing path (absolute)"
    parts = name.split("/")
    if ".." in parts:
        return "absolute or climbing path (..)"
    if "." in parts or "" in parts:
        return "a name with empty or '.' parts (never in our archives)"
    try:
        encoded = [os.fsencode(part) for part in parts]
    except UnicodeError:
        return "a name the file system cannot hold"
    if sum(len(part) + 1 for part in encoded) > PATH_MAX or any(len(part) > NAME_MAX for part in encoded):
        return "a name too long for the file system"
    return None


def _link_problem(name: str, linkname: str, root: str, links: dict[str, str]) -> str | None:
    if name == root:
        return "the backed-up root itself as a symlink"
    if not linkname or "\0" in linkname:
        return "a symlink to an empty name or one with a NUL byte"
    if linkname.startswith("/"):
        return f"link to an absolute path {linkname}"
    if resolve_link(name, linkname, root, links) is None:
        return f"link pointing out of {'/' + root}: {linkname}"
    return None


def resolve_link(name: str, linkname: str, root: str, links: dict[str, str]) -> str | None:
    """Given a symlink ``name`` -> ``linkname`` below ``root`` and the archive's symlinks (name ->
    target), return where it leads, following those symlinks; None if it climbs above ``root`` on
    the way, leads to an absolute path, or goes round (more than MAX_LINK_HOPS links)."""
    floor = len(root.split("/"))
    resolved = posixpath.dirname(name).split("/")
    pending = linkname.split("/")[::-1]  # a stack: the next component last
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if len(resolved) <= floor:
                return None
            resolved.pop()
            continue
        resolved.append(part)
        target = links.get("/".join(resolved))
        if target is not None:
            hops += 1
            if hops > MAX_LINK_HOPS or target.startswith("/") or not target:
                return None
            resolved.pop()
            pending.extend(target.split("/")[::-1])
    return "/".join(resolved)


def _disk_refusal(
    member: tarfile.TarInfo, roots: list[str], links: dict[str, str], target: Path
) -> str | None:
    """Return why what is on disk under ``target`` would carry ``member`` out of its root, or would
    stop it half way (a file where a folder goes), or None."""
    normal = posixpath.normpath(member.name)
    root = _root_of(normal, roots)
    assert root is not None  # _refusal checked it
    top = os.path.realpath(target / root)
    path = target / normal
    if normal != root:
        folder = os.path.realpath(target / posixpath.dirname(normal))
        if not _inside(folder, top):
            return f"its folder leads out of {'/' + root} on disk (to {folder})"
        existing = Path(folder)
        while not os.path.lexists(existing):
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} on disk is not a folder"
    if member.isdir():
        if path.is_symlink() and not _inside(os.path.realpath(path), top):
            return f"a symlink on disk to {os.path.realpath(path)} stands where the folder goes"
        if os.path.lexists(path) and not path.is_dir():
            return "a file on disk stands where the folder goes"
    elif path.is_dir() and not path.is_symlink():
        return f"a folder on disk stands where the {'symlink' if member.issym() else 'file'} goes"
    if member.issym():
        leads = resolve_link(normal, member.linkname, root, links)
        real = os.path.realpath(target / leads) if leads is not None else None
        if real is None or not _inside(real, top):
            return f"link leads out of {'/' + root} on disk (to {real})"
    return None


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _root_of(name: str, roots: list[str]) -> str | None:
    normal = posixpath.normpath(name)
    for root in roots:
        if normal == root or normal.startswith(root + "/"):
            return root
    return None


def read_members(archive: Path) -> list[tarfile.TarInfo]:
    """Return the entries of a (possibly compressed) tar, read as a stream. Raise PermanentError
    for one that cannot be read or holds more than MAX_ENTRIES entries."""
    members = []
    try:
        with open_tar_stream(archive) as tar:
            while (member := tar.next()) is not None:
                forget_members(tar)  # stream mode keeps every TarInfo otherwise: kept once, here
                members.append(member)
                if len(members) > MAX_ENTRIES:
                    raise PermanentError(
                        f"{archive.name} holds more than {MAX_ENTRIES} entries: refused, nothing was written"
                    )
    except (tarfile.TarError, OSError, EOFError, DamagedStream, UnicodeError) as exc:
        raise PermanentError(f"{archive.name} cannot be read as a tar archive: {exc}") from None
    return members


def restore_files(archive: Path, roots: list[str], target: Path) -> FilesRestoreResult:
    """Extract ``archive`` under ``target`` (entries keep their paths below it, modes kept).
    Raise PermanentError listing every refused entry, having written nothing."""
    members = read_members(archive)
    refused = refusals(members, roots, target)
    if refused:
        raise PermanentError(
            f"refusing to restore {archive.name}; nothing was written: " + "; ".join(refused)
        )
    target.mkdir(parents=True, exist_ok=True)
    allowed = [root.strip("/") for root in roots]
    folders: list[tuple[Path, int]] = []
    with open_tar_stream(archive) as tar:
        while (member := tar.next()) is not None:  # each checked above; checked again where it goes,
            forget_members(tar)  # in case the disk changed since
            path = target / _placed(member.name, target, allowed)
            try:
                if member.isdir():
                    folders.append((path, member.mode & 0o777))
                    _extract(tar, _changed(member, mode=member.mode | 0o700), target)
                elif member.issym():
                    _extract_link(tar, member, path)
                else:
                    _extract_file(tar, member, target)
            except REFUSED_ON_WRITE as exc:
                raise PermanentError(f"{archive.name}: {exc} (the disk changed while restoring)") from None
    for folder, mode in reversed(folders):  # last: a read-only folder must still take its files
        if not folder.is_symlink():
            os.chmod(folder, mode)
    return FilesRestoreResult(target=str(target), files=[m.name for m in members])


def _placed(name: str, target: Path, roots: list[str]) -> str:
    """Return ``name`` if its folder really lies under its root below ``target`` now. Raise
    PermanentError if not (a link put there since the check)."""
    root = _root_of(name, roots)
    folder = posixpath.dirname(name)
    top = os.path.realpath(target / (root or ""))
    if root is None or (name != root and not _inside(os.path.realpath(target / folder), top)):
        raise PermanentError(f"{name}: its folder leads out of its root (the disk changed while restoring)")
    return name


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """Write ``member`` (a file or folder, checked before) under ``target`` with its permission bits
    but never setuid, setgid or sticky. Raise one of REFUSED_ON_WRITE, writing nothing, if it
    would land outside ``target``."""
    if FILTERS:
        tar.extract(member, target, filter=_keep_modes)
        return
    checked = _checked(member, target)
    if hasattr(tarfile, "fully_trusted_filter"):  # a Python with the filters, taking this path (tests)
        tar.extract(checked, target, filter="fully_trusted")  # what extract() does without filters
    else:
        tar.extract(checked, target)


def _keep_modes(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """The ``tar`` extraction filter, keeping the entry's permission bits (group write included)
    but never setuid, setgid or sticky."""
    return tarfile.tar_filter(member, dest).replace(mode=member.mode & 0o777, deep=False)


def _checked(member: tarfile.TarInfo, dest: Path) -> tarfile.TarInfo:
    """What _keep_modes returns, for Pythons without tarfile's filters: ``member`` with its mode
    ``& 0o777``. Raise ExtractRefused (in the filter's own words) if it is absolute, would land
    outside ``dest`` (its folders resolved on disk now), or is neither a file nor a folder (which
    the ``tar`` filter lets through: refusals() refused those before)."""
    name = member.name
    if os.path.isabs(name):  # the filter strips a leading / instead: refusals() refused it before
        raise ExtractRefused(f"member {name!r} has an absolute path")
    top = os.path.realpath(dest)
    lands = os.path.realpath(os.path.join(top, name))
    if os.path.commonpath([lands, top]) != top:
        raise ExtractRefused(f"{name!r} would be extracted to {lands!r}, which is outside the destination")
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
        raise ExtractRefused(f"{name!r} is a special file")
    return _changed(member, mode=member.mode & 0o777)


def _changed(member: tarfile.TarInfo, **changes: object) -> tarfile.TarInfo:
    """A copy of ``member`` with ``changes``: ``member.replace(deep=False, **changes)``, which
    Python has only from 3.11.4."""
    changed = copy.copy(member)
    for field, value in changes.items():
        setattr(changed, field, value)
    return changed


def _extract_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """Write a regular file beside its place under a name of its own, then rename it over its
    place: a symlink or hard link there is replaced, never written through."""
    folder, base = posixpath.split(member.name)
    temporary = posixpath.join(folder, f".{base[:200]}.vq-restore-{uuid.uuid4().hex[:12]}")
    try:
        _extract(tar, _changed(member, name=temporary), target)
        os.replace(target / temporary, target / member.name)
    finally:
        with contextlib.suppress(OSError):
            (target / temporary).unlink(missing_ok=True)


def _extract_link(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    """Make the symlink, replacing what is there (never a folder: refused before)."""
    if os.path.lexists(path):
        os.unlink(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(member.linkname, path)
    tar.chown(member, str(path), numeric_owner=False)  # as tar does: only when run as root


def changed_files(archive: Path, target: Path) -> list[str]:
    """Return the regular files of ``archive`` whose copy under ``target`` is missing, differs or
    is a symlink (which a restore replaces); entries with absolute or climbing names are left out
    (a restore refuses them) and never read from disk."""
    changed = []
    with open_tar_stream(archive) as tar:
        while (member := tar.next()) is not None:
            forget_members(tar)
            if not member.isfile() or _name_problem(member.name):
                continue
            on_disk = target / member.name
            if (
                on_disk.is_symlink()
                or not on_disk.is_file()
                or _sha256_file(on_disk) != _sha256_member(tar, member)
            ):
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
