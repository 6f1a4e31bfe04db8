"""Signed manifests through real workers: a backup signed by the workers' key verifies with its
public key; a manifest changed afterwards, or forged with another key, fails verify and is refused
by restore with nothing changed — by someone holding only the public key."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import fill_database, run_cli
from tests.integration.test_restore import make_backup, row_counts
from tests.servers import redis_server_binary
from vq_tasks.crypto.signing import (
    detached_signature,
    key_id,
    load_signing_key,
    new_signing_key,
    public_key_text,
)
from vq_tasks.manifest import manifest_name, signature_name

pytestmark = pytest.mark.integration


def test_a_changed_or_forged_manifest_is_refused_by_verify_and_restore(
    base_env, database, layout, start_worker, tmp_path
):
    fill_database(database, customers=50)
    workers_key, attackers_key = tmp_path / "signing.pem", tmp_path / "attacker.pem"
    public = new_signing_key(workers_key)
    new_signing_key(attackers_key)
    start_worker({**base_env, "BACKUP_SIGNING_KEY_FILE": str(workers_key)})
    backup_id, manifest = make_backup(base_env, layout["storage"])
    assert "signature" not in manifest  # detached, beside it
    assert (layout["storage"] / signature_name(backup_id)).read_text().count("\n") == 1
    checking = {
        **base_env,
        "BACKUP_SIGNING_PUBLIC_KEYS": public_key_text(public),
        "REDIS_SERVER_BIN": redis_server_binary(),
    }

    verified = run_cli(checking, "verify", backup_id)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"valid, by {key_id(public)}" in verified.stdout

    path = layout["storage"] / manifest_name(backup_id)
    original = path.read_text()
    kept_longer = json.loads(original)
    kept_longer["kind"] = "monthly"
    path.write_text(json.dumps(kept_longer))
    changed = run_cli(checking, "verify", backup_id)
    assert changed.returncode == 1 and "changed after signing, or forged" in changed.stdout

    forged = original.replace('"kind": "manual"', '"kind": "monthly"').encode()
    assert forged != original.encode()
    (layout["storage"] / signature_name(backup_id)).write_bytes(
        detached_signature(forged, load_signing_key(attackers_key))
    )
    path.write_bytes(forged)
    before = row_counts(database)
    refused = run_cli(checking, "restore", backup_id, "--force", "--yes")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "signature" in refused.stderr + refused.stdout and "forged" in refused.stderr + refused.stdout
    assert row_counts(database) == before
    assert "Traceback" not in refused.stderr
    extracted = tmp_path / "database.sql"
    refused_extract = run_cli(checking, "extract", backup_id, "database", "-o", str(extracted))
    assert refused_extract.returncode == 1 and "forged" in refused_extract.stderr
    assert not extracted.exists()
