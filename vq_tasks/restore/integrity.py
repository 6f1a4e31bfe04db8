"""Checks after a restore: each returns IntegrityCheck rows, with ``ok`` per check.

Rows per table against the manifest, Redis keys per database against what the restore put there
(and the manifest's count, reported), files with their content, mode and link targets against the
archive, and the application's health URL (a 2xx answer within 10 s). A check that cannot run is
a failed check, never an exception: the restore it follows is done either way.
"""

from __future__ import annotations

import base64
import http.client
import stat
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redis
from pydantic import BaseModel, computed_field

from vq_tasks.errors import BackupError
from vq_tasks.restore.files import changed_files
from vq_tasks.restore.redis import RedisRestoreResult
from vq_tasks.streams.readers import open_tar_stream

HEALTH_TIMEOUT = 10.0
SHOWN = 5


class IntegrityCheck(BaseModel):
    check: str
    expected: str
    actual: str
    ok: bool
    note: str = ""


class IntegrityReport(BaseModel):
    checks: list[IntegrityCheck]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def guarded(name: str, run: Callable[[], list[IntegrityCheck]]) -> list[IntegrityCheck]:
    """Return ``run()``'s checks, or one failed check ``name`` saying why they could not run."""
    try:
        return run()
    except (BackupError, OSError, redis.RedisError) as exc:
        return [IntegrityCheck(check=name, expected="checked", actual=f"could not check: {exc}", ok=False)]


def rows_check(expected: dict[str, int], actual: dict[str, int]) -> IntegrityCheck:
    """Return the check that the database holds the manifest's tables with its rows."""

    def summary(tables: dict[str, int]) -> str:
        return f"tables: {len(tables)}, rows: {sum(tables.values())}"

    differ = [
        f"{t}: {actual.get(t, 'absent')} (backup: {expected.get(t, 'absent')})"
        for t in sorted(expected.keys() | actual.keys())
        if expected.get(t) != actual.get(t)
    ]
    shown = summary(actual) if not differ else "; ".join(differ[:SHOWN]) + _more(differ)
    return IntegrityCheck(check="database rows", expected=summary(expected), actual=shown, ok=not differ)


def keys_checks(
    result: RedisRestoreResult, backup_keys: dict[str, int], now: dict[str, int]
) -> list[IntegrityCheck]:
    """Return the check that the target holds, per database, the keys the restore put there, and
    (reported, never failed) how that compares with the manifest's count taken before the snapshot."""
    put = {db: n for db, n in result.restored.items() if n}
    now = {db: n for db, n in now.items() if n}
    note = "INFO keyspace just before the snapshot; keys expired since the backup are not restored"
    expired = sum(result.expired.values())
    return [
        IntegrityCheck(check="redis keys", expected=_per_db(put), actual=_per_db(now), ok=put == now),
        IntegrityCheck(
            check="redis keys vs manifest",
            expected=_per_db(backup_keys),
            actual=_per_db(now) + (f" ({expired} expired before the copy)" if expired else ""),
            ok=True,
            note=note if backup_keys != now else "",
        ),
    ]


def _per_db(keys: dict[str, int]) -> str:
    return ", ".join(f"db{db}={n}" for db, n in sorted(keys.items(), key=lambda kv: int(kv[0]))) or "empty"


def _more(items: list[str]) -> str:
    return f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""


def files_check(name: str, archive: Path, target: Path) -> IntegrityCheck:
    """Return the check that every entry of ``archive`` is under ``target`` with its content, mode
    and link target."""
    differ = changed_files(archive, target) + mode_differences(archive, target)
    actual = "all match" if not differ else "; ".join(differ[:SHOWN]) + _more(differ)
    return IntegrityCheck(
        check=name, expected=f"as in the backup, under {target}", actual=actual, ok=not differ
    )


def mode_differences(archive: Path, target: Path) -> list[str]:
    """Return the entries of ``archive`` whose copy under ``target`` has another mode, kind or
    link target (a missing one is changed_files's to report, if a regular file)."""
    found = []
    with open_tar_stream(archive) as tar:
        for member in tar:
            path = target / member.name
            try:
                st = path.lstat()
            except FileNotFoundError:
                found += [] if member.isfile() else [f"{path}: missing"]
                continue
            if member.issym():
                if not stat.S_ISLNK(st.st_mode) or str(path.readlink()) != member.linkname:
                    found.append(f"{path}: not a link to {member.linkname}")
            elif stat.S_IMODE(st.st_mode) != member.mode & 0o7777:
                found.append(f"{path}: mode {stat.S_IMODE(st.st_mode):o}, backup {member.mode & 0o7777:o}")
    return found


def shown_url(url: str) -> str:
    """Return ``url`` without credentials, query or fragment, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{netloc}{parts.path}"


def health_check(url: str, timeout: float = HEALTH_TIMEOUT) -> IntegrityCheck:
    """GET ``url`` (credentials in it sent as basic auth); return a check that passes on a 2xx
    answer within ``timeout`` seconds."""
    try:
        shown = shown_url(url)
    except ValueError:
        shown = "APP_HEALTHCHECK_URL"
    try:
        with urllib.request.urlopen(_request(url), timeout=timeout) as answer:
            status = answer.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return IntegrityCheck(
            check="app health", expected=f"2xx from {shown}", actual=f"no answer: {reason}", ok=False
        )
    return IntegrityCheck(
        check="app health", expected=f"2xx from {shown}", actual=f"HTTP {status}", ok=200 <= status < 300
    )


def _request(url: str) -> urllib.request.Request:
    """Return a GET of ``url`` without its user and password, sent as basic auth instead."""
    parts = urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url)
    netloc = parts.netloc.rsplit("@", 1)[1]
    request = urllib.request.Request(parts._replace(netloc=netloc).geturl())
    login = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    # unredirected: a redirect, maybe to another host, must not carry the password along
    request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    return request
