"""Verify reads real backups made by the bundle and staging code, and names what is wrong with each."""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard

from vq_tasks.backup.bundle import BundleWriter, copy_staged
from vq_tasks.backup.staging import StagingArea, stage_part
from vq_tasks.catalog.latest import resolve_backup_id
from vq_tasks.cli.main import main
from vq_tasks.clients.rdb import CRC64
from vq_tasks.clients.sql_dump import SqlDumpInspector
from vq_tasks.crypto.signing import (
    detached_signature,
    load_signing_key,
    manifest_document,
    new_signing_key,
    public_key_text,
)
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import (
    BUNDLED,
    COMPONENTS,
    COMPRESSIONS,
    ComponentEntry,
    Compression,
    DatabaseFacts,
    Facts,
    Manifest,
    RedisFacts,
    StagedPart,
    StoredFile,
    bundle_name,
    manifest_name,
    member_name,
    signature_name,
)
from vq_tasks.restore.extract import extract_to
from vq_tasks.settings import Settings, load_settings
from vq_tasks.sources.files import archive_config, archive_logs
from vq_tasks.storage import open_storage
from vq_tasks.storage.base import StorageError
from vq_tasks.storage.local import LocalStorage
from vq_tasks.streams.compress import ZstdStage, compression_stage, gzip_member, zstd_frame
from vq_tasks.streams.readers import DamagedStream, GunzipReader, HashingReader, UnzstdReader
from vq_tasks.streams.stages import HashStage, Writer
from vq_tasks.verify.run import VerifyReport, verify_backup
from vq_tasks.verify.scan import names_check, probe_for, scan_archive

BACKUP_ID = "virtualqueue_backup_20240115_020000"
STARTED = datetime(2024, 1, 15, 2, tzinfo=UTC)
NOW = STARTED + timedelta(hours=1)
BROKER = {"celery_broker_url": "redis://127.0.0.1:1/0"}
PIECE = 100_000


def sql_dump(rows: int, closing: bool = True, name: bytes = b"ticket") -> bytes:
    """A plain dump as pg_dump writes it: header, one table's COPY data, and the closing line."""
    head = b"--\n-- PostgreSQL database dump\n--\n\n-- Dumped from database version 16.4\n"
    head += b"-- Dumped by pg_dump version 16.4\n\nCREATE TABLE public.tickets (id integer, name text);\n\n"
    head += b"--\n-- Data for Name: tickets; Type: TABLE DATA; Schema: public; Owner: postgres\n--\n\n"
    head += b"COPY public.tickets (id, name) FROM stdin;\n"
    data = b"".join(b"%d\t%s %d\n" % (i, name, i) for i in range(rows))
    tail = b"\\.\n\n\n" + (b"--\n-- PostgreSQL database dump complete\n--\n\n" if closing else b"")
    return head + data + tail


def rdb(size: int = 300_000, crc: int | None = None) -> bytes:
    """An RDB-shaped payload: header, body, EOF opcode and CRC64 (computed unless given)."""
    before_crc = b"REDIS0011" + random.Random(1).randbytes(size) + b"\xff"
    return before_crc + (CRC64.calc(before_crc) if crc is None else crc).to_bytes(8, "little")


@dataclass
class Backup:
    settings: Settings
    storage: LocalStorage
    parts: dict[str, StagedPart]
    manifest: Manifest

    def path(self, name: str) -> Path:
        return self.storage.root / name

    @property
    def bundle(self) -> Path:
        return self.path(bundle_name(BACKUP_ID, self.settings.compression))

    @property
    def logs(self) -> Path:
        return self.path(self.parts["logs"].member)

    def verify(self, now: datetime = NOW, backup_id: str = BACKUP_ID) -> VerifyReport:
        return verify_backup(self.storage, self.settings, backup_id, now=now)


def writing(data: bytes, facts: Facts) -> Callable[[Writer], Facts]:
    def produce(out: Writer) -> Facts:
        for i in range(0, len(data), PIECE):
            out.write(data[i : i + PIECE])
        return facts

    return produce


def stage(settings: Settings, component: str, produce, level: int | None = None) -> StagedPart:
    area = StagingArea(settings.backup_staging_dir, BACKUP_ID)
    member = member_name(component, BACKUP_ID, settings.compression)  # type: ignore[arg-type]
    return stage_part(settings, area, component, member, produce, member_level=level)  # type: ignore[arg-type]


def stage_database(settings: Settings, data: bytes) -> StagedPart:
    seen = SqlDumpInspector()
    seen.feed(data)
    facts = DatabaseFacts(
        database="vq", server_version="16.4", pg_dump_version="16.4", tables=seen.tables, complete=True
    )
    return stage(settings, "database", writing(data, facts))


def stage_redis(settings: Settings, data: bytes) -> StagedPart:
    facts = RedisFacts(redis_version="7.2.4", rdb_version=11, keys={"0": 3}, crc64_checked=True)
    return stage(settings, "redis", writing(data, facts))


def stage_config(settings: Settings, folder: Path) -> StagedPart:
    if settings.compression == "none":
        return stage(settings, "config", lambda out: archive_config([str(folder)], out))

    def produce(out: Writer) -> Facts:  # as the pipeline does: config.tar.gz, stored as is in the bundle
        inner = compression_stage(out, settings.compression, settings.effective_compression_level, 2)
        facts = archive_config([str(folder)], inner)
        inner.close()
        return facts

    return stage(settings, "config", produce, level=0)


def store(settings: Settings, parts: dict[str, StagedPart]) -> Manifest:
    """Store the bundle, the logs archive and, last, the manifest, as finalize does."""
    storage = open_storage(settings)
    compression = settings.compression

    def write_bundle(out: Writer) -> None:
        bundle = BundleWriter(out, compression, STARTED)
        for component in BUNDLED:
            bundle.add(parts[component])
        bundle.close()

    bundle = put(storage, bundle_name(BACKUP_ID, compression), write_bundle)
    logs = put(storage, parts["logs"].member, lambda out: copy_staged(parts["logs"], out))
    manifest = manifest_of(parts, bundle, logs, compression)
    write_manifest(storage, manifest)
    return manifest


def manifest_of(
    parts: dict[str, StagedPart], bundle: StoredFile, logs: StoredFile, compression: Compression, **extra
) -> Manifest:
    """The manifest finalize writes for ``parts`` stored as ``bundle`` and ``logs``."""
    return Manifest(
        backup_id=BACKUP_ID,
        kind="manual",
        started_at=STARTED,
        finished_at=STARTED + timedelta(minutes=1),
        duration_seconds=60.0,
        tool_version="test",
        compression=compression,
        files=[bundle, logs],
        components={
            c: ComponentEntry(
                member=parts[c].member,
                stored_in=bundle.name if c in BUNDLED else logs.name,
                content=parts[c].content,
                facts=parts[c].facts,
            )
            for c in COMPONENTS
        },
        **extra,
    )


def put(storage: LocalStorage, name: str, write: Callable[[Writer], None]) -> StoredFile:
    with storage.open_write(name) as out:
        hashed = HashStage(out)
        write(hashed)
    checks = hashed.checksums()
    return StoredFile(name=name, size=checks.size, md5=checks.md5, sha256=checks.sha256)


def write_manifest(storage: LocalStorage, manifest: Manifest) -> None:
    with storage.open_write(manifest_name(manifest.backup_id)) as out:
        out.write(manifest.model_dump_json(indent=2).encode())


def write_signed(storage: LocalStorage, manifest: Manifest, key, backup_id: str | None = None) -> None:
    """Store ``manifest`` signed by ``key`` as finalize does (its .sig first), under ``backup_id``
    (default its own: another one plants a copy of a signed manifest)."""
    backup_id = backup_id or manifest.backup_id
    document = manifest_document(manifest)
    with storage.open_write(signature_name(backup_id)) as out:
        out.write(detached_signature(document, key))
    with storage.open_write(manifest_name(backup_id)) as out:
        out.write(document)


def make_backup(tmp_path: Path, compression: Compression = "gzip", database: bytes | None = None) -> Backup:
    settings = load_settings(
        backup_staging_dir=tmp_path / "staging",
        backup_storage_path=str(tmp_path / "backups"),
        compression_enabled=compression != "none",
        compression_algorithm="gzip" if compression == "none" else compression,
        compression_threads=2,
        **BROKER,
    )
    config = tmp_path / "etc" / "vq"
    (config / "conf.d").mkdir(parents=True, exist_ok=True)
    (config / "app.yaml").write_text("queues: 3\n")
    (config / "conf.d" / "tls.conf").write_text("ciphers HIGH\n" * 100)
    logs = tmp_path / "log" / "vq"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "app.log").write_text("".join(f"line {i}\n" for i in range(50_000)))
    parts = {
        "database": stage_database(settings, database if database is not None else sql_dump(200_000)),
        "redis": stage_redis(settings, rdb()),
        "config": stage_config(settings, config),
        "logs": stage(settings, "logs", lambda out: archive_logs([str(logs)], out, 7)),
    }
    return Backup(settings, open_storage(settings), parts, store(settings, parts))


def checks_of(report: VerifyReport) -> dict[tuple[str, str], object]:
    """Every check by (file name or component, check name)."""
    found = {(f.name, c.check): c for f in report.files for c in f.checks}
    found.update({(c.component, check.check): check for c in report.components for check in c.checks})
    return found


def failed(report: VerifyReport) -> set[tuple[str, str]]:
    return {key for key, check in checks_of(report).items() if not check.ok}


def flip(path: Path, position: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_a_good_backup_passes_every_check(tmp_path, compression):
    backup = make_backup(tmp_path, compression)
    report = backup.verify()
    assert report.ok, failed(report)
    bundle, logs = backup.bundle.name, backup.logs.name
    expected = {
        (manifest_name(BACKUP_ID), "backup id"),
        (manifest_name(BACKUP_ID), "signature"),  # not checked: no BACKUP_SIGNING_PUBLIC_KEYS
        *((name, check) for name in (bundle, logs) for check in ("size", "md5", "sha256", "readable")),
        (bundle, "members"),
        *((c, check) for c in COMPONENTS for check in ("size", "md5", "sha256")),
        ("database", "complete"),
        ("database", "rows"),
        ("redis", "crc64"),
        ("config", "readable"),
        ("config", "files"),
        ("logs", "files"),
    }
    assert set(checks_of(report)) == expected
    assert checks_of(report)[("database", "rows")].expected == "tables: 1, rows: 200000"
    result = json.loads(json.dumps(report.model_dump(mode="json")))  # what the task returns
    assert result["ok"] is True and result["components"][0]["member"] == "database.sql"
    assert backup.verify(backup_id="latest").backup_id == BACKUP_ID


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_flipped_byte_in_the_compressed_bundle_is_a_mismatch(tmp_path, compression):
    backup = make_backup(tmp_path, compression)
    flip(backup.bundle, backup.bundle.stat().st_size // 2)
    report = backup.verify()
    name = backup.bundle.name
    assert not report.ok
    assert {(name, "md5"), (name, "sha256"), (name, "readable")} <= failed(report)
    assert (name, "size") not in failed(report)
    assert compression in checks_of(report)[(name, "readable")].actual
    assert {(backup.logs.name, "sha256"), ("logs", "sha256")}.isdisjoint(failed(report))


def test_a_flipped_byte_in_a_plain_bundle_names_the_member(tmp_path):
    backup = make_backup(tmp_path, "none")
    flip(backup.bundle, backup.bundle.read_bytes().index(b"ticket", 100_000))  # inside database.sql
    report = backup.verify()
    name = backup.bundle.name
    assert failed(report) == {(name, "md5"), (name, "sha256"), ("database", "md5"), ("database", "sha256")}


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_a_truncated_bundle_is_a_mismatch_with_the_reason(tmp_path, compression):
    backup = make_backup(tmp_path, compression)
    size = backup.bundle.stat().st_size
    with open(backup.bundle, "r+b") as f:
        f.truncate(size // 2)
    report = backup.verify()
    checks = checks_of(report)
    name = backup.bundle.name
    assert checks[(name, "size")].actual == str(size // 2) and checks[(name, "size")].expected == str(size)
    reason = checks[(name, "readable")].actual
    assert "truncated" in reason or "unexpected end of data" in reason, reason
    assert (name, "members") in failed(report)
    assert checks[("config", "present")].actual == "missing"  # the last member was cut off
    assert not checks[("config", "present")].ok
    assert not [t for t in threading.enumerate() if t.name.startswith("hash")]  # each reader's ended


def test_a_plain_bundle_without_its_end_blocks_is_unreadable(tmp_path):
    backup = make_backup(tmp_path, "none")
    size = backup.bundle.stat().st_size
    with open(backup.bundle, "r+b") as f:
        f.truncate(size - 1024)
    report = backup.verify()
    name = backup.bundle.name
    assert failed(report) == {(name, "size"), (name, "md5"), (name, "sha256"), (name, "readable")}
    assert "without its end blocks" in checks_of(report)[(name, "readable")].actual


def test_a_truncated_logs_archive_is_a_mismatch(tmp_path):
    backup = make_backup(tmp_path)
    data = backup.logs.read_bytes()
    backup.logs.write_bytes(data[: len(data) - 200])
    report = backup.verify()
    logs = backup.logs.name
    assert {(logs, "size"), (logs, "readable"), ("logs", "sha256")} <= failed(report)
    assert "truncated" in checks_of(report)[(logs, "readable")].actual
    assert all(c.ok for c in report.components if c.component != "logs")


def test_a_deleted_logs_file_fails_until_log_retention_would_have_removed_it(tmp_path):
    backup = make_backup(tmp_path)
    backup.logs.unlink()
    report = backup.verify()
    logs = backup.logs.name
    assert failed(report) == {(logs, "present"), ("logs", "present")}
    assert checks_of(report)[("logs", "present")].actual == f"{logs} is missing"

    later = backup.verify(now=STARTED + timedelta(days=8))  # BACKUP_LOGS_RETENTION_DAYS is 7
    assert later.ok
    assert "removed by log retention" in checks_of(later)[(logs, "present")].actual


def test_a_bundle_remade_with_another_database_sql(tmp_path):
    backup = make_backup(tmp_path)
    other = sql_dump(200_000, name=b"tickex")  # same size, other bytes: a valid bundle all the same
    parts = {**backup.parts, "database": stage_database(backup.settings, other)}
    store(backup.settings, parts)
    write_manifest(backup.storage, backup.manifest)  # the manifest of the original backup
    report = backup.verify()
    name = backup.bundle.name
    resized = {(name, "size")} if backup.bundle.stat().st_size != backup.manifest.files[0].size else set()
    expected = {(name, "md5"), (name, "sha256"), ("database", "md5"), ("database", "sha256")}
    assert failed(report) == expected | resized
    assert checks_of(report)[(name, "readable")].ok and checks_of(report)[("database", "complete")].ok


def test_a_dump_without_pg_dumps_closing_line_fails_even_with_matching_checksums(tmp_path):
    backup = make_backup(tmp_path, database=sql_dump(1000, closing=False))
    report = backup.verify()
    assert failed(report) == {("database", "complete")}
    assert checks_of(report)[("database", "complete")].actual == "missing: the dump is incomplete"


def test_a_damaged_rdb_fails_its_crc64_even_with_matching_checksums(tmp_path):
    backup = make_backup(tmp_path)
    parts = {**backup.parts, "redis": stage_redis(backup.settings, rdb(crc=12345))}
    store(backup.settings, parts)
    report = backup.verify()
    assert failed(report) == {("redis", "crc64")}
    assert "checksum mismatch" in checks_of(report)[("redis", "crc64")].actual
    assert "retry" not in checks_of(report)[("redis", "crc64")].actual


def test_a_member_missing_from_the_bundle(tmp_path):
    backup = make_backup(tmp_path)
    parts = dict(backup.parts)
    bundle = put(backup.storage, backup.bundle.name, lambda out: _bundle_without_redis(out, parts))
    write_manifest(
        backup.storage, backup.manifest.model_copy(update={"files": [bundle, backup.manifest.files[1]]})
    )
    report = backup.verify()
    assert failed(report) == {(backup.bundle.name, "members"), ("redis", "present")}
    assert "missing: redis.rdb" in checks_of(report)[(backup.bundle.name, "members")].actual


def _bundle_without_redis(out: Writer, parts: dict[str, StagedPart]) -> None:
    writer = BundleWriter(out, "gzip", STARTED)
    writer.add(parts["database"])
    writer.add(parts["config"])
    writer.close()


def test_a_manifest_naming_a_file_outside_the_backup_is_not_read(tmp_path):
    backup = make_backup(tmp_path)
    bad = "virtualqueue_backup_20240114_020000.tar.gz"  # another backup's (a path: test_hostile_input)
    (backup.storage.root / bad).write_bytes(b"not to be read")
    files = [backup.manifest.files[0].model_copy(update={"name": bad}), backup.manifest.files[1]]
    components = {
        n: e.model_copy(update={"stored_in": bad}) if n in BUNDLED else e
        for n, e in backup.manifest.components.items()
    }
    write_manifest(
        backup.storage, backup.manifest.model_copy(update={"files": files, "components": components})
    )
    report = backup.verify()
    assert failed(report) == {
        (bad, "name"),
        ("database", "present"),
        ("redis", "present"),
        ("config", "present"),
    }
    assert checks_of(report)[("database", "present")].actual == "not read"


def test_a_component_in_a_file_the_manifest_does_not_list(tmp_path):
    backup = make_backup(tmp_path)
    write_manifest(backup.storage, backup.manifest.model_copy(update={"files": backup.manifest.files[1:]}))
    report = backup.verify()
    assert failed(report) == {("database", "present"), ("redis", "present"), ("config", "present")}
    assert checks_of(report)[("redis", "present")].actual.endswith("is not among the manifest's files")


@pytest.mark.parametrize(
    "backup_id",
    ["../etc/passwd", f"{BACKUP_ID}/../../etc", f"../{BACKUP_ID}", "", "virtualqueue_backup_2024"],
)
def test_malformed_ids_are_refused(tmp_path, backup_id):
    backup = make_backup(tmp_path)
    with pytest.raises(PermanentError, match="is not a backup id"):
        backup.verify(backup_id=backup_id)


def test_unknown_backup_and_empty_storage_are_refused(tmp_path):
    backup = make_backup(tmp_path)
    with pytest.raises(PermanentError, match="no complete backup virtualqueue_backup_20240116_020000"):
        backup.verify(backup_id="virtualqueue_backup_20240116_020000")
    empty = LocalStorage(tmp_path / "empty")
    with pytest.raises(PermanentError, match="no complete backup in"):
        verify_backup(empty, backup.settings, "latest")


def test_latest_is_the_newest_complete_backup(tmp_path):
    backup = make_backup(tmp_path)
    newer = "virtualqueue_backup_20240116_020000"
    (backup.storage.root / f"{newer}.tar.gz").write_bytes(b"no manifest: not a backup yet")
    assert backup.verify(backup_id="latest").backup_id == BACKUP_ID


def test_a_restores_latest_passes_over_newer_manifests_it_cannot_trust(tmp_path, caplog):
    """With signing keys, a forged (unsigned) newest manifest, or a signed one copied under a newer
    id, must not stand in the way of `restore latest`; a drill and verify still take the newest,
    which then fails them loudly."""
    backup = make_backup(tmp_path)
    key = tmp_path / "signing.pem"
    public = new_signing_key(key)
    write_signed(backup.storage, backup.manifest, load_signing_key(key))
    newer = "virtualqueue_backup_20240116_020000"
    write_manifest(backup.storage, backup.manifest.model_copy(update={"backup_id": newer}))
    keyed = backup.settings.model_copy(update={"backup_signing_public_keys": [public_key_text(public)]})
    assert resolve_backup_id(backup.storage, keyed, "latest") == newer  # a drill, verify: the newest
    assert resolve_backup_id(backup.storage, keyed, "latest", restorable=True) == BACKUP_ID
    assert f"{newer} is not taken for the latest backup: " in caplog.text
    assert "manifest signature unsigned" in caplog.text
    # without keys too: the forged manifest names the other backup's files as its own
    assert resolve_backup_id(backup.storage, backup.settings, "latest", restorable=True) == BACKUP_ID
    assert f"is not a data file of {newer}" in caplog.text
    write_signed(backup.storage, backup.manifest, load_signing_key(key), newer)  # a signed one, copied
    assert resolve_backup_id(backup.storage, keyed, "latest", restorable=True) == BACKUP_ID
    assert f"it names backup {BACKUP_ID!r}, not {newer}" in caplog.text
    write_manifest(backup.storage, backup.manifest)  # now no manifest is signed
    with pytest.raises(PermanentError, match="no complete backup with a trusted manifest"):
        resolve_backup_id(backup.storage, keyed, "latest", restorable=True)


def test_a_storage_error_that_may_pass_is_raised_not_taken_for_an_untrusted_manifest(tmp_path):
    """A blip while reading the newest manifest must not make `restore latest` pick an older one."""
    backup = make_backup(tmp_path)
    newer = "virtualqueue_backup_20240116_020000"
    write_manifest(backup.storage, backup.manifest.model_copy(update={"backup_id": newer}))

    class Blipping(LocalStorage):
        def read_bytes(self, name: str) -> bytes:
            if name == manifest_name(newer):
                raise StorageError("the connection was reset", transient=True)
            return super().read_bytes(name)

    with pytest.raises(StorageError, match="connection was reset"):
        resolve_backup_id(Blipping(backup.storage.root), backup.settings, "latest", restorable=True)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_memory_stays_bounded_whatever_the_size(tmp_path, compression):
    backup = make_backup(tmp_path, compression, database=sql_dump(3_000_000))  # ~65 MB of SQL
    assert backup.manifest.components["database"].content.size > 60 << 20
    components = backup.manifest.components.items()
    probes = {e.member: probe_for(n, e, compression) for n, e in components if n != "logs"}
    tracemalloc.start()  # the bundle's scan: load_manifest's read_bytes alone allocates 16 MiB
    try:
        with open(backup.bundle, "rb") as stream:
            scan = scan_archive(stream, compression, probes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scan.error is None and all(c.ok for p in probes.values() for c in p.checks())
    assert peak < 10 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_gunzip_reader_reads_concatenated_members_and_refuses_damage():
    data = random.Random(2).randbytes(3_000_000)
    stream = b"".join(gzip_member(data[i : i + 700_000], 6) for i in range(0, len(data), 700_000))
    reader = GunzipReader(HashingReader(io.BytesIO(stream)))
    pieces = []
    while piece := reader.read(10_240):
        assert len(piece) <= 10_240
        pieces.append(piece)
    assert b"".join(pieces) == data
    assert gzip.decompress(stream) == data
    for damaged in (stream[:-3], stream + b"garbage", b"not gzip at all"):
        with pytest.raises(DamagedStream):
            GunzipReader(HashingReader(io.BytesIO(damaged))).read()


def test_unzstd_reader_reads_concatenated_frames_and_refuses_damage():
    data = random.Random(2).randbytes(1_000_000) + b"SELECT 1;\n" * 300_000
    out = io.BytesIO()
    stage = ZstdStage(out, 3, 2, block_size=700_000)
    for i in range(0, len(data), 100_000):
        stage.write(data[i : i + 100_000])
    stage.close()
    stream = out.getvalue() + zstd_frame(b"", 3) + zstd_frame(b"end", 0)  # frames concatenate
    reader = UnzstdReader(HashingReader(io.BytesIO(stream)))
    pieces = []
    while piece := reader.read(10_240):
        assert len(piece) <= 10_240
        pieces.append(piece)
    assert b"".join(pieces) == data + b"end"
    damaged = bytearray(stream)
    damaged[len(stream) // 2] ^= 0x40
    unsized = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    unsized_frame = unsized.compress(b"x" * 1000) + unsized.flush()
    for bad, reason in (
        (stream[:-3], "truncated"),
        (stream + b"garbage", "not a zstd frame header"),
        (b"not zstd at all at all", "not a zstd frame header"),
        (bytes(damaged), "damaged zstd data"),
        (unsized_frame, "does not say its size"),
    ):
        with pytest.raises(DamagedStream, match=reason):
            UnzstdReader(HashingReader(io.BytesIO(bad))).read()


def test_a_damaged_zstd_frame_is_refused_naming_the_file(tmp_path):
    backup = make_backup(tmp_path, "zstd")
    flip(backup.bundle, backup.bundle.stat().st_size // 2)
    with pytest.raises(PermanentError, match=rf"{backup.bundle.name} cannot be read to its end: .*zstd"):
        extract_to(backup.storage, backup.manifest, {"database": tmp_path / "db.sql"})
    assert not (tmp_path / "db.sql").exists()
    readable = checks_of(backup.verify())[(backup.bundle.name, "readable")]
    assert not readable.ok and readable.expected == "zstd and tar read to the end", readable


def test_an_old_gzip_backup_verifies_with_zstd_settings(tmp_path):
    backup = make_backup(tmp_path, "gzip")
    settings = backup.settings.model_copy(update={"compression_algorithm": "zstd"})
    assert verify_backup(backup.storage, settings, BACKUP_ID, now=NOW).ok


def test_zstd_stage_keeps_a_fixed_number_of_blocks_in_flight():
    sizes: list[int] = []

    class Counting:
        def write(self, data: bytes) -> None:
            sizes.append(len(data))

    data = random.Random(3).randbytes(40 << 20)
    tracemalloc.start()
    try:
        stage = ZstdStage(Counting(), 3, 2)
        for i in range(0, len(data), 1 << 20):
            stage.write(data[i : i + (1 << 20)])
        stage.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sizes) == 40 and peak < 12 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_cli_prints_a_table_and_exits_1_on_a_mismatch(tmp_path, monkeypatch, capsys):
    backup = make_backup(tmp_path)
    monkeypatch.setenv("BACKUP_STORAGE_PATH", str(backup.storage.root))
    monkeypatch.setenv("CELERY_BROKER_URL", BROKER["celery_broker_url"])
    assert main(["verify", "latest"]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and f"{BACKUP_ID}: all OK" in out
    flip(backup.bundle, backup.bundle.stat().st_size // 2)
    assert main(["verify", BACKUP_ID]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(backup.bundle.name in line and "sha256" in line and "MISMATCH" in line for line in lines)
    assert main(["verify", "../../etc/passwd"]) == 1
    assert "is not a backup id" in capsys.readouterr().err


def test_an_archive_of_more_entries_than_expected_keeps_only_that_many_names():
    """A forged archive of many entries: past the expected number the names are not kept (memory),
    and the one line saying so fails the names check."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(5000):
            tar.addfile(tarfile.TarInfo(f"f{i}"), io.BytesIO(b""))
    buffer.seek(0)
    scan = scan_archive(buffer, "none", max_names=11)
    assert scan.error is None and len(scan.members) == 12
    assert scan.members[-1] == "(more than 11 entries, the rest not listed)"
    check = names_check("files", [f"f{i}" for i in range(11)], scan.members)
    assert not check.ok and "unexpected: (more than 11 entries" in check.actual
