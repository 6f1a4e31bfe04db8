"""The retention decision, table-driven: what goes, what stays, and why."""

from datetime import UTC, datetime, timedelta

import pytest

from vq_tasks.catalog import backup_sets
from vq_tasks.retention import Policy, decide
from vq_tasks.storage.base import StoredObject

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
POLICY = Policy(retention_days=30, logs_retention_days=7)
PREFIX = "virtualqueue_backup"


def backup(days_ago: float, manifest: bool = True, logs: bool = True, partial: bool = False) -> list[str]:
    when = NOW - timedelta(days=days_ago)
    backup_id = f"{PREFIX}_{when:%Y%m%d_%H%M%S}"
    names = [f"{backup_id}.tar.gz"]
    names += [f"{backup_id}_logs.tar.gz"] if logs else []
    names += [f"{backup_id}_manifest.json"] if manifest else []
    names += [f".{backup_id}.tar.gz.partial-0a1b2c"] if partial else []
    return names


def deleted(*groups: list[str]) -> set[str]:
    objects = [StoredObject(n, 1, NOW) for group in groups for n in group]
    return {d.name for d in decide(backup_sets(objects, PREFIX), NOW, POLICY)}


CASES = [
    ("fresh complete backup stays", [backup(1)], []),
    ("old backup goes whole", [backup(1), backup(31)], [(1, "all")]),
    ("the newest complete backup stays however old", [backup(100)], []),
    ("newest complete stays even with newer debris", [backup(100), backup(2, manifest=False)], [(1, "all")]),
    ("logs go after 7 days, bundle stays", [backup(1), backup(8)], [(1, "logs")]),
    ("exactly at the retention edge stays", [backup(1), backup(30)], [(1, "logs")]),
    ("no manifest and young: may be in progress", [backup(1), backup(0.5, manifest=False)], []),
    ("no manifest and older than a day: debris", [backup(1), backup(1.5, manifest=False)], [(1, "all")]),
    ("partial upload of an old complete backup", [backup(1), backup(3, partial=True)], [(1, "partial")]),
]


@pytest.mark.parametrize(("title", "groups", "expected"), CASES, ids=[c[0] for c in CASES])
def test_decision(title, groups, expected):
    want = set()
    for index, what in expected:
        group = groups[index]
        if what == "all":
            want |= set(group)
        elif what == "logs":
            want |= {n for n in group if n.endswith("_logs.tar.gz")}
        elif what == "partial":
            want |= {n for n in group if ".partial-" in n}
    assert deleted(*groups) == want


def test_manifest_is_deleted_before_the_rest():
    objects = [StoredObject(n, 1, NOW) for n in backup(1) + backup(40)]
    order = [d.name for d in decide(backup_sets(objects, PREFIX), NOW, POLICY)]
    assert order[0].endswith("_manifest.json") and len(order) == 3


def test_foreign_files_are_never_touched():
    objects = [
        StoredObject(n, 1, NOW) for n in ["notes.txt", "other_backup_20200101_000000.tar.gz", *backup(1)]
    ]
    assert decide(backup_sets(objects, PREFIX), NOW, POLICY) == []


def test_listing_order_does_not_matter():
    groups = backup(1) + backup(8) + backup(40) + backup(2, manifest=False)
    objects = [StoredObject(n, 1, NOW) for n in groups]
    first = decide(backup_sets(objects, PREFIX), NOW, POLICY)
    assert decide(backup_sets(list(reversed(objects)), PREFIX), NOW, POLICY) == first


def test_debris_of_a_run_known_to_have_failed_goes_at_once():
    running, failed = backup(0.1, manifest=False), backup(0.2, manifest=False)
    failed_id = failed[0].removesuffix(".tar.gz")
    objects = [StoredObject(n, 1, NOW) for n in backup(1) + running + failed]
    gone = {d.name for d in decide(backup_sets(objects, PREFIX), NOW, POLICY, frozenset({failed_id}))}
    assert gone == set(failed)  # the other young run without a manifest may still be running
