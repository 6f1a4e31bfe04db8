"""Restore without servers: components chosen and refused, the plan of config and logs, extraction
checked against the manifest (and refused when it does not match), the integrity checks, the
health URL against a real HTTP server."""

from __future__ import annotations

import base64
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.verify.test_verify import BACKUP_ID, Backup, flip, make_backup, write_manifest
from vq_tasks.cli.main import main
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import COMPRESSIONS, TAR_SUFFIX
from vq_tasks.restore.extract import component_named, extract_one, extract_to, local_name
from vq_tasks.restore.files import restore_files
from vq_tasks.restore.integrity import files_check, health_check, keys_checks, rows_check, shown_url
from vq_tasks.restore.leftovers import owned_folder
from vq_tasks.restore.redis import RedisRestoreResult
from vq_tasks.restore.run import choose_components, restore_backup
from vq_tasks.settings import Settings


@pytest.fixture
def backup(tmp_path) -> Backup:
    return make_backup(tmp_path)


def with_targets(backup: Backup, tmp_path: Path) -> Settings:
    return backup.settings.model_copy(
        update={
            "backup_restore_config_dir": tmp_path / "restored-config",
            "backup_restore_logs_dir": tmp_path / "restored-logs",
            "backup_log_paths": [str(tmp_path / "log" / "vq")],
            "backup_config_paths": [str(tmp_path / "etc" / "vq")],
        }
    )


def leftovers(settings: Settings) -> list[str]:
    staging = settings.backup_staging_dir
    return [p.name for p in staging.iterdir() if p.name.startswith(".restore-")] if staging.exists() else []


def test_components_default_order_and_logs_only_when_named():
    assert choose_components(None) == ["database", "redis", "config"]
    assert choose_components(["logs"]) == ["logs"]
    assert choose_components("redis") == ["redis"]
    assert choose_components(["config", "database", "config", "logs"]) == ["database", "config", "logs"]


@pytest.mark.parametrize(
    ("requested", "said"),
    [
        (["databse"], "unknown component 'databse' (did you mean 'database'?)"),
        (
            ["redis", "everything"],
            "unknown component 'everything': choose from database, redis, config, logs",
        ),
        ([], "no component named"),
    ],
)
def test_unknown_or_no_components_are_refused(requested, said):
    with pytest.raises(PermanentError, match=r"choose from database, redis, config, logs") as caught:
        choose_components(requested)
    assert said in str(caught.value)


def test_the_plan_of_config_and_logs_changes_nothing(backup, tmp_path):
    settings = with_targets(backup, tmp_path)
    report = restore_backup(settings, backup.storage, "latest", ["logs", "config"])
    assert report.backup_id == BACKUP_ID and report.components == ["config", "logs"]
    assert report.verify_ok and report.ok and not report.forced and report.results is None
    config = report.plan.config
    assert config.target == str(tmp_path / "restored-config") and config.refused == []
    assert config.files == 2 and len(config.changed) == 2  # nothing there yet: every file would change
    assert report.plan.logs.files == 1 and report.plan.logs.target == str(tmp_path / "restored-logs")
    assert not (tmp_path / "restored-config").exists() and not (tmp_path / "restored-logs").exists()
    assert leftovers(settings) == []
    assert report.model_dump(mode="json")["plan"]["config"]["files"] == 2


def test_the_plan_refuses_a_logs_target_inside_the_live_logs(backup, tmp_path):
    settings = with_targets(backup, tmp_path).model_copy(
        update={"backup_restore_logs_dir": tmp_path / "log" / "vq" / "restored"}
    )
    with pytest.raises(PermanentError, match="overlaps the live logs"):
        restore_backup(settings, backup.storage, BACKUP_ID, ["logs"])
    assert leftovers(settings) == []


def test_a_damaged_bundle_is_refused_naming_the_failed_checks(backup, tmp_path):
    flip(backup.bundle, backup.bundle.stat().st_size // 2)
    settings = with_targets(backup, tmp_path)
    with pytest.raises(PermanentError, match="failed verification, nothing was restored") as caught:
        restore_backup(settings, backup.storage, BACKUP_ID, ["config"])
    assert f"{backup.bundle.name} cannot be read to its end: damaged gzip data" in str(caught.value)
    assert not (tmp_path / "restored-config").exists()
    assert hash_threads() == []


def hash_threads() -> list[str]:
    """The hashing threads still alive (a restore must end every one it started)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("hash")]


@pytest.mark.parametrize("backup_id", ["../x", "virtualqueue_backup_19990101_000000"])
def test_bad_and_unknown_ids_are_refused(backup, tmp_path, backup_id):
    with pytest.raises(PermanentError, match=r"not a backup id|no complete backup"):
        restore_backup(with_targets(backup, tmp_path), backup.storage, backup_id, ["config"])


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_extract_writes_checked_members_under_names_of_its_own(tmp_path, compression):
    backup = make_backup(tmp_path, compression)
    manifest = backup.manifest
    suffix = TAR_SUFFIX[compression]
    lines: list[str] = []
    with owned_folder(backup.settings.backup_staging_dir, ".restore-") as folder:
        assert folder.stat().st_mode & 0o777 == 0o700
        files = {c: folder / local_name(c, manifest.components[c]) for c in manifest.components}
        extract_to(backup.storage, manifest, files, lines.append)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["database.sql", "redis.rdb", f"config{suffix}", f"logs{suffix}"]
        )
        for component, path in files.items():
            assert path.stat().st_mode & 0o777 == 0o600
            if component != "logs":
                assert (
                    hashlib.sha256(path.read_bytes()).hexdigest()
                    == manifest.components[component].content.sha256
                )
        assert files["logs"].read_bytes() == backup.logs.read_bytes()  # as stored
    assert not folder.exists()
    assert hash_threads() == []  # the digests were computed on threads of their own, now ended
    assert any("database (database.sql)" in line and "checksums OK" in line for line in lines)


def test_extract_refuses_a_member_that_differs_from_the_manifest_and_removes_what_it_wrote(backup, tmp_path):
    manifest = backup.manifest.model_copy(deep=True)
    manifest.components["redis"].content.sha256 = "0" * 64
    write_manifest(backup.storage, manifest)
    out = tmp_path / "out"
    out.mkdir()
    targets = {"database": out / "database.sql", "redis": out / "redis.rdb"}
    with pytest.raises(
        PermanentError, match=r"redis \(redis.rdb\): sha256 is [0-9a-f]{64}, the manifest says 0+"
    ):
        extract_to(backup.storage, manifest, targets)
    assert list(out.iterdir()) == []
    assert hash_threads() == []


def test_extract_one_refuses_to_overwrite_and_names_components_by_member(backup, tmp_path):
    manifest = backup.manifest
    assert component_named(manifest, "database.sql") == "database"
    assert component_named(manifest, manifest.components["logs"].member) == "logs"
    with pytest.raises(PermanentError, match=r"has no component 'passwd'; it has: database \(database.sql\)"):
        component_named(manifest, "passwd")
    path = tmp_path / "dump.sql"
    extract_one(backup.storage, manifest, "database", path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest.components["database"].content.sha256
    with pytest.raises(PermanentError, match="exists; refusing to overwrite it"):
        extract_one(backup.storage, manifest, "database", path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".dump")) == []


def test_cli_extract_and_its_refusals(backup, tmp_path, monkeypatch, capsys):
    for name, value in {
        "BACKUP_STORAGE_PATH": str(backup.storage.root),
        "BACKUP_STAGING_DIR": str(backup.settings.backup_staging_dir),
        "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
    }.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "config.tar.gz"
    assert main(["extract", "latest", "config.tar.gz", "-o", str(out)]) == 0
    assert "checksums OK" in capsys.readouterr().out
    assert hashlib.sha256(out.read_bytes()).hexdigest() == backup.manifest.components["config"].content.sha256
    assert main(["extract", BACKUP_ID, "config", "-o", str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["extract", "../x", "database.sql", "-o", str(tmp_path / "x")]) == 1
    assert "not a backup id" in capsys.readouterr().err
    assert main(["restore", BACKUP_ID, "--component", "everything"]) == 1
    assert "unknown component 'everything'" in capsys.readouterr().err


def test_rows_check_names_the_tables_that_differ():
    assert rows_check({"public.a": 2, "public.b": 0}, {"public.a": 2, "public.b": 0}).ok
    check = rows_check({"public.a": 2, "public.b": 0}, {"public.a": 1, "public.c": 5})
    assert not check.ok
    assert (
        check.actual == "public.a: 1 (backup: 2); public.b: absent (backup: 0); public.c: 5 (backup: absent)"
    )


def test_keys_checks_compare_with_what_the_restore_put_there_and_report_the_manifest():
    result = RedisRestoreResult(
        target="Redis x:1",
        rdb_version=9,
        restored={"0": 8, "1": 7, "2": 0},
        expired={"0": 0, "1": 1},
        removed={"0": 3},
        keys={"0": 8, "1": 7},
        duration_seconds=0.1,
    )
    same, manifest = keys_checks(result, {"0": 8, "1": 8}, {"0": 8, "1": 7})
    assert same.ok and same.actual == "db0=8, db1=7"
    assert manifest.ok and manifest.expected == "db0=8, db1=8" and "1 expired" in manifest.actual
    assert manifest.note  # differs from the manifest: says why that may be
    assert not keys_checks(result, {"0": 8}, {"0": 8, "1": 7, "3": 1})[0].ok


def test_files_check_sees_content_modes_and_links(backup, tmp_path):
    with owned_folder(tmp_path / "staging", ".restore-") as folder:
        archive = folder / "config.tar.gz"
        extract_to(backup.storage, backup.manifest, {"config": archive})
        target = tmp_path / "restored"
        restore_files(archive, backup.manifest.components["config"].facts.roots, target)
        assert files_check("config files", archive, target).ok
        tls = target / str(tmp_path / "etc" / "vq" / "conf.d" / "tls.conf").lstrip("/")
        tls.chmod(0o600)
        check = files_check("config files", archive, target)
        assert not check.ok and "tls.conf: mode 600, backup " in check.actual
        tls.write_text("changed\n")
        assert str(tls) in files_check("config files", archive, target).actual


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            login = "Basic " + base64.b64encode(b"app:p@ss").decode()
            if self.path == "/private":
                self.send_response(200 if self.headers.get("Authorization") == login else 401)
            else:
                self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_health_check_wants_a_2xx_answer(http_server):
    assert health_check(f"{http_server}/healthz").ok
    down = health_check(f"{http_server}/down")
    assert not down.ok and down.actual == "HTTP 503"
    assert health_check(http_server.replace("//", "//app:p%40ss@") + "/private").ok
    assert health_check(f"{http_server}/private").actual == "HTTP 401"
    server_port = http_server.rsplit(":", 1)[1]
    gone = health_check(f"http://127.0.0.1:1/healthz?port={server_port}", timeout=2)
    assert not gone.ok and gone.actual.startswith("no answer")


def test_shown_url_drops_credentials_and_query():
    assert (
        shown_url("https://user:pw@app.example:8443/healthz?token=s3cret")
        == "https://app.example:8443/healthz"
    )


def test_roots_come_from_the_settings_not_the_manifest_alone(backup, tmp_path):
    from vq_tasks.restore.apply import trusted_roots

    settings = with_targets(backup, tmp_path)
    assert trusted_roots(settings, backup.manifest, "config") == [str(tmp_path / "etc" / "vq")]
    narrowed = settings.model_copy(update={"backup_config_paths": ["/etc/elsewhere"]})
    with pytest.raises(PermanentError, match="not in BACKUP_CONFIG_PATHS"):
        trusted_roots(narrowed, backup.manifest, "config")
