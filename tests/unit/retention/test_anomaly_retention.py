"""Retention while backups are suspicious: the newest BACKUP_ANOMALY_KEEP_GOOD good complete
backups stay whatever their age while a suspicious, unaccepted one is newer than all of them, and
prune says why; suspicious backups follow the tiers; an accepted backup counts as good; with
BACKUP_SIGNING_PUBLIC_KEYS only a signed acceptance counts; each destination decides from its own
listing (acceptances are not copied off-site); acceptances are read only where they can matter."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.retention.test_pruning import make_settings, names, plant
from tests.unit.retention.test_retention import stored
from vq_tasks.catalog.acceptance import Acceptance, manifest_digest, signed, write_acceptance
from vq_tasks.catalog.backup_set import BackupSet
from vq_tasks.catalog.listing import backup_sets, load_manifest
from vq_tasks.crypto.signing import detached_signature, load_signing_key, new_signing_key, public_key_text
from vq_tasks.manifest import Anomaly, Manifest, acceptance_name, manifest_name
from vq_tasks.retention import plan as retention_plan
from vq_tasks.retention.policy import Kept, Policy, decide, kept, last_good
from vq_tasks.retention.prune import prune_all
from vq_tasks.storage.local import LocalStorage

NOW = datetime(2024, 6, 15, 12, 0, tzinfo=UTC)
POLICY = Policy(retention_days=7, logs_retention_days=3, keep_good=3)
DROP = Anomaly(
    kind="table_rows", subject="public.queue_entries", before=1_204_331, after=12,
    text="table public.queue_entries: 1,204,331 → 12 rows",
)  # fmt: skip


def daily(days_ago: int) -> BackupSet:
    return stored(NOW - timedelta(days=days_ago), "daily")


def whole(deletions) -> set[str]:
    """The ids of the backups deleted whole (their manifest goes)."""
    return {d.backup_id for d in deletions if d.name.endswith("_manifest.json")}


def ids(backups: list[BackupSet]) -> set[str]:
    return {b.backup_id for b in backups}


# --- the pure rule ---------------------------------------------------------------------------


def test_while_the_newest_are_suspicious_the_last_three_good_ones_stay_whatever_their_age():
    good = [daily(d) for d in (20, 19, 18, 17, 16)]
    bad = [daily(d) for d in range(15, 0, -1)]
    suspicious = frozenset(ids(bad))
    gone = whole(decide([*good, *bad], NOW, POLICY, suspicious=suspicious))
    assert gone == ids(good[:2]) | ids(bad[:8])  # suspicious ones follow the tiers: past 7 days, gone
    reason = (
        f"one of the last 3 good backups while newer ones are suspicious ({bad[0].backup_id}, "
        f"{bad[1].backup_id}, {bad[2].backup_id} and 12 more)"
    )
    assert kept([*good, *bad], NOW, POLICY, suspicious) == [Kept(b.backup_id, reason) for b in good[2:]]
    logs = {d.backup_id for d in decide([*good, *bad], NOW, POLICY, suspicious=suspicious)}
    assert ids(good[2:]) <= logs  # their logs still go after BACKUP_LOGS_RETENTION_DAYS


def test_a_good_newer_backup_or_keep_good_zero_means_normal_retention():
    good, bad, newer_good = [daily(d) for d in (20, 19, 18)], daily(10), daily(1)
    normal = decide([*good, bad, newer_good], NOW, POLICY)
    assert whole(normal) == ids([*good, bad])
    assert decide([*good, bad, newer_good], NOW, POLICY, suspicious=frozenset(ids([bad]))) == normal
    off = replace(POLICY, keep_good=0)
    assert whole(decide([*good, bad], NOW, off, suspicious=frozenset(ids([bad])))) == ids(good)
    assert kept([*good, bad], NOW, off, frozenset(ids([bad]))) == []


def test_untrusted_unknown_and_future_dated_backups_neither_count_as_good_nor_suspicious():
    good = daily(30)
    forged, unreadable = replace(daily(20), trusted=False), replace(daily(19), kind=None)
    future = stored(NOW + timedelta(days=5), "daily")
    assert last_good([good, forged, unreadable], NOW, POLICY, frozenset(ids([forged]))).ids == frozenset()
    assert last_good([good, future], NOW, POLICY, frozenset(ids([future]))).ids == frozenset()
    guard = last_good([good, unreadable, daily(2)], NOW, POLICY, frozenset(ids([daily(2)])))
    assert guard.ids == ids([good]) and guard.because == (daily(2).backup_id,)


@given(
    ages=st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=15, unique=True),
    bad=st.sets(st.integers(min_value=0, max_value=14)),
    keep=st.integers(min_value=0, max_value=4),
)
def test_the_guard_only_ever_keeps_more_and_never_spares_a_suspicious_backup(ages, bad, keep):
    backups = [daily(age) for age in ages]
    suspicious = frozenset(backups[i].backup_id for i in bad if i < len(backups))
    rules = replace(POLICY, keep_good=keep)
    normal, guarded = decide(backups, NOW, rules), decide(backups, NOW, rules, suspicious=suspicious)
    assert {d.name for d in guarded} <= {d.name for d in normal}
    spared = whole(normal) - whole(guarded)
    assert spared == {k.backup_id for k in kept(backups, NOW, rules, suspicious)}
    assert not spared & suspicious and len(spared) <= keep


# --- read from a real storage ----------------------------------------------------------------


def plant_suspicious(root: Path, started: datetime, anomalies: list[Anomaly] | None = None) -> str:
    """Plant a daily backup (test_pruning.plant) whose manifest holds ``anomalies`` (DROP)."""
    backup_id = plant(root, started, "daily")
    path = root / manifest_name(backup_id)
    original = Manifest.model_validate_json(path.read_bytes())
    path.write_text(original.model_copy(update={"anomalies": anomalies or [DROP]}).model_dump_json(indent=2))
    return backup_id


def accept(storage: LocalStorage, backup_id: str, key_file: Path | None = None) -> None:
    """Write the acceptance of ``backup_id``'s stored manifest, signed with ``key_file`` if given."""
    record = Acceptance(
        backup_id=backup_id, accepted_at=NOW, by="cli:ops", reason="planned cleanup", signature=None,
        manifest_sha256=manifest_digest(load_manifest(storage, backup_id)),
    )  # fmt: skip
    write_acceptance(storage, signed(record, load_signing_key(key_file) if key_file else None))


def planted(root: Path, now: datetime = NOW) -> tuple[list[str], list[str]]:
    """Five good daily backups 20-16 days before ``now``, then suspicious ones 15, 10 and 1 day old."""
    good = [plant(root, now - timedelta(days=d), "daily") for d in (20, 19, 18, 17, 16)]
    bad = [plant_suspicious(root, now - timedelta(days=d)) for d in (15, 10, 1)]
    return good, bad


def test_prune_keeps_the_last_good_ones_says_why_and_an_acceptance_restores_normal_retention(tmp_path):
    good, bad = planted(tmp_path / "primary")
    settings = make_settings(tmp_path, backup_retention_days=7)
    lines: list[str] = []
    report = prune_all(settings, dry_run=True, now=NOW, say=lines.append)
    text = "\n".join(lines)
    reason = f"one of the last 3 good backups while newer ones are suspicious ({', '.join(bad)})"
    assert f"  kept {good[2]} (18.0 days old, past its retention): {reason}" in text
    assert {k["backup_id"] for k in report.as_dict()["destinations"]["primary"]["kept"]} == set(good[2:])
    assert whole(report.destinations[0].deletions) == {*good[:2], bad[0], bad[1]}

    accept(LocalStorage(tmp_path / "primary"), bad[2])  # the newest: a planned cleanup
    plan = retention_plan.plan(LocalStorage(tmp_path / "primary"), settings, NOW)
    assert plan.kept == [] and plan.suspicious == {bad[0], bad[1]}
    assert whole(plan.deletions) == {*good, bad[0], bad[1]}
    prune_all(settings, now=NOW, say=lambda line: None)
    assert names(tmp_path / "primary") >= {manifest_name(bad[2]), acceptance_name(bad[2])}
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {line["backup_id"] for line in audit if line["operation"] == "prune"} >= {*good, bad[0], bad[1]}


def test_an_accepted_backup_counts_as_one_of_the_last_good_ones(tmp_path):
    good, bad = planted(tmp_path / "primary")
    storage = LocalStorage(tmp_path / "primary")
    accept(storage, bad[0])
    plan = retention_plan.plan(storage, make_settings(tmp_path, backup_retention_days=7), NOW)
    assert plan.suspicious == {bad[1], bad[2]}
    assert [k.backup_id for k in plan.kept] == [good[3], good[4], bad[0]]
    assert whole(plan.deletions) == {*good[:3], bad[1]}  # bad[1] is suspicious: its tiers decide


def sign_manifests(root: Path, key_file: Path) -> None:
    """Write the detached signature of every manifest in ``root``, as a signing worker does."""
    key = load_signing_key(key_file)
    for path in root.glob("*_manifest.json"):
        (root / f"{path.name}.sig").write_bytes(detached_signature(path.read_bytes(), key))


def test_with_trusted_keys_only_a_signed_acceptance_counts(tmp_path):
    good, bad = planted(tmp_path / "primary")
    key_file = tmp_path / "signing.pem"
    settings = make_settings(
        tmp_path,
        backup_retention_days=7,
        backup_signing_public_keys=public_key_text(new_signing_key(key_file)),
    )
    sign_manifests(tmp_path / "primary", key_file)
    storage = LocalStorage(tmp_path / "primary")
    accept(storage, bad[2])  # unsigned: whoever can write to storage could have written it
    assert [k.backup_id for k in retention_plan.plan(storage, settings, NOW).kept] == good[2:]
    accept(storage, bad[2], key_file)
    assert retention_plan.plan(storage, settings, NOW).kept == []


def test_the_off_site_copy_decides_from_its_own_listing_where_no_acceptance_is_copied(tmp_path):
    for role in ("primary", "offsite"):
        good, bad = planted(tmp_path / role)
    accept(LocalStorage(tmp_path / "primary"), bad[2])
    settings = make_settings(tmp_path, backup_retention_days=7)
    assert retention_plan.plan(LocalStorage(tmp_path / "primary"), settings, NOW).kept == []
    offsite = retention_plan.plan(LocalStorage(tmp_path / "offsite"), settings, NOW)
    assert [k.backup_id for k in offsite.kept] == good[2:]


class CountedReads(LocalStorage):
    """A real Local storage that notes the name of each object read whole."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.read: list[str] = []

    def read_bytes(self, name: str, limit: int = 16 << 20) -> bytes:
        self.read.append(name)
        return super().read_bytes(name, limit)


def test_acceptances_are_read_only_for_suspicious_manifests_that_have_one(tmp_path):
    good, bad = planted(tmp_path / "primary")
    storage = CountedReads(tmp_path / "primary")
    accept(storage, bad[2])
    (tmp_path / "primary" / acceptance_name(good[0])).write_text("{}")  # a good backup's: never read
    storage.read.clear()
    retention_plan.plan(storage, make_settings(tmp_path), NOW)
    assert [n for n in storage.read if not n.endswith("_manifest.json")] == [acceptance_name(bad[2])]
    assert sorted(n for n in storage.read if n.endswith("_manifest.json")) == sorted(
        manifest_name(i) for i in good + bad
    )


def test_a_caller_with_its_own_manifests_finds_the_same_suspicious_backups(tmp_path):
    good, bad = planted(tmp_path / "primary")
    storage = LocalStorage(tmp_path / "primary")
    accept(storage, bad[0])
    settings = make_settings(tmp_path, backup_retention_days=7)
    sets = backup_sets(storage.list(), settings.backup_name_prefix)
    manifests = {b.backup_id: load_manifest(storage, b.backup_id) for b in sets}
    found = retention_plan.suspicious_ids(storage, sets, manifests, {})
    assert found == retention_plan.plan(storage, settings, NOW).suspicious == {bad[1], bad[2]}
    kinds = {i: m.kind for i, m in manifests.items()}
    given = retention_plan.plan(storage, settings, NOW, kinds, suspicious=found)
    assert given == retention_plan.plan(storage, settings, NOW)
    assert [k.backup_id for k in given.kept] == [good[3], good[4], bad[0]]
