"""Config and log files as tar streams: modes kept, symlinks stored as symlinks, files streamed,
hard-linked files stored as copies (never as tar hard links, which a restore refuses).

Entries are named by their absolute path without the leading slash (``etc/vq/app.conf``), so a
restore knows where each one came from. A file that changes while it is read is stored with the
size it had when opened: a log that grows is cut at that size, one that shrinks is padded with
zeros and reported in ``skipped`` (log rotation must not fail a backup).
"""

from __future__ import annotations

import os
import stat
import tarfile
import time
from collections.abc import Iterator
from typing import BinaryIO

from vq_tasks.errors import PermanentError
from vq_tasks.manifest import FilesFacts
from vq_tasks.streams.stages import CHUNK_SIZE, Writer


def archive_config(paths: list[str], out: Writer) -> FilesFacts:
    """Write an uncompressed tar of every file, folder and symlink under ``paths`` to ``out``.
    Raise PermanentError if a configured path is missing or unreadable (nothing silently skipped)."""
    for root in paths:
        if not os.path.lexists(root):
            raise PermanentError(f"BACKUP_CONFIG_PATHS: {root} does not exist")
    return _write_tar(paths, out, select=lambda _st: True, strict=True)


def archive_logs(paths: list[str], out: Writer, window_days: int, now: float | None = None) -> FilesFacts:
    """Write an uncompressed tar of the regular files under ``paths`` modified in the last
    ``window_days`` to ``out``. Missing roots and unreadable files are reported, not fatal."""
    cutoff = (now if now is not None else time.time()) - window_days * 86400
    return _write_tar(paths, out, select=lambda st: st.st_mtime >= cutoff, strict=False, regular_only=True)


def _write_tar(paths, out: Writer, select, strict: bool, regular_only: bool = False) -> FilesFacts:
    facts = FilesFacts(roots=[str(p) for p in paths], files=[])
    sink = _WriterFile(out)
    with tarfile.open(  # type: ignore[call-overload]  # stream mode: only write(), no read() or seek()
        fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT
    ) as tar:
        for path, is_root in _walk(paths, facts, strict):
            try:
                st = os.stat(path) if is_root else os.lstat(path)  # a root may be a link to its folder
                if stat.S_ISDIR(st.st_mode) and regular_only:
                    continue
                if regular_only and not stat.S_ISREG(st.st_mode):
                    facts.skipped.append(f"{path}: not a regular file")
                elif select(st):
                    _add(tar, path, st, facts, follow=is_root)
            except OSError as exc:
                if strict:
                    raise PermanentError(f"cannot read {path}: {exc.strerror}") from exc
                facts.skipped.append(f"{path}: {exc.strerror}")
    sink.close()
    return facts


def _walk(paths: list[str], facts: FilesFacts, strict: bool) -> Iterator[tuple[str, bool]]:
    """Yield (entry, is it a root) for every entry under ``paths``: roots first, folders before
    their content, sorted. A root that is a link to a folder is walked as that folder."""
    for root in paths:
        if not os.path.lexists(root):
            facts.skipped.append(f"{root}: does not exist")
            continue
        yield root, True
        if os.path.isdir(root):
            yield from ((path, False) for path in _walk_folder(root, facts, strict))


def _walk_folder(folder: str, facts: FilesFacts, strict: bool) -> Iterator[str]:
    def onerror(exc: OSError) -> None:
        if strict:
            raise PermanentError(f"cannot read {exc.filename}: {exc.strerror}")
        facts.skipped.append(f"{exc.filename}: {exc.strerror}")

    for current, dirs, files in os.walk(folder, onerror=onerror):
        dirs.sort()
        for name in sorted(dirs + files):
            yield os.path.join(current, name)


def _add(tar: tarfile.TarFile, path: str, st: os.stat_result, facts: FilesFacts, follow: bool) -> None:
    """Add one entry; regular files are opened first and stored with the size of the open file.
    Sockets and other entries tar cannot hold are noted in ``skipped``."""
    arcname = os.path.abspath(path).lstrip("/")
    if not stat.S_ISREG(st.st_mode):
        tar.dereference = follow
        info = tar.gettarinfo(path, arcname)
        if info is None:
            facts.skipped.append(f"{path}: a socket or other special file, not archived")
            return
        tar.addfile(info)
        facts.files.append(arcname)
        return
    with open(path, "rb") as stream:
        info = tar.gettarinfo(arcname=arcname, fileobj=stream)
        if info.islnk():  # a second name of a hard-linked file: a copy of its own (restore refuses links)
            info.type, info.linkname, info.size = tarfile.REGTYPE, "", os.fstat(stream.fileno()).st_size
        reader = _ExactReader(stream, info.size)
        tar.addfile(info, reader)
    if reader.padded:
        facts.skipped.append(f"{path}: shrank while read, padded with zeros")
    facts.files.append(arcname)


class _ExactReader:
    """Read exactly ``size`` bytes: cut what grows, pad what shrinks."""

    def __init__(self, stream: BinaryIO, size: int):
        self._stream = stream
        self._left = size
        self.padded = False

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._stream.read(n) if n else b""
        if len(data) < n:
            self.padded = True
            data += bytes(n - len(data))
        self._left -= len(data)
        return data


class _WriterFile:
    """The file object tarfile writes to, forwarding to a stream stage in large chunks."""

    def __init__(self, out: Writer):
        self._out = out
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        if len(self._buffer) >= CHUNK_SIZE:
            self._out.write(bytes(self._buffer))
            self._buffer.clear()
        return len(data)

    def close(self) -> None:
        if self._buffer:
            self._out.write(bytes(self._buffer))
            self._buffer.clear()

    def tell(self) -> int:
        return 0
