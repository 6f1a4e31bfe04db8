"""`vq-backup accept` as an operator runs it, over a real Local storage with real manifests, Celery's
own Redis (the incidents) and a real SMTP server: prune keeps the last good backups and says why
while the newest are suspicious; accept refuses a good backup, accepts a suspicious one (the record,
the audit line, the incident's resolution mail), and prune then deletes as usual. With
BACKUP_SIGNING_PUBLIC_KEYS an unsigned acceptance is ignored and accept needs the key file."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.integration.conftest import BROKER_PASSWORD, run_cli, settings_env
from tests.unit.retention.test_anomaly_retention import accept, planted, sign_manifests
from tests.unit.retention.test_pruning import names
from vq_tasks.catalog.acceptance import Acceptance
from vq_tasks.catalog.listing import load_manifest
from vq_tasks.crypto.signing import new_signing_key, public_key_text
from vq_tasks.manifest import acceptance_name, manifest_name
from vq_tasks.monitoring.alerts import deliver
from vq_tasks.monitoring.suspicious import suspicious_event
from vq_tasks.settings import load_settings
from vq_tasks.storage.local import LocalStorage

pytestmark = pytest.mark.integration
KEPT = "one of the last 3 good backups while newer ones are suspicious"


@pytest.fixture
def values(broker, smtp, tmp_path) -> dict[str, object]:
    """Settings (by field name) over a Local storage, alerting through the test's SMTP server."""
    return {
        "celery_broker_url": f"redis://:{BROKER_PASSWORD}@127.0.0.1:{broker.port}/0",
        "backup_storage_path": str(tmp_path / "primary"),
        "backup_staging_dir": tmp_path / "staging",
        "backup_audit_log": tmp_path / "audit.jsonl",
        "backup_retention_days": 7,
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp[0],
        "backup_alert_email": "oncall@example.com",
    }


def audit_lines(tmp_path: Path, operation: str) -> list[dict]:
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    return [line for line in lines if line["operation"] == operation]


def test_accept_refuses_a_good_backup_accepts_a_suspicious_one_and_prune_then_deletes_as_usual(
    values, tmp_path, smtp
):
    _, mailbox = smtp
    env, root = settings_env(**values), tmp_path / "primary"
    good, bad = planted(root, datetime.now(UTC).replace(microsecond=0))
    newest = load_manifest(LocalStorage(root), bad[2])
    deliver(load_settings(**values), suspicious_event(newest))  # what the worker did at finalize
    assert "SUSPICIOUS BACKUP" in str(mailbox.wait_for(1)[0]["Subject"])

    dry = run_cli(env, "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for backup_id in good[2:]:
        assert f"kept {backup_id} (" in dry.stdout and f"past its retention): {KEPT} (" in dry.stdout
    assert f"would delete {manifest_name(good[1])}" in dry.stdout

    refused = run_cli(env, "accept", good[4], "--reason", "nothing to accept")
    assert refused.returncode == 1 and f"{good[4]} is not suspicious" in refused.stderr
    assert run_cli(env, "accept", bad[2]).returncode == 2  # --reason is required

    done = run_cli(env, "accept", bad[2], "--reason", "planned cleanup of closed queues")
    assert done.returncode == 0, done.stderr
    assert f"accepted {bad[2]} as intended: wrote {acceptance_name(bad[2])} (unsigned" in done.stdout
    assert "suspicious-backup alert: resolved mail sent to oncall@example.com" in done.stdout
    assert "RESOLVED" in str(mailbox.wait_for(2)[1]["Subject"]) and len(mailbox.messages) == 2
    record = Acceptance.model_validate_json((root / acceptance_name(bad[2])).read_bytes())
    assert record.by.startswith("cli:") and record.reason == "planned cleanup of closed queues"
    [line] = audit_lines(tmp_path, "accept")
    assert (line["outcome"], line["backup_id"], line["reason"]) == (
        "succeeded", bad[2], "planned cleanup of closed queues"
    )  # fmt: skip
    before = (root / acceptance_name(bad[2])).read_bytes()
    again = run_cli(env, "accept", bad[2], "--reason", "twice")  # a rerun finishes, writes nothing
    assert again.returncode == 0 and "accepted already, by cli:" in again.stdout, again.stderr
    assert (root / acceptance_name(bad[2])).read_bytes() == before and len(
        audit_lines(tmp_path, "accept")
    ) == 1
    older = run_cli(env, "accept", bad[1], "--reason", "the same cleanup, begun earlier")
    assert older.returncode == 0 and f"a newer backup exists ({bad[2]})" in older.stdout

    pruned = run_cli(env, "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert KEPT not in pruned.stdout
    assert {manifest_name(i) for i in good + bad[:2]}.isdisjoint(names(root))
    assert {manifest_name(bad[2]), acceptance_name(bad[2])} <= names(root)
    assert acceptance_name(bad[1]) not in names(root)  # it went with its backup
    assert len(mailbox.messages) == 2


def test_with_signing_keys_an_unsigned_acceptance_is_ignored_and_accept_needs_the_key_file(values, tmp_path):
    root, key_file = tmp_path / "primary", tmp_path / "signing.pem"
    good, bad = planted(root, datetime.now(UTC).replace(microsecond=0))
    public = public_key_text(new_signing_key(key_file))
    sign_manifests(root, key_file)
    env = settings_env(**values, backup_signing_public_keys=public)
    accept(LocalStorage(root), bad[2])  # unsigned: anyone who can write to storage could have
    dry = run_cli(env, "prune", "--dry-run")
    assert dry.returncode == 0 and f"kept {good[2]} (" in dry.stdout and KEPT in dry.stdout

    unsigned = (root / acceptance_name(bad[2])).read_bytes()
    own_key_only = settings_env(**values)  # a signed manifest: its workers trust their own key
    refused = run_cli(own_key_only, "accept", bad[2], "--reason", "planned cleanup")
    assert refused.returncode == 1 and "manifest is signed, so its workers trust" in refused.stderr
    refused = run_cli(env, "accept", bad[2], "--reason", "planned cleanup")
    assert refused.returncode == 1 and "BACKUP_SIGNING_KEY_FILE" in refused.stderr
    assert (root / acceptance_name(bad[2])).read_bytes() == unsigned

    env = settings_env(**values, backup_signing_public_keys=public, backup_signing_key_file=key_file)
    done = run_cli(env, "accept", bad[2], "--reason", "planned cleanup")
    assert done.returncode == 0 and "(signed)" in done.stdout, done.stderr
    assert Acceptance.model_validate_json((root / acceptance_name(bad[2])).read_bytes()).signature
    dry = run_cli(env, "prune", "--dry-run")
    assert KEPT not in dry.stdout and f"would delete {manifest_name(good[4])}" in dry.stdout
    assert [line["backup_id"] for line in audit_lines(tmp_path, "accept")] == [bad[2]]
