"""The retention locks of BACKUP_IMMUTABILITY come from the same tiers as prune's decision, so a
lock never outlasts what retention keeps, and prune may delete as soon as the lock ends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vq_tasks.catalog.backup_set import BackupSet
from vq_tasks.retention.policy import KINDS, Policy, add_months, decide, keep_until, lock_dates

STARTED = datetime(2024, 1, 31, 2, 0, tzinfo=UTC)
POLICY = Policy(retention_days=7, logs_retention_days=3, weekly_weeks=4, monthly_months=12)


@pytest.mark.parametrize(
    ("kind", "until"),
    [
        ("daily", STARTED + timedelta(days=7)),
        ("manual", STARTED + timedelta(days=7)),
        ("weekly", STARTED + timedelta(weeks=4)),
        ("monthly", add_months(STARTED, 12)),
    ],
)
def test_each_kind_is_locked_as_long_as_its_longest_tier(kind, until):
    locks = lock_dates(STARTED, kind, POLICY)
    assert locks.until == until
    assert locks.logs_until == STARTED + timedelta(days=3)


def test_logs_are_never_locked_longer_than_their_backup():
    longer_logs = Policy(retention_days=2, logs_retention_days=10)
    locks = lock_dates(STARTED, "daily", longer_logs)
    assert locks.logs_until == locks.until == STARTED + timedelta(days=2)


@given(
    kind=st.sampled_from(KINDS),
    days=st.integers(1, 400),
    weeks=st.integers(0, 60),
    months=st.integers(0, 36),
    after=st.integers(1, 3600),
)
def test_prune_deletes_only_after_the_lock_ends(kind, days, weeks, months, after):
    policy = Policy(
        retention_days=days, logs_retention_days=min(days, 7), weekly_weeks=weeks, monthly_months=months
    )
    backup_id = f"vq_{STARTED:%Y%m%d_%H%M%S}"
    names = {"manifest": [f"{backup_id}_manifest.json"], "bundle": [f"{backup_id}.tar.gz"]}
    backup = BackupSet(backup_id, STARTED, names, kind=kind)
    newer = BackupSet("vq_20240131_030000", STARTED + timedelta(hours=1), {"manifest": ["n"]}, kind="daily")
    locks = lock_dates(STARTED, kind, policy)
    assert keep_until(backup, policy) == locks.until
    assert not decide([backup, newer], locks.until, policy)  # still locked: prune keeps it
    assert decide([backup, newer], locks.until + timedelta(seconds=after), policy)
