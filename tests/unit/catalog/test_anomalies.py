"""A complete backup that is wrong is noticed: drops beyond the thresholds (tables gone or emptied,
rows, Redis keys, config files, component sizes) against the good backups before it, said plainly;
growth, small tables and the first backups are not; suspicious backups leave the window unless
accepted, and an acceptance counts only for its own manifest and, with trusted keys, signed."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from vq_tasks.catalog.acceptance import Acceptance, manifest_digest, read_acceptance, signed
from vq_tasks.catalog.anomalies import Thresholds, find_anomalies, good_window
from vq_tasks.crypto.signing import key_id, load_signing_key, manifest_document, new_signing_key
from vq_tasks.manifest import (
    Anomaly,
    Checksums,
    ComponentEntry,
    DatabaseFacts,
    FilesFacts,
    Manifest,
    RedisFacts,
    StoredFile,
    acceptance_name,
    manifest_name,
    new_backup_id,
)
from vq_tasks.settings import load_settings
from vq_tasks.storage.local import LocalStorage

PREFIX = "virtualqueue_backup"
START = datetime(2026, 1, 1, 2, tzinfo=UTC)
TABLES = {"public.queue_entries": 1_204_331, "public.queues": 40, "public.customers": 52_000}
KEYS = {"0": 50_000, "1": 12}
FILES = ["etc/virtualqueue/app.yaml", "etc/virtualqueue/conf.d/tls.conf"]


def entry(member: str, size: int, facts) -> ComponentEntry:
    digest = hashlib.sha256(member.encode()).hexdigest()
    return ComponentEntry(
        member=member,
        stored_in="x.tar.gz",
        content=Checksums(size=size, md5=digest[:32], sha256=digest),
        facts=facts,
    )


def components(tables=TABLES, keys=KEYS, files=FILES, db_size=900 << 20, rdb_size=40 << 20):
    return {
        "database": entry("database.sql", db_size, DatabaseFacts(
            database="vq", server_version="15", pg_dump_version="15", tables=dict(tables), complete=True
        )),
        "redis": entry("redis.rdb", rdb_size, RedisFacts(
            redis_version="7.0", rdb_version=10, keys=dict(keys), crc64_checked=True
        )),
        "config": entry("config.tar.gz", 2 << 20, FilesFacts(roots=["/etc/virtualqueue"], files=list(files))),
    }  # fmt: skip


def manifest(day: int, anomalies: list[Anomaly] | None = None, **changes) -> Manifest:
    started = START + timedelta(days=day)
    stored = StoredFile(name="x.tar.gz", md5="0" * 32, sha256="0" * 64, size=1)
    return Manifest(
        backup_id=new_backup_id(PREFIX, started), kind="daily", started_at=started, finished_at=started,
        duration_seconds=1.0, tool_version="test", compression="gzip", files=[stored],
        components=components(**changes), anomalies=anomalies or [],
    )  # fmt: skip


def texts(found: list[Anomaly]) -> list[str]:
    return [a.text for a in found]


WINDOW = [manifest(day) for day in (6, 5, 4, 3, 2, 1, 0)]


def test_the_first_backups_and_growth_are_never_anomalies():
    assert find_anomalies(components(), [], Thresholds()) == []
    grown = {t: rows * 3 for t, rows in TABLES.items()} | {"public.new": 5}
    assert find_anomalies(components(tables=grown, keys={"0": 90_000, "1": 12}), WINDOW, Thresholds()) == []


def test_an_emptied_table_is_said_plainly_with_the_rows_in_all():
    emptied = {**TABLES, "public.queue_entries": 12}
    found = find_anomalies(components(tables=emptied), WINDOW, Thresholds())
    assert texts(found) == [
        "table public.queue_entries: 1,204,331 → 12 rows",
        "rows in all tables: 1,256,371 → 52,052",
    ]
    assert (found[0].kind, found[0].subject, found[0].before, found[0].after) == (
        "table_rows", "public.queue_entries", 1_204_331, 12
    )  # fmt: skip


def test_a_table_gone_counts_whatever_its_size_but_small_tables_shrinking_do_not():
    fewer = {"public.queue_entries": 1_204_331, "public.customers": 52_000}
    assert texts(find_anomalies(components(tables=fewer), WINDOW, Thresholds())) == [
        "table public.queues: gone (had 40 rows)"
    ]
    shrunk = {**TABLES, "public.queues": 3}  # 40 rows: below BACKUP_ANOMALY_MIN_ROWS
    assert find_anomalies(components(tables=shrunk), WINDOW, Thresholds()) == []
    assert find_anomalies(components(tables=fewer), WINDOW, Thresholds(table_gone=False)) == []


def test_a_flushed_redis_database_config_files_gone_and_a_smaller_dump():
    found = find_anomalies(
        components(keys={"1": 12}, files=FILES[:1], db_size=100 << 20), WINDOW, Thresholds()
    )
    assert texts(found) == [
        "redis db0: 50,000 → 0 keys",
        "redis keys in all databases: 50,012 → 12",
        "config file etc/virtualqueue/conf.d/tls.conf: gone",
        "database.sql: 900.0 MiB → 100.0 MiB",
    ]


def test_every_threshold_is_a_setting():
    fewer = {**TABLES, "public.queue_entries": 700_000}  # down 41.9%
    assert find_anomalies(components(tables=fewer), WINDOW, Thresholds()) == []
    assert texts(find_anomalies(components(tables=fewer), WINDOW, Thresholds(table_drop=40))) == [
        "table public.queue_entries: 1,204,331 → 700,000 rows"
    ]
    settings = load_settings(celery_broker_url="redis://x/0", backup_anomaly_table_drop_percent=40)
    assert Thresholds.of(settings).table_drop == 40


def test_one_odd_backup_in_the_window_does_not_move_the_baseline():
    odd = [manifest(6, tables={**TABLES, "public.queue_entries": 10}), *WINDOW[1:]]
    assert find_anomalies(components(), odd, Thresholds()) == []


@pytest.fixture
def store(tmp_path):
    return LocalStorage(tmp_path / "backups")


def put(storage: LocalStorage, m: Manifest) -> None:
    with storage.open_write(manifest_name(m.backup_id)) as out:
        out.write(manifest_document(m))


def settings_for(storage: LocalStorage, **values):
    return load_settings(celery_broker_url="redis://x/0", backup_storage_path=str(storage.root), **values)


def test_the_window_holds_the_newest_good_backups_before_this_one(store):
    suspicious = Anomaly(kind="total_rows", subject="all tables", before=10, after=1, text="rows: 10 → 1")
    backups = [manifest(day) for day in range(5)] + [manifest(5, [suspicious]), manifest(6)]
    for m in backups:
        put(store, m)
    settings = settings_for(store, backup_anomaly_window=3)
    window = good_window(store, settings, backups[6].started_at)
    assert [m.backup_id for m in window] == [backups[4].backup_id, backups[3].backup_id, backups[2].backup_id]


def test_an_accepted_suspicious_backup_is_good_only_for_its_own_manifest_and_signed_when_keys_are_set(
    store, tmp_path
):
    suspicious = Anomaly(kind="total_rows", subject="all tables", before=10, after=1, text="rows: 10 → 1")
    accepted = manifest(1, [suspicious])
    put(store, accepted)
    stored = store.read_bytes(manifest_name(accepted.backup_id))
    read_back = Manifest.model_validate_json(stored).as_stored(stored, None)
    record = Acceptance(
        backup_id=accepted.backup_id, accepted_at=START, by="cli:ops", reason="planned cleanup",
        manifest_sha256=manifest_digest(read_back),
    )  # fmt: skip
    with store.open_write(acceptance_name(accepted.backup_id)) as out:
        out.write(record.model_dump_json().encode())
    assert read_acceptance(store, read_back, {}) == record
    assert [m.backup_id for m in good_window(store, settings_for(store), START + timedelta(days=9))] == [
        accepted.backup_id
    ]

    other = record.model_copy(update={"manifest_sha256": "f" * 64})
    with store.open_write(acceptance_name(accepted.backup_id)) as out:
        out.write(other.model_dump_json().encode())
    assert read_acceptance(store, read_back, {}) is None  # another manifest's

    key_file = tmp_path / "signing.pem"
    public = new_signing_key(key_file)
    keys = {key_id(public): public}
    with store.open_write(acceptance_name(accepted.backup_id)) as out:
        out.write(record.model_dump_json().encode())
    assert read_acceptance(store, read_back, keys) is None  # unsigned, with keys trusted
    with store.open_write(acceptance_name(accepted.backup_id)) as out:
        out.write(signed(record, load_signing_key(key_file)).model_dump_json().encode())
    assert read_acceptance(store, read_back, keys) is not None


def test_an_accepted_backup_ends_the_window_so_the_next_one_in_the_same_state_is_good(store):
    """Accepting a big cleanup makes it the new normal: the backups before it no longer count."""
    emptied = {**TABLES, "public.queue_entries": 12}
    older = [manifest(day) for day in range(4)]
    drop = Anomaly(kind="table_rows", subject="public.queue_entries", before=1_204_331, after=12, text="x")
    accepted = manifest(4, [drop], tables=emptied)
    for m in [*older, accepted]:
        put(store, m)
    stored = store.read_bytes(manifest_name(accepted.backup_id))
    record = Acceptance(
        backup_id=accepted.backup_id, accepted_at=START, by="cli:ops", reason="planned cleanup",
        manifest_sha256=manifest_digest(Manifest.model_validate_json(stored).as_stored(stored, None)),
    )  # fmt: skip
    with store.open_write(acceptance_name(accepted.backup_id)) as out:
        out.write(record.model_dump_json().encode())
    window = good_window(store, settings_for(store), START + timedelta(days=5))
    assert [m.backup_id for m in window] == [accepted.backup_id]
    assert find_anomalies(components(tables=emptied), window, Thresholds()) == []


def test_a_median_of_two_is_their_mean():
    pair = [manifest(1, tables={**TABLES, "public.queue_entries": 2_000}), manifest(0)]
    found = find_anomalies(components(tables={**TABLES, "public.queue_entries": 1_500}), pair, Thresholds())
    assert "table public.queue_entries: 603,165 → 1,500 rows" in texts(found)
