"""The audit trail: one JSON line per operation, in the file and the log, never a secret."""

import json

from vq_tasks.audit import audit
from vq_tasks.settings import load_settings


def test_lines_are_appended_as_json_without_secrets(tmp_path, caplog):
    path = tmp_path / "audit" / "audit.jsonl"
    settings = load_settings(
        celery_broker_url="redis://127.0.0.1:1/0", backup_audit_log=path, db_password="pw-in-error"
    )
    audit(settings, "restore", "failed", backup_id="b1", error="psql said pw-in-error", origin="cli:op")
    audit(settings, "drill", "succeeded", backup_id="b1", duration_seconds=1.5, failures=None)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["operation"] for line in lines] == ["restore", "drill"]
    assert lines[0]["error"] == "psql said ***" and lines[0]["origin"] == "cli:op"
    assert "failures" not in lines[1] and lines[1]["duration_seconds"] == 1.5
    assert path.stat().st_mode & 0o777 == 0o600
    assert "pw-in-error" not in caplog.text


def test_an_unwritable_log_does_not_fail_the_operation(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    settings = load_settings(
        celery_broker_url="redis://127.0.0.1:1/0", backup_audit_log=blocker / "audit.jsonl"
    )
    assert '"operation": "verify"' in audit(settings, "verify", "succeeded")


def test_verify_writes_one_line_with_its_outcome_and_audit_shows_the_recent_ones(
    tmp_path, capsys, monkeypatch
):
    from tests.unit.verify.test_verify import BACKUP_ID, flip, make_backup
    from vq_tasks.cli.audit import recent
    from vq_tasks.cli.main import main
    from vq_tasks.settings import get_settings
    from vq_tasks.verify.run import verify_operation

    backup = make_backup(tmp_path)
    log = tmp_path / "audit.jsonl"
    settings = backup.settings.model_copy(update={"backup_audit_log": log})
    assert verify_operation(backup.storage, settings, "latest", origin="cli:op").ok
    flip(tmp_path / "backups" / f"{BACKUP_ID}.tar.gz", 2000)
    assert not verify_operation(backup.storage, settings, BACKUP_ID, origin="celery", task_id="t-1").ok
    audit(settings, "restore", "succeeded", backup_id="other")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["operation"], e["outcome"]) for e in lines[:2]] == [
        ("verify", "succeeded"),
        ("verify", "mismatch"),
    ]
    assert lines[1]["task_id"] == "t-1" and lines[1]["mismatches"] and lines[0]["duration_seconds"] >= 0
    assert [e["outcome"] for e in recent(log, 5, {"operation": "verify"})] == ["succeeded", "mismatch"]
    assert [e["backup_id"] for e in recent(log, 1, {})] == ["other"]

    with log.open("a") as out:
        out.write("not json\n")
    monkeypatch.setenv("BACKUP_AUDIT_LOG", str(log))
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    try:
        assert main(["audit", "--backup", BACKUP_ID]) == 0
    finally:
        get_settings.cache_clear()
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["TIME", "OPERATION", "OUTCOME", "BACKUP", "ORIGIN", "SECONDS", "DETAILS"]
    assert [row[1:5] for row in rows[1:]] == [
        ["verify", "succeeded", BACKUP_ID, "cli:op"],
        ["verify", "mismatch", BACKUP_ID, "celery"],
    ]
    assert "task_id=t-1" in rows[2]


def test_a_secret_that_json_would_escape_is_still_redacted(tmp_path, caplog):
    tricky = 'p"a\\ss-wörd'
    path = tmp_path / "audit.jsonl"
    settings = load_settings(
        celery_broker_url="redis://127.0.0.1:1/0", backup_audit_log=path, db_password=tricky
    )
    line = audit(
        settings, "verify", "failed", error=f"psql: password {tricky} refused", details={tricky: [tricky]}
    )
    written = path.read_text()
    assert json.loads(line) == json.loads(written)
    entry = json.loads(written)
    assert entry["error"] == "psql: password *** refused" and entry["details"] == {"***": ["***"]}
    assert "ss-w" not in written and "ss-w" not in caplog.text
