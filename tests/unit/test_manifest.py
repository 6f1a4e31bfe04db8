"""Backup ids, object names and backup kinds."""

from datetime import UTC, datetime

import pytest

from vq_tasks.manifest import kind_for, new_backup_id, parse_backup_id, split_object_name

P = "virtualqueue_backup"


def test_id_round_trip_in_utc():
    from zoneinfo import ZoneInfo

    local = datetime(2024, 1, 15, 3, 0, 0, tzinfo=ZoneInfo("Europe/Paris"))
    backup_id = new_backup_id(P, local)
    assert backup_id == "virtualqueue_backup_20240115_020000"
    assert parse_backup_id(backup_id, P) == datetime(2024, 1, 15, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    "bad", ["virtualqueue_backup_2024", "../virtualqueue_backup_20240115_020000", "x", ""]
)
def test_bad_ids_are_refused(bad):
    with pytest.raises(ValueError, match="not a backup id"):
        parse_backup_id(bad, P)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("virtualqueue_backup_20240115_020000.tar.gz", ("virtualqueue_backup_20240115_020000", "bundle")),
        (
            "virtualqueue_backup_20240115_020000_logs.tar.gz",
            ("virtualqueue_backup_20240115_020000", "logs"),
        ),
        (
            "virtualqueue_backup_20240115_020000_manifest.json",
            ("virtualqueue_backup_20240115_020000", "manifest"),
        ),
        ("virtualqueue_backup_20240115_020000.zip", None),
        ("other_20240115_020000.tar.gz", None),
    ],
)
def test_object_names(name, expected):
    assert split_object_name(name, P) == expected


def test_kinds():
    jan15 = datetime(2024, 1, 15, 2, tzinfo=UTC)  # a Monday
    assert kind_for(jan15, scheduled=False, earlier=[]) == "manual"
    assert kind_for(jan15, scheduled=True, earlier=[]) == "monthly"
    assert kind_for(jan15, True, [datetime(2024, 1, 14, 2, tzinfo=UTC)]) == "weekly"
    assert kind_for(jan15, True, [datetime(2024, 1, 15, 1, tzinfo=UTC)]) == "daily"
