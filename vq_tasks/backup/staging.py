"""The staging area shared by all workers: BACKUP_STAGING_DIR/<backup id>/<component>.<execution>.part.

A dump task writes its part through a chain of stages (content hash, compression in parallel gzip
members, staged hash) into a hidden temporary file, renamed only when complete: a task killed
half way leaves no part that looks finished, and a redelivered task simply writes it again. Each
execution's part has a name of its own, so that one taken for dead that finishes late never
replaces the part another execution staged and recorded.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from vq_tasks.errors import PermanentError
from vq_tasks.manifest import BACKUP_ID, COMPONENTS, Component, Facts, StagedMember, StagedPart
from vq_tasks.settings import Settings
from vq_tasks.streams.compress import BlockStage, compression_stage
from vq_tasks.streams.stages import HashStage, ProgressStage, Stage, Writer

Producer = Callable[[Writer], Facts]
T = TypeVar("T")


class StagingArea:
    """The folder of one backup's parts."""

    def __init__(self, root: Path, backup_id: str):
        if not re.fullmatch(BACKUP_ID, backup_id):  # it becomes a folder that remove() deletes
            raise PermanentError(f"{backup_id!r} is not a backup id: no staging folder for it")
        self.root = root
        self.folder = root / backup_id

    def part_path(self, component: str, execution: str) -> Path:
        return self.folder / f"{component}.{execution}.part"

    def remove(self) -> None:
        """Remove this backup's folder and everything in it; harmless if already gone."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def ensure(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)


def stage_part(
    settings: Settings,
    area: StagingArea,
    component: Component,
    member: str,
    produce: Producer,
    progress: Callable[[int], object] | None = None,
    member_level: int | None = None,
    fence: Callable[[], None] = lambda: None,
) -> StagedPart:
    """Run ``produce`` into the chain for ``component`` and return the record of the staged part.

    ``member_level`` overrides the level of the wrapping gzip members or zstd frames (0 for data
    that is already compressed, such as config.tar.gz: stored). ``fence`` is called before the
    part replaces what is in place, and raises if this execution may no longer put it there."""
    began = time.monotonic()
    staged, facts = stage_member(settings, area, component, member, produce, progress, member_level, fence)
    return StagedPart(
        **staged.model_dump(),
        component=component,
        worker=socket.gethostname(),
        compression=settings.compression,
        facts=facts,
        duration_seconds=round(time.monotonic() - began, 3),
    )


def stage_member(
    settings: Settings,
    area: StagingArea,
    name: str,
    member: str,
    produce: Callable[[Writer], T],
    progress: Callable[[int], object] | None = None,
    member_level: int | None = None,
    fence: Callable[[], None] = lambda: None,
) -> tuple[StagedMember, T]:
    """Stage what ``produce`` writes as the bundle member ``member`` (in a part file named after
    ``name``); return its record and what ``produce`` returned. As stage_part."""
    execution = uuid.uuid4().hex[:8]
    final = area.part_path(name, execution)
    temporary = area.folder / f".{name}.{execution}.tmp"
    try:
        with _staging_errors(settings):
            area.ensure()
            sink = open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")  # noqa: SIM115
        try:
            staged = HashStage(_StagingFile(sink, settings), md5=False)
            compressed = _compression(settings, staged, member_level)
            content = HashStage(compressed, background=True)  # digests beside compression, not before
            head: Stage = ProgressStage(content, progress) if progress else content
            try:
                result = produce(head)
                head.close()
            except BaseException:
                content.abort()
                if isinstance(compressed, BlockStage):
                    compressed.abort()
                raise
            with _staging_errors(settings):
                sink.flush()
                os.fsync(sink.fileno())
                sink.close()
        finally:
            with contextlib.suppress(OSError):
                sink.close()  # after an error: the buffer is dropped with the temporary file
        fence()
        with _staging_errors(settings):
            os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    record = StagedMember(
        member=member,
        path=str(final),
        staged_size=staged.size,
        staged_sha256=staged.sha256,
        content=content.checksums(),
    )
    return record, result


class _StagingFile:
    """The staged file's write, whose OS errors (a full disk) are reported as the staging area's."""

    def __init__(self, stream: BinaryIO, settings: Settings):
        self._stream = stream
        self._settings = settings

    def write(self, data: bytes) -> None:
        with _staging_errors(self._settings):
            self._stream.write(data)


@contextlib.contextmanager
def _staging_errors(settings: Settings) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise PermanentError(f"staging area {settings.backup_staging_dir}: {reason}") from None


def _compression(settings: Settings, downstream: Writer, level: int | None) -> Writer:
    chosen = settings.effective_compression_level if level is None else level
    return compression_stage(downstream, settings.compression, chosen, settings.compression_threads)


def parts_by_component(records: list[dict], compression: str) -> dict[Component, StagedPart]:
    """Return the staged parts by component. Raise PermanentError if one is missing or was
    staged with another compression than this worker's (workers must agree)."""
    parts = {p.component: p for p in (StagedPart.model_validate(r) for r in records)}
    missing = [c for c in COMPONENTS if c not in parts]
    if missing:
        raise PermanentError(f"finalize got no record for {', '.join(missing)}")
    mixed = [f"{p.component} ({p.compression})" for p in parts.values() if p.compression != compression]
    if mixed:
        raise PermanentError(
            f"{', '.join(mixed)} staged with another compression than this worker's ({compression}): "
            "every worker must have the same COMPRESSION_ENABLED and COMPRESSION_ALGORITHM"
        )
    return parts


def check_staged_paths(parts: dict[Component, StagedPart], area: StagingArea) -> None:
    """Refuse records whose staged path is not this backup's staging folder: finalize copies the
    file a record names into the backup, so a forged record must not name /etc/shadow."""
    folder = area.folder.resolve()
    files = [(p, m) for p in parts.values() for m in [p, *p.extras]]
    outside = [m.member for p, m in files if Path(m.path).resolve().parent != folder]
    if outside:
        raise PermanentError(f"staged part(s) {', '.join(outside)} are not in {area.folder}: refused")
    unseen = [f"{m.member} (staged by {p.worker})" for p, m in files if not _seen(m)]
    if unseen:
        raise PermanentError(
            f"staged part(s) {', '.join(unseen)} are not in {area.folder} on {socket.gethostname()}: "
            "BACKUP_STAGING_DIR must be one folder that every worker shares (a shared volume or NFS)"
        )


def _seen(part: StagedMember) -> bool:
    """Whether this worker sees the staged file of ``part``, at the size it was staged with."""
    try:
        return os.stat(part.path).st_size == part.staged_size
    except OSError:
        return False
