"""An encrypted backup through a real worker, PostgreSQL and Redis: stored as age files that the real
`age` CLI opens with a key from the real `age-keygen`; a manifest with fingerprints and no key;
`vq-backup verify` with the key (all OK) and without it (contents NOT CHECKED); a restore with
the right key that brings everything back, and refusals without it or with a wrong one that leave
everything as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import fill_database, run_cli
from tests.integration.test_restore import TABLES, change_everything, snapshot
from tests.servers import redis_server_binary
from vq_tasks.manifest import TAR_SUFFIX

pytestmark = pytest.mark.integration
SECRETS = ("db-secret-pw", "redis-secret-pw", "broker-secret-pw", "AGE-SECRET-KEY")


def tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: install Debian's age package (apt-get install age), as .ci/run does")
    return found


def keygen(path: Path) -> str:
    """Make a key with the real age-keygen; return its public key."""
    made = subprocess.run([tool("age-keygen"), "-o", str(path)], capture_output=True, text=True, check=True)
    return made.stderr.strip().split()[-1]


def age_list(key: Path, bundle: Path) -> list[str]:
    """`age -d -i key < bundle | tar -tz` (`tar --zstd -t`): the names in an encrypted bundle, by
    the CLIs alone."""
    flag = "--zstd" if bundle.name.endswith(".zst.age") else "-z"
    with open(bundle, "rb") as stored:
        age = subprocess.Popen([tool("age"), "-d", "-i", str(key)], stdin=stored, stdout=subprocess.PIPE)
        listing = subprocess.run(
            ["tar", flag, "-t"], stdin=age.stdout, capture_output=True, text=True, timeout=60
        )
        assert age.stdout is not None
        age.stdout.close()
        assert age.wait(timeout=60) == 0
    assert listing.returncode == 0, listing.stderr
    return listing.stdout.split()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_an_encrypted_backup_opens_with_age_verifies_and_restores_only_with_its_key(
    base_env, database, derived_databases, source_redis, layout, start_worker, tmp_path, compression
):
    keys = tmp_path / "keys"
    keys.mkdir()
    operator_key, escrow_key, stranger_key = keys / "operator.txt", keys / "escrow.txt", keys / "stranger.txt"
    operator, escrow = keygen(operator_key), keygen(escrow_key)
    keygen(stranger_key)
    env = {
        **base_env,
        "REDIS_SERVER_BIN": redis_server_binary(),
        "BACKUP_ENCRYPTION_ENABLED": "true",
        "BACKUP_ENCRYPTION_RECIPIENTS": f"{operator},{escrow}",
        "COMPRESSION_ALGORITHM": compression,
    }  # the workers': public keys only
    suffix = TAR_SUFFIX[compression]
    with_key = {**env, "BACKUP_ENCRYPTION_IDENTITY_FILE": str(operator_key)}
    wrong_key = {**env, "BACKUP_ENCRYPTION_IDENTITY_FILE": str(stranger_key)}
    expected_rows = fill_database(database, customers=150)
    worker = start_worker(env)

    made = run_cli(env, "run", "--wait")
    assert made.returncode == 0, made.stdout + made.stderr
    backup_id = made.stdout.strip().splitlines()[-1]
    storage = layout["storage"]
    bundle, logs, manifest_file = (
        storage / f"{backup_id}{s}" for s in (f"{suffix}.age", f"_logs{suffix}.age", "_manifest.json")
    )
    assert sorted(p.name for p in storage.iterdir()) == sorted(p.name for p in (bundle, logs, manifest_file))

    # the age CLI alone opens the bundle, with either recipient's key; sha256sum matches the manifest
    assert age_list(operator_key, bundle) == ["database.sql", "globals.sql", "redis.rdb", f"config{suffix}"]
    assert age_list(escrow_key, bundle) == ["database.sql", "globals.sql", "redis.rdb", f"config{suffix}"]
    assert bundle.read_bytes().startswith(b"age-encryption.org/v1\n")
    manifest_text = manifest_file.read_text()
    manifest = json.loads(manifest_text)
    for entry in manifest["files"]:
        digest = subprocess.run(["sha256sum", str(storage / entry["name"])], capture_output=True, text=True)
        assert digest.stdout.split()[0] == entry["sha256"]
    fingerprints = [hashlib.sha256(key.encode()).hexdigest()[:16] for key in (operator, escrow)]
    assert manifest["encryption"] == {"format": "age", "recipients": fingerprints}
    for key_material in ("AGE-SECRET-KEY", operator, escrow, "age1"):
        assert key_material not in manifest_text
    assert manifest["components"]["database"]["facts"]["tables"] == expected_rows

    # verify: with the key every check; without it the stored files, and the contents NOT CHECKED
    good = run_cli(with_key, "verify", backup_id)
    assert good.returncode == 0 and f"{backup_id}: all OK" in good.stdout, good.stdout + good.stderr
    assert " rows " in good.stdout and " crc64 " in good.stdout
    keyless = run_cli(env, "verify", backup_id)
    assert "not checked: encrypted, BACKUP_ENCRYPTION_IDENTITY_FILE not set" in keyless.stdout
    assert "NOT CHECKED" in keyless.stdout and "MISMATCH" not in keyless.stdout
    keyless_json = run_cli(env, "verify", backup_id, "--json")
    report = json.loads(keyless_json.stdout)
    assert keyless_json.returncode == 1 and report["ok"] is False and report["outcome"] == "not checked"
    bundle_checks = {c["check"]: c for f in report["files"] if f["name"] == bundle.name for c in f["checks"]}
    assert all(bundle_checks[c]["ok"] for c in ("size", "md5", "sha256"))

    # a restore needs the key: without it, or with a wrong one, nothing changes
    change_everything(database, source_redis, layout["config"])
    changed = snapshot(database, source_redis, layout["config"])
    refused = run_cli(env, "restore", backup_id, "--force", "--yes")
    assert refused.returncode == 1
    assert (
        f"BACKUP_ENCRYPTION_IDENTITY_FILE is not set: {bundle.name} is encrypted (age); the private key is "
        "needed to verify contents and restore" in refused.stderr
    ), refused.stdout + refused.stderr
    wrong = run_cli(wrong_key, "restore", backup_id, "--force", "--yes")
    assert wrong.returncode == 1
    assert f"none of the identities in BACKUP_ENCRYPTION_IDENTITY_FILE opens {bundle.name}" in wrong.stderr
    assert ", ".join(fingerprints) in wrong.stderr
    assert snapshot(database, source_redis, layout["config"]) == changed
    assert not [p for p in layout["staging"].iterdir() if p.name.startswith(".restore-")]

    restored = run_cli(with_key, "restore", backup_id, "--force", "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    counts, _, config, _ = snapshot(database, source_redis, layout["config"])
    assert counts == {t: expected_rows[t] for t in TABLES}
    assert config["app.yaml"][1] == "queues: 3\nsecret_ref: vault://x\n"
    assert source_redis.client(0).get("queue:0:counter") == b"42"

    extracted = tmp_path / f"logs{suffix}"
    out = run_cli(with_key, "extract", backup_id, "logs", "-o", str(extracted))
    assert out.returncode == 0, out.stdout + out.stderr
    magic = b"\x1f\x8b" if compression == "gzip" else b"\x28\xb5\x2f\xfd"
    assert extracted.read_bytes()[: len(magic)] == magic  # the plaintext archive, decrypted on the fly
    content = manifest["components"]["logs"]["content"]
    unpack = "gzip" if compression == "gzip" else "zstd"
    inflated = subprocess.run([unpack, "-dc", str(extracted)], capture_output=True, check=True).stdout
    assert hashlib.sha256(inflated).hexdigest() == content["sha256"]

    everything = worker.log_text() + made.stdout + made.stderr + keyless.stdout + good.stdout
    everything += refused.stdout + refused.stderr + wrong.stdout + wrong.stderr + restored.stdout
    for secret in SECRETS:
        assert secret not in everything
