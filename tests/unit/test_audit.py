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
