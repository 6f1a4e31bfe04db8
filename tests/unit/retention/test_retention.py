"""The retention decision: table-driven cases, grandfather-father-son tiers and their reasons,
and its properties checked with hypothesis (a simulated year is in test_pruning.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from dateutil.relativedelta import relativedelta
from hypothesis import given, settings
from hypothesis import strategies as st

from vq_tasks.catalog.backup_set import BackupSet
from vq_tasks.catalog.listing import backup_sets
from vq_tasks.retention.policy import KINDS, Deletion, Policy, add_months, decide, keep_until
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
    ("logs exactly at their retention edge stay", [backup(1), backup(7)], []),
    ("a partial upload exactly a day old may still run", [backup(0.5), backup(1, partial=True)], []),
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


# --- grandfather-father-son tiers ------------------------------------------------------------

GFS = Policy(retention_days=30, logs_retention_days=7, weekly_weeks=12, monthly_months=12)


def stored(started: datetime, kind: str | None, manifest: bool = True) -> BackupSet:
    backup_id = f"{PREFIX}_{started:%Y%m%d_%H%M%S}"
    roles = {"bundle": [f"{backup_id}.tar.gz"], "logs": [f"{backup_id}_logs.tar.gz"]}
    if manifest:
        roles["manifest"] = [f"{backup_id}_manifest.json"]
    return BackupSet(backup_id, started, roles, kind if manifest else None)


def reasons(*backups: BackupSet, policy: Policy = GFS) -> dict[str, str]:
    """The reason each backup goes whole (its manifest is deleted), by backup id."""
    newest = stored(NOW, "daily")
    found = decide([*backups, newest], NOW, policy)
    return {d.backup_id: d.reason for d in found if d.name.endswith("_manifest.json")}


@pytest.mark.parametrize(
    ("kind", "days_ago", "reason"),
    [
        ("daily", 31, "daily backup older than BACKUP_RETENTION_DAYS=30"),
        ("manual", 31, "manual backup older than BACKUP_RETENTION_DAYS=30"),
        ("weekly", 85, "weekly backup older than BACKUP_WEEKLY_RETENTION_WEEKS=12"),
        ("monthly", 367, "monthly backup older than BACKUP_MONTHLY_RETENTION_MONTHS=12"),
        (None, 367, "backup of unknown kind (manifest unreadable, kept as monthly) older than "
         "BACKUP_MONTHLY_RETENTION_MONTHS=12"),
    ],
)  # fmt: skip
def test_each_tier_names_itself_when_its_backup_goes(kind, days_ago, reason):
    old = stored(NOW - timedelta(days=days_ago), kind)
    assert reasons(old) == {old.backup_id: reason}


@pytest.mark.parametrize(
    ("kind", "days_ago"),
    [("weekly", 31), ("weekly", 84), ("monthly", 85), ("monthly", 365), (None, 200)],
)
def test_weekly_and_monthly_backups_outlive_the_daily_retention(kind, days_ago):
    assert reasons(stored(NOW - timedelta(days=days_ago), kind)) == {}


def test_a_manual_backup_has_the_daily_tier_only():
    assert reasons(stored(NOW - timedelta(days=30), "manual")) == {}
    assert len(reasons(stored(NOW - timedelta(days=30, seconds=1), "manual"))) == 1


def test_a_tier_set_to_zero_hands_over_to_the_one_below():
    no_months = replace(GFS, monthly_months=0)
    monthly = stored(NOW - timedelta(days=85), "monthly")
    assert reasons(monthly, policy=no_months) == {
        monthly.backup_id: "monthly backup older than BACKUP_WEEKLY_RETENTION_WEEKS=12"
    }
    nothing_above = replace(GFS, weekly_weeks=0, monthly_months=0)
    weekly = stored(NOW - timedelta(days=31), "weekly")
    assert reasons(weekly, policy=nothing_above) == {
        weekly.backup_id: "weekly backup older than BACKUP_RETENTION_DAYS=30"
    }


def test_kept_logs_still_go_after_their_own_retention():
    monthly = stored(NOW - timedelta(days=100), "monthly")
    found = decide([monthly, stored(NOW, "daily")], NOW, GFS)
    assert [(d.name, d.reason) for d in found] == [
        (f"{monthly.backup_id}_logs.tar.gz", "logs older than BACKUP_LOGS_RETENTION_DAYS=7")
    ]


@pytest.mark.parametrize(
    ("started", "months", "until"),
    [
        (datetime(2024, 1, 31, 2, tzinfo=UTC), 1, datetime(2024, 2, 29, 2, tzinfo=UTC)),
        (datetime(2023, 1, 31, 2, tzinfo=UTC), 1, datetime(2023, 2, 28, 2, tzinfo=UTC)),
        (datetime(2024, 3, 31, 2, tzinfo=UTC), 1, datetime(2024, 4, 30, 2, tzinfo=UTC)),
        (datetime(2024, 12, 15, 2, tzinfo=UTC), 1, datetime(2025, 1, 15, 2, tzinfo=UTC)),
        (datetime(2024, 2, 29, 2, tzinfo=UTC), 12, datetime(2025, 2, 28, 2, tzinfo=UTC)),
        (datetime(2024, 5, 1, 2, tzinfo=UTC), 0, datetime(2024, 5, 1, 2, tzinfo=UTC)),
    ],
)
def test_calendar_months_clamp_the_day(started, months, until):
    assert add_months(started, months) == until
    policy = Policy(retention_days=1, logs_retention_days=1, monthly_months=months)
    assert keep_until(stored(started, "monthly"), policy) == max(until, started + timedelta(days=1))


# --- properties --------------------------------------------------------------------------------

BASE = datetime(2023, 1, 1, tzinfo=UTC)
HOURS = st.sampled_from([0, 2, 12])  # few distinct hours: ages land exactly on the edges often


@st.composite
def scenarios(draw) -> tuple[list[BackupSet], datetime, Policy, frozenset[str]]:
    """Stored backups over two years (complete or not, any kind), a policy, a time (often right
    on one of a backup's edges), and the runs known to have failed."""
    policy = Policy(
        retention_days=draw(st.integers(1, 60)),
        logs_retention_days=draw(st.integers(1, 30)),
        weekly_weeks=draw(st.integers(0, 20)),
        monthly_months=draw(st.integers(0, 24)),
        in_progress_grace=draw(st.sampled_from([timedelta(days=1), timedelta(hours=36)])),
    )
    days = draw(st.lists(st.integers(0, 730), max_size=25))
    starts = sorted({BASE + timedelta(days=d, hours=draw(HOURS)) for d in days})
    backups = [_drawn_backup(draw, started) for started in starts]
    now = BASE + timedelta(days=draw(st.integers(0, 800)), hours=draw(HOURS))
    if starts and draw(st.booleans()):
        now = draw(st.sampled_from(starts)) + draw(st.sampled_from(edges(policy)))
    incomplete = sorted(b.backup_id for b in backups if not b.complete)
    ended = frozenset(draw(st.sets(st.sampled_from(incomplete)))) if incomplete else frozenset()
    return backups, now, policy, ended


def edges(policy: Policy) -> list[timedelta | relativedelta]:
    """The ages at which a policy changes its mind about a backup."""
    return [
        policy.in_progress_grace,
        timedelta(days=policy.logs_retention_days),
        timedelta(days=policy.retention_days),
        timedelta(weeks=policy.weekly_weeks),
        relativedelta(months=policy.monthly_months),
    ]


def _drawn_backup(draw, started: datetime) -> BackupSet:
    backup_id = f"{PREFIX}_{started:%Y%m%d_%H%M%S}"
    complete = draw(st.booleans())
    roles = {"manifest": [f"{backup_id}_manifest.json"]} if complete else {}
    for role, name in (("bundle", ".tar.gz"), ("logs", "_logs.tar.gz"), ("partial", ".tar.gz.partial-1")):
        if draw(st.booleans()):
            roles[role] = [f".{backup_id}{name}" if role == "partial" else f"{backup_id}{name}"]
    if not complete and not roles:
        roles["bundle"] = [f"{backup_id}.tar.gz"]
    kind = draw(st.sampled_from([*KINDS, None])) if complete else None
    return BackupSet(backup_id, started, roles, kind)


def retained(backup: BackupSet, now: datetime, policy: Policy) -> bool:
    """The policy, said again independently: is this complete backup within one of its tiers?"""
    age, kind = now - backup.started, backup.kind  # None: unknown, kept as monthly
    if age <= timedelta(days=policy.retention_days):
        return True
    if kind in ("weekly", "monthly", None) and age <= timedelta(days=7 * policy.weekly_weeks):
        return True
    return kind in ("monthly", None) and now <= backup.started + relativedelta(months=policy.monthly_months)


def newest_complete(backups: list[BackupSet], now: datetime) -> str | None:
    """The backup kept as the newest: the newest complete one not dated more than a day after
    ``now`` (any complete one when there is none such)."""
    complete = [b for b in backups if b.complete]
    believable = [b for b in complete if b.started <= now + timedelta(days=1)] or complete
    return max(believable, key=lambda b: b.started).backup_id if complete else None


def names(deletions: list[Deletion]) -> set[str]:
    return {d.name for d in deletions}


def applied(backups: list[BackupSet], deletions: list[Deletion]) -> list[BackupSet]:
    """The backups left once ``deletions`` are done (a backup with no file left is gone)."""
    gone, left = names(deletions), []
    for b in backups:
        roles = {role: [n for n in found if n not in gone] for role, found in b.roles.items()}
        roles = {role: found for role, found in roles.items() if found}
        if roles:
            left.append(BackupSet(b.backup_id, b.started, roles, b.kind))
    return left


PROPERTY = settings(max_examples=200, deadline=None)


@PROPERTY
@given(scenarios())
def test_the_newest_complete_and_retained_backups_stay(scenario):
    backups, now, policy, ended = scenario
    by_id = {d.backup_id for d in decide(backups, now, policy, ended) if d.order <= 1}  # manifest or bundle
    newest = newest_complete(backups, now)
    for b in backups:
        if b.complete and (b.backup_id == newest or retained(b, now, policy)):
            assert b.backup_id not in by_id
    if newest:
        assert not any(d.backup_id == newest for d in decide(backups, now, policy, ended))


@PROPERTY
@given(scenarios())
def test_what_is_past_retention_goes_whole_manifest_first(scenario):
    backups, now, policy, ended = scenario
    deletions = decide(backups, now, policy, ended)
    for b in backups:
        if b.complete and b.backup_id != newest_complete(backups, now) and not retained(b, now, policy):
            mine = [d.name for d in deletions if d.backup_id == b.backup_id]
            assert set(mine) == {n for found in b.roles.values() for n in found}
            assert mine[0].endswith("_manifest.json")


@PROPERTY
@given(scenarios())
def test_a_kept_backup_loses_its_logs_and_partial_uploads_on_time(scenario):
    backups, now, policy, ended = scenario
    gone = names(decide(backups, now, policy, ended))
    for b in backups:
        if b.complete and b.backup_id != newest_complete(backups, now) and retained(b, now, policy):
            age = now - b.started
            logs_go = age > timedelta(days=policy.logs_retention_days)
            assert all((n in gone) is logs_go for n in b.roles.get("logs", []))
            assert all((n in gone) is (age > policy.in_progress_grace) for n in b.roles.get("partial", []))


@PROPERTY
@given(scenarios())
def test_a_backup_without_manifest_stays_through_the_grace_unless_its_run_ended(scenario):
    backups, now, policy, ended = scenario
    touched = {d.backup_id for d in decide(backups, now, policy, ended)}
    for b in backups:
        if not b.complete:
            may_run = now - b.started <= policy.in_progress_grace and b.backup_id not in ended
            assert (b.backup_id in touched) is not may_run


@PROPERTY
@given(scenarios(), st.randoms(use_true_random=False))
def test_the_order_of_the_listing_does_not_matter(scenario, rnd):
    backups, now, policy, ended = scenario
    shuffled = list(backups)
    rnd.shuffle(shuffled)
    assert decide(shuffled, now, policy, ended) == decide(backups, now, policy, ended)


@PROPERTY
@given(scenarios())
def test_pruning_again_deletes_nothing_more(scenario):
    backups, now, policy, ended = scenario
    left = applied(backups, decide(backups, now, policy, ended))
    assert decide(left, now, policy, ended) == []


@PROPERTY
@given(scenarios(), st.integers(0, 400), st.sampled_from([0, 1, 2]))
def test_later_deletes_more_and_how_often_prune_ran_does_not_matter(scenario, days, hours):
    backups, now, policy, ended = scenario
    later = now + timedelta(days=days, hours=hours)
    early = decide(backups, now, policy, ended)
    once = decide(backups, later, policy, ended)
    assert names(early) <= names(once)
    twice = applied(applied(backups, early), decide(applied(backups, early), later, policy, ended))
    assert twice == applied(backups, once)


def test_a_forged_or_future_dated_backup_never_takes_the_newest_backups_protection():
    """Backups stopped 40 days ago; then a forged manifest (untrusted: its signature fails) from
    yesterday and one dated next year appear. The real last backup stays protected as the newest;
    without either, the forged one would be "newest" and the real one deleted as a daily."""
    last_real = stored(NOW - timedelta(days=40), "daily")
    forged = replace(stored(NOW - timedelta(days=1), None), trusted=False)
    future = stored(NOW + timedelta(days=365), "daily")
    deletions = decide([last_real, forged, future], NOW, GFS)
    assert last_real.backup_id not in {d.backup_id for d in deletions}
    honest = decide([last_real, replace(forged, trusted=True)], NOW, GFS)
    assert last_real.backup_id in {d.backup_id for d in honest}, "the test must show the difference"
