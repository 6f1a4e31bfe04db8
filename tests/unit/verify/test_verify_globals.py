"""globals.sql, the database component's second member: staged, bundled after database.sql, checked
by verify against the manifest's database facts, and extracted beside database.sql (or alone) only
once its checksums match; a backup without it (made before roles were backed up) still reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.verify.test_verify import (
    BACKUP_ID,
    Backup,
    checks_of,
    failed,
    make_backup,
    manifest_of,
    put,
    write_manifest,
)
from vq_tasks.backup.bundle import BundleWriter
from vq_tasks.backup.roles import with_globals
from vq_tasks.backup.staging import StagingArea, stage_member
from vq_tasks.errors import PermanentError
from vq_tasks.manifest import BUNDLED, GLOBALS_MEMBER, Checksums, DatabaseFacts, GlobalsFacts, bundle_name
from vq_tasks.restore.extract import extract_one, extract_to, globals_file
from vq_tasks.streams.stages import Writer

ROLES = b"--\n-- PostgreSQL database cluster dump\n--\n\nCREATE ROLE app;\nALTER ROLE app WITH LOGIN;\n"


def with_roles(tmp_path: Path, compression: str = "gzip") -> Backup:
    """A backup whose database part carries globals.sql, bundled as finalize does."""
    backup = make_backup(tmp_path, compression)  # type: ignore[arg-type]
    settings = backup.settings
    area = StagingArea(settings.backup_staging_dir, BACKUP_ID)
    staged, _ = stage_member(settings, area, "globals", GLOBALS_MEMBER, lambda out: out.write(ROLES))
    facts = GlobalsFacts(content=staged.content, roles=["app"], passwords=False)
    parts = {**backup.parts, "database": with_globals(backup.parts["database"], staged, facts)}

    def write_bundle(out: Writer) -> None:
        bundle = BundleWriter(out, settings.compression, backup.manifest.started_at)
        for component in BUNDLED:
            for member in [parts[component], *parts[component].extras]:
                bundle.add(member)
        bundle.close()

    bundle = put(backup.storage, bundle_name(BACKUP_ID, settings.compression), write_bundle)
    manifest = manifest_of(parts, bundle, backup.manifest.files[1], settings.compression)
    write_manifest(backup.storage, manifest)
    return Backup(settings, backup.storage, parts, manifest)


def database_facts(backup: Backup) -> DatabaseFacts:
    facts = backup.manifest.components["database"].facts
    assert isinstance(facts, DatabaseFacts)
    return facts


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_verify_checks_globals_sql_with_the_database(tmp_path, compression):
    backup = with_roles(tmp_path, compression)
    report = backup.verify()
    assert report.ok, failed(report)
    checks = checks_of(report)
    assert {("database", f"{GLOBALS_MEMBER} {c}") for c in ("size", "md5", "sha256")} <= set(checks)
    assert checks[(backup.bundle.name, "members")].expected == "entries: 4"


def test_a_globals_sql_that_is_not_the_manifests_fails_verify_and_is_never_extracted(tmp_path):
    backup = with_roles(tmp_path)
    facts = database_facts(backup)
    assert facts.globals is not None
    wrong = Checksums(size=facts.globals.content.size, md5="0" * 32, sha256="0" * 64)
    forged = facts.model_copy(update={"globals": facts.globals.model_copy(update={"content": wrong})})
    entry = backup.manifest.components["database"].model_copy(update={"facts": forged})
    manifest = backup.manifest.model_copy(
        update={"components": {**backup.manifest.components, "database": entry}}
    )
    write_manifest(backup.storage, manifest)

    assert failed(backup.verify()) == {
        ("database", f"{GLOBALS_MEMBER} md5"),
        ("database", f"{GLOBALS_MEMBER} sha256"),
    }
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PermanentError, match=r"globals\.sql"):
        extract_to(backup.storage, manifest, {"database": out / "database.sql"}, settings=backup.settings)
    assert list(out.iterdir()) == []  # neither file is left


def test_extract_writes_globals_sql_beside_the_dump_or_alone(tmp_path):
    backup = with_roles(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    extract_to(backup.storage, backup.manifest, {"database": out / "database.sql"}, settings=backup.settings)
    assert globals_file(out / "database.sql").read_bytes() == ROLES
    assert sorted(p.name for p in out.iterdir()) == ["database.globals.sql", "database.sql"]

    alone = tmp_path / "roles.sql"
    extract_one(backup.storage, backup.manifest, "database", alone, settings=backup.settings, roles=True)
    assert alone.read_bytes() == ROLES
    dump = tmp_path / "dump.sql"
    extract_one(backup.storage, backup.manifest, "database", dump, settings=backup.settings)
    assert not globals_file(dump).exists() and sorted(p.name for p in tmp_path.glob("*.sql")) == [
        "dump.sql",
        "roles.sql",
    ]


def test_a_backup_made_before_roles_were_backed_up_still_verifies_and_says_it_has_none(tmp_path):
    backup = make_backup(tmp_path)
    assert database_facts(backup).globals is None
    assert backup.verify().ok
    with pytest.raises(PermanentError, match=r"has no globals\.sql: it holds no roles"):
        extract_one(backup.storage, backup.manifest, "database", tmp_path / "r.sql", roles=True)
    assert not (tmp_path / "r.sql").exists()


def test_a_bundle_without_the_globals_sql_its_manifest_names(tmp_path):
    backup = with_roles(tmp_path)
    parts = backup.parts

    def without_globals(out: Writer) -> None:
        bundle = BundleWriter(out, "gzip", backup.manifest.started_at)
        for component in BUNDLED:
            bundle.add(parts[component])
        bundle.close()

    bundle = put(backup.storage, backup.bundle.name, without_globals)
    write_manifest(
        backup.storage, backup.manifest.model_copy(update={"files": [bundle, backup.manifest.files[1]]})
    )
    report = backup.verify()
    assert failed(report) == {(backup.bundle.name, "members"), ("database", "present")}
    assert "missing: globals.sql" in checks_of(report)[(backup.bundle.name, "members")].actual
