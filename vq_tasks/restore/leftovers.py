"""What a restore or drill leaves behind if it is killed (SIGKILL, the OOM killer, a lost machine),
and how the next one finds and removes it.

A killed process runs no cleanup, so everything it creates says whether its owner still lives:
- child processes (the throwaway redis-server, psql) get SIGKILL from Linux when the thread that
  started them ends (``die_with_parent``);
- work folders hold an flock on themselves for as long as their owner's process is alive; the kernel
  drops it when the process dies, so a folder whose lock can be taken is abandoned
  (``owned_folder``, ``remove_abandoned``). A folder is locked before it gets its final name, so no
  cleaner ever sees one of a living owner unlocked; a claiming folder (empty, between its creation
  and its lock) is removed only once it is older than CLAIM_GRACE. flock is per host: share a work folder only
  between workers of one machine (a local or Docker volume; on NFS it depends on the mount).
- scratch databases are held by a PostgreSQL advisory lock (restore/postgres_swap.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

CLAIMING = ".claiming"  # a folder being locked, before its final name; abandoned only after CLAIM_GRACE
CLAIM_GRACE = 60.0  # seconds after which an unlocked claiming folder is one of a killed process
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def die_with_parent() -> Callable[[], None]:
    """Return a ``preexec_fn`` for subprocess.Popen that has Linux SIGKILL the child when the thread
    that starts it ends, as when this process is killed; elsewhere it does nothing."""
    parent = os.getpid()

    def preexec() -> None:
        if _prctl is None:
            return
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


@contextlib.contextmanager
def owned_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """Remove the abandoned ``prefix*`` folders under ``parent``, then yield a new private folder
    (mode 700) named ``prefix`` and a random part, locked for as long as the block runs, and removed
    with all it holds however the block ends."""
    remove_abandoned(parent, prefix)
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    claiming = Path(tempfile.mkdtemp(prefix=CLAIMING + prefix, dir=parent))
    lock = _lock(claiming, blocking=True)
    try:
        folder = parent / (prefix + claiming.name.removeprefix(CLAIMING + prefix))
        os.rename(claiming, folder)
    except BaseException:
        shutil.rmtree(claiming, ignore_errors=True)
        os.close(lock)
        raise
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)


def remove_abandoned(parent: Path, prefix: str) -> list[str]:
    """Remove the ``prefix*`` folders under ``parent`` whose owner is gone (their lock is free);
    return their names. Folders of living owners, and anything else, stay."""
    removed = []
    for folder in sorted(parent.glob(glob.escape(prefix) + "*")) if parent.is_dir() else []:
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            lock = _lock(folder, blocking=False)
        except (BlockingIOError, OSError):
            continue  # its owner runs (or it went away meanwhile)
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(lock)
        removed.append(folder.name)
        logger.warning("removed %s, left by a run that was killed", folder)
    return removed + _remove_stale_claims(parent, prefix)


def _remove_stale_claims(parent: Path, prefix: str) -> list[str]:
    """Remove the claiming folders of ``prefix`` older than CLAIM_GRACE whose lock is free (their
    process was killed between creating and locking one, milliseconds); return their names. Such a
    folder is empty: one holding anything stays."""
    removed = []
    cutoff = time.time() - CLAIM_GRACE
    for folder in sorted(parent.glob(glob.escape(CLAIMING + prefix) + "*")) if parent.is_dir() else []:
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_mtime > cutoff:
                continue
            lock = _lock(folder, blocking=False)
        except OSError:  # held (BlockingIOError), or gone meanwhile
            continue
        try:
            os.rmdir(folder)
        except OSError:
            continue
        finally:
            os.close(lock)
        removed.append(folder.name)
        logger.warning("removed %s, left by a run killed as it began", folder)
    return removed


def _lock(folder: Path, blocking: bool) -> int:
    """Open ``folder`` and take an exclusive flock on it; return the descriptor that holds it.
    Raise BlockingIOError if not ``blocking`` and another process holds it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd
