"""`vq-backup list` and `show` on a real Local storage: a complete backup with anomalies is
`suspicious` until an acceptance that counts marks it `accepted`; `show` prints the verdict, each
anomaly, and the counts of the backup beside the median of its window and each window backup,
naming the window backups storage no longer holds (and never reading a forged id)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from tests.unit.catalog.test_anomalies import START, TABLES, WINDOW, manifest, put
from vq_tasks.catalog.acceptance import Acceptance, manifest_digest
from vq_tasks.catalog.anomalies import Thresholds, find_anomalies
from vq_tasks.catalog.listing import load_manifest
from vq_tasks.cli.backups import anomaly_row
from vq_tasks.cli.main import main
from vq_tasks.manifest import Manifest, acceptance_name, bundle_name, manifest_name, new_backup_id
from vq_tasks.storage.local import LocalStorage

EMPTIED = {**TABLES, "public.queue_entries": 12}


@pytest.fixture
def store(tmp_path, monkeypatch) -> LocalStorage:
    root = tmp_path / "backups"
    monkeypatch.setenv("BACKUP_STORAGE_PATH", str(root))
    monkeypatch.setenv("BACKUP_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
    return LocalStorage(root)


def suspicious(day: int, window: list[Manifest], **changes) -> Manifest:
    """A backup of ``day`` compared with ``window`` (newest first), its anomalies found."""
    found = manifest(day, **changes)
    anomalies = find_anomalies(found.components, window, Thresholds())
    return found.model_copy(update={"anomalies": anomalies, "compared_with": [m.backup_id for m in window]})


def accept(store: LocalStorage, backup_id: str, **changes) -> None:
    stored = load_manifest(store, backup_id)
    record = Acceptance(
        backup_id=backup_id, accepted_at=START + timedelta(days=30), by="cli:ops",
        reason="planned cleanup of old entries", manifest_sha256=manifest_digest(stored),
    ).model_copy(update=changes)  # fmt: skip
    with store.open_write(acceptance_name(backup_id)) as out:
        out.write(record.model_dump_json().encode())


def statuses(out: str) -> dict[str, str]:
    lines = [line.split() for line in out.splitlines()[1:] if line.startswith("virtualqueue_backup_")]
    return {cells[0]: cells[-1] for cells in lines}


def test_list_marks_suspicious_and_accepted_backups(store, capsys):
    window = WINDOW[-3:]  # days 2, 1, 0
    for m in window:
        put(store, m)
    flagged = suspicious(3, window, tables=EMPTIED)
    accepted = suspicious(4, window, tables=EMPTIED)
    wrongly = suspicious(5, window, tables=EMPTIED)  # its acceptance names another manifest
    for m in (flagged, accepted, wrongly):
        put(store, m)
    accept(store, accepted.backup_id)
    accept(store, wrongly.backup_id, manifest_sha256="f" * 64)
    incomplete = new_backup_id("virtualqueue_backup", START + timedelta(days=6))
    with store.open_write(bundle_name(incomplete, "gzip")) as out:
        out.write(b"x")

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert statuses(out) == {
        **{m.backup_id: "complete" for m in window},
        flagged.backup_id: "suspicious",
        accepted.backup_id: "accepted",
        wrongly.backup_id: "suspicious",
        incomplete: "incomplete",
    }
    assert "2 suspicious" in out and "`vq-backup show ID` says why" in out
    assert "`vq-backup accept ID --reason TEXT` if it was intended" in out


def test_list_of_good_backups_says_nothing_of_anomalies(store, capsys):
    put(store, manifest(0))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert statuses(out) == {manifest(0).backup_id: "complete"} and "suspicious" not in out


def comparison(out: str) -> dict[str, list[str]]:
    """The comparison table of `show`: row label -> [flag, THIS, MEDIAN, each window backup]."""
    lines = out.split("compared with", 1)[1].splitlines()
    header = next(line for line in lines if " WHAT " in line)
    starts = [0] + [m.start() for m in re.finditer(r"\S+(?: \S+)*", header)]  # the flag's is empty
    ends = [*starts[1:], None]
    found = {}
    for line in lines[lines.index(header) + 1 :]:
        if line.startswith("(! an anomaly"):
            break
        cells = [line[start:end].strip() for start, end in zip(starts, ends, strict=True)]
        found[cells[1]] = [cells[0], *cells[2:]]
    return found


def test_show_prints_the_verdict_each_anomaly_and_the_comparison_with_the_window(store, capsys):
    window = WINDOW  # days 6 to 0: seven good backups
    for m in window[1:]:
        put(store, m)  # the newest of them, day 6, is gone from storage
    flagged = suspicious(7, window, tables=EMPTIED, keys={"1": 12})
    put(store, flagged)

    assert main(["show", flagged.backup_id]) == 0
    out = capsys.readouterr().out
    section = out.split("\nanomalies:\n", 1)[1]
    assert section.startswith("  SUSPICIOUS: table public.queue_entries: 1,204,331 → 12 rows; ")
    assert "  - table public.queue_entries: 1,204,331 → 12 rows\n" in section
    assert "  - redis db0: 50,000 → 0 keys\n" in section
    assert f"compared with 7 good backups before it, newest first:\n  {window[0].backup_id}: gone" in out
    rows = comparison(out)
    day5 = f"{window[1].started_at:%m-%d %H:%M}"
    assert day5 in out and f"{window[0].started_at:%m-%d %H:%M}" not in out.split("compared with")[1]
    assert rows["rows public.queue_entries"] == ["!", "12", "1,204,331", *["1,204,331"] * 6]
    assert rows["rows public.customers"] == ["", "52,000", "52,000", *["52,000"] * 6]
    assert rows["keys db0"][:3] == ["!", "0", "50,000"]
    assert rows["keys, all databases"][:3] == ["!", "12", "50,012"]
    assert rows["config files"][:3] == ["", "2", "2"]
    assert rows["size database"][:3] == ["", "900.0 MiB", "900.0 MiB"]
    assert next(iter(rows)) == "rows public.queue_entries"  # the flagged table first


def test_show_of_an_accepted_and_of_a_good_backup(store, capsys):
    window = WINDOW[-2:]
    for m in window:
        put(store, m)
    accepted = suspicious(3, window, tables=EMPTIED)
    good = suspicious(4, window)
    first = manifest(-1)
    for m in (accepted, good, first):
        put(store, m)
    accept(store, accepted.backup_id)

    assert main(["show", accepted.backup_id]) == 0
    out = capsys.readouterr().out
    assert "\nanomalies:\n  accepted as intended: table public.queue_entries: 1,204,331 → 12 rows" in out
    assert "accepted by cli:ops at 2026-01-31 02:00:00: planned cleanup of old entries" in out
    assert main(["show", good.backup_id]) == 0
    out = capsys.readouterr().out
    assert "\nanomalies:\n  no anomaly against 2 good backups\n" in out and "\n  - " not in out
    assert comparison(out)["rows public.queue_entries"] == [
        "",
        "1,204,331",
        "1,204,331",
        "1,204,331",
        "1,204,331",
    ]
    assert main(["show", first.backup_id]) == 0
    out = capsys.readouterr().out
    assert "anomalies:\n  not compared (no good backup before it)\n" in out and "compared with" not in out


def test_show_json_is_the_manifest_with_its_anomalies(store, capsys):
    flagged = suspicious(3, WINDOW[-2:], tables=EMPTIED)
    put(store, flagged)
    assert main(["show", flagged.backup_id, "--json"]) == 0
    shown = Manifest.model_validate_json(capsys.readouterr().out)
    assert shown.anomalies == flagged.anomalies and shown.compared_with == flagged.compared_with


def test_show_never_reads_an_id_a_forged_manifest_names(store, capsys, tmp_path):
    (tmp_path / "secret_manifest.json").write_text("{}")
    elsewhere = "otherapp_20260101_020000"  # a backup id, of another BACKUP_NAME_PREFIX
    forged = manifest(3).model_copy(update={"compared_with": [elsewhere]})
    put(store, forged)
    (store.root / f"{elsewhere}_manifest.json").write_text("{}")
    assert main(["show", forged.backup_id]) == 0
    assert f"'{elsewhere}': not a backup id, not read" in capsys.readouterr().out
    path = store.root / manifest_name(forged.backup_id)
    path.write_text(path.read_text().replace(elsewhere, "../secret"))  # not even a backup id
    assert main(["show", forged.backup_id]) == 1
    assert "is not a valid manifest" in capsys.readouterr().err


def test_each_anomaly_names_its_comparison_row():
    flagged = suspicious(7, WINDOW, tables={"public.queue_entries": 3}, keys={"1": 12}, files=[], db_size=1)
    assert {anomaly_row(a) for a in flagged.anomalies} == {
        "rows public.queue_entries", "rows public.queues", "rows public.customers", "rows, all tables",
        "keys db0", "keys, all databases", "config files", "size database",
    }  # fmt: skip
