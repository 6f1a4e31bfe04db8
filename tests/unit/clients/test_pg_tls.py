"""PostgreSQL TLS without a server: DB_SSL* become libpq's variables and psycopg's parameters (and
nothing of the worker's own PGSSL*), libpq's TLS failures become permanent errors naming the variable
to fix, and start-up checks the files and the key's privacy."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from vq_tasks.clients.pg_connect import failure
from vq_tasks.clients.pg_tools import classify_pg_error, pg_environment, tls_environment, tls_parameters
from vq_tasks.errors import PermanentError, TransientError
from vq_tasks.restore.postgres_connect import psql_failure
from vq_tasks.settings import ConfigError, Settings, load_settings
from vq_tasks.settings.checks import db_tls_problems

BASE = load_settings(
    celery_broker_url="redis://127.0.0.1:1/0", db_host="db.example.com", db_password="pw-123"
)
KEY_TEXT = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg-not-a-real-key\n"


def tls(**values: object) -> Settings:
    """BASE with DB_SSL* values, unvalidated (the checks are tested on their own)."""
    return BASE.model_copy(update=values)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A CA, a certificate and a private key (mode 600) that exist; their content is not read."""
    made = {
        "db_sslrootcert": tmp_path / "ca.crt",
        "db_sslcert": tmp_path / "c.crt",
        "db_sslkey": tmp_path / "c.key",
    }
    for path in made.values():
        path.write_text(KEY_TEXT if path.suffix == ".key" else "certificate")
    made["db_sslkey"].chmod(0o600)
    return made


# --- the environment and the parameters


def test_by_default_only_the_mode_is_given():
    assert tls_environment(BASE) == {"PGSSLMODE": "prefer"}
    assert tls_parameters(BASE) == {"sslmode": "prefer", "sslrootcert": "", "sslcert": "", "sslkey": ""}


def test_every_setting_becomes_its_libpq_variable_and_parameter(files):
    settings = tls(db_sslmode="verify-full", **files)
    assert tls_environment(settings) == {
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": str(files["db_sslrootcert"]),
        "PGSSLCERT": str(files["db_sslcert"]),
        "PGSSLKEY": str(files["db_sslkey"]),
    }
    assert tls_parameters(settings) == {
        "sslmode": "verify-full",
        "sslrootcert": str(files["db_sslrootcert"]),
        "sslcert": str(files["db_sslcert"]),
        "sslkey": str(files["db_sslkey"]),
    }


def test_the_tools_get_the_settings_and_never_the_workers_pgssl_variables(monkeypatch, files):
    for name in ("PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLCRL"):
        monkeypatch.setenv(name, "/from/the/worker")
    env = pg_environment(tls(db_sslmode="require", db_sslrootcert=files["db_sslrootcert"]))
    assert {k: v for k, v in env.items() if k.startswith("PGSSL")} == {
        "PGSSLMODE": "require",
        "PGSSLROOTCERT": str(files["db_sslrootcert"]),
    }
    assert KEY_TEXT not in "".join(env.values())  # paths, never a file's content


# --- libpq's TLS failures

HOST = 'connection to server at "db.example.com" (10.0.0.5), port 5432 failed: '


@pytest.mark.parametrize(
    ("libpq", "fix"),
    [
        (HOST + "SSL error: certificate verify failed", "not signed by a CA of DB_SSLROOTCERT (/etc/ca.pem)"),
        (
            HOST + 'server certificate for "*.rds.amazonaws.com" does not match host name "db.example.com"',
            "does not name DB_HOST db.example.com",
        ),
        (HOST + "server does not support SSL, but SSL was required", "DB_SSLMODE=verify-full requires"),
        (
            HOST
            + 'root certificate file "/root/.postgresql/root.crt" does not exist\nEither provide the file, '
            "use the system's trusted roots with sslrootcert=system, or change sslmode",
            "against DB_SSLROOTCERT (/etc/ca.pem), which cannot be read",
        ),
        (HOST + "FATAL:  connection requires a valid client certificate", "set DB_SSLCERT and DB_SSLKEY"),
        (
            HOST + 'FATAL:  certificate authentication failed for user "backup"',
            "does not name DB_USER postgres",
        ),
        (HOST + "SSL error: tlsv1 alert unknown ca", "the server refused the client certificate DB_SSLCERT"),
        (
            HOST + 'private key file "/k.pem" has group or world access; file must have permissions u=rw',
            "DB_SSLKEY (/k.pem) cannot be used",
        ),
        (HOST + 'could not open certificate file "/c.pem": No such file', "DB_SSLCERT (/c.pem)"),
        (
            HOST
            + 'FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "postgres", database "vq", '
            + "no encryption",
            "set DB_SSLMODE=verify-full and DB_SSLROOTCERT",
        ),
    ],
)
def test_a_tls_failure_is_permanent_and_names_what_to_fix(libpq, fix):
    settings = tls(db_sslmode="verify-full", db_sslrootcert=Path("/etc/ca.pem"))
    settings = settings.model_copy(update={"db_sslcert": Path("/c.pem"), "db_sslkey": Path("/k.pem")})
    for error in (
        classify_pg_error(f"pg_dump: error: {libpq} pw-123", settings),
        failure(settings, "vq", f"connection failed: {libpq} pw-123"),
        psql_failure(settings, f"psql: error: {libpq} pw-123", "vq", "vq.sql")[0],
    ):
        assert type(error) is PermanentError, error
        assert fix in str(error) and "TLS: " in str(error)
        assert "pw-123" not in str(error)


def test_a_dropped_tls_connection_stays_transient():
    error = classify_pg_error(f"pg_dump: error: {HOST}SSL SYSCALL error: EOF detected", BASE)
    assert type(error) is TransientError


def test_a_sql_error_that_quotes_tls_words_is_not_taken_for_a_tls_failure():
    error = failure(BASE, "vq", 'relation "certificate file ""x""" does not exist', sqlstate="42P01")
    assert "TLS" not in str(error)


# --- the start-up checks


def test_files_that_exist_with_a_private_key_pass(files):
    assert db_tls_problems(tls(db_sslmode="verify-full", **files)) == []


def test_missing_files_are_named(tmp_path):
    absent = {name: tmp_path / name for name in ("db_sslrootcert", "db_sslcert", "db_sslkey")}
    found = db_tls_problems(tls(**absent))
    for variable in ("DB_SSLROOTCERT", "DB_SSLCERT", "DB_SSLKEY"):
        assert any(line.startswith(f"{variable}=") and "no such file" in line for line in found), found


@pytest.mark.parametrize("alone", ["db_sslcert", "db_sslkey"])
def test_a_certificate_and_its_key_go_together(files, alone):
    assert db_tls_problems(tls(**{alone: files[alone]})) == [
        "DB_SSLCERT and DB_SSLKEY go together: set both or none"
    ]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_others_may_read_is_refused(files, mode):
    files["db_sslkey"].chmod(mode)
    [line] = db_tls_problems(tls(**files))
    assert line.startswith(f"DB_SSLKEY='{files['db_sslkey']}' (mode {mode:04o}") and "chmod 600" in line
    assert "not-a-real-key" not in line


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away takes root")
def test_a_key_of_another_user_is_refused_even_at_mode_600(files):
    nobody = pwd.getpwnam("nobody")
    os.chown(files["db_sslkey"], nobody.pw_uid, nobody.pw_gid)
    [line] = db_tls_problems(tls(**files))
    assert f"owner uid {nobody.pw_uid}" in line and "chown it to uid 0" in line


def test_verify_without_db_sslrootcert_needs_libpqs_default_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = tls(db_sslmode="verify-full")
    [line] = db_tls_problems(settings)
    assert "DB_SSLROOTCERT is unset" in line and str(tmp_path / ".postgresql" / "root.crt") in line
    (tmp_path / ".postgresql").mkdir()
    (tmp_path / ".postgresql" / "root.crt").write_text("a CA")
    assert db_tls_problems(settings) == []
    assert db_tls_problems(tls(db_sslmode="require")) == []


def test_a_pgssl_variable_that_differs_from_the_settings_is_refused(files, monkeypatch):
    monkeypatch.setenv("PGSSLMODE", "verify-full")
    monkeypatch.setenv("PGSSLROOTCERT", str(files["db_sslrootcert"]))
    found = db_tls_problems(tls(db_sslrootcert=files["db_sslrootcert"]))
    assert found == [
        "PGSSLMODE='verify-full' is in the environment but not read (pg_dump, psql and psycopg take "
        "DB_SSLMODE=prefer): set DB_SSLMODE and unset PGSSLMODE"
    ]
    assert db_tls_problems(tls(db_sslmode="verify-full", db_sslrootcert=files["db_sslrootcert"])) == []


def test_start_up_lists_the_tls_problems(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings(celery_broker_url="redis://127.0.0.1:1/0", db_sslcert=tmp_path / "absent.crt")
    assert any("DB_SSLCERT='" in line and "no such file" in line for line in caught.value.problems)
    assert "DB_SSLCERT and DB_SSLKEY go together: set both or none" in caught.value.problems
