"""PostgreSQL over TLS, as managed services ask for it: pg_dump, psql and psycopg all take DB_SSLMODE,
DB_SSLROOTCERT, DB_SSLCERT and DB_SSLKEY, and a TLS failure is a permanent error naming the variable
to fix. Against clusters of the tests' own (tests/pg_tls.py) whose pg_hba admits TLS clients only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg_tls import (
    CERT_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    Cluster,
    Pki,
    make_pki,
    postgres_bin,
    running_cluster,
)
from vq_tasks.clients.pg_connect import connect
from vq_tasks.errors import PermanentError
from vq_tasks.restore.postgres import restore_database
from vq_tasks.settings import Settings
from vq_tasks.sources.postgres import dump_database

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(postgres_bin() is None, reason="no initdb on PATH"),
]
TABLE = (
    "CREATE TABLE t (id int, note text); INSERT INTO t SELECT i, 'row ' || i FROM generate_series(1, 25) i"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def cluster(pki: Pki) -> Iterator[Cluster]:
    with running_cluster(pki) as started:
        with started.admin() as conn:
            conn.execute("CREATE DATABASE source")
        with started.admin("source") as conn:
            conn.execute(TABLE)
        yield started


@pytest.fixture(autouse=True)
def no_default_ca(tmp_path, monkeypatch):
    """No ~/.postgresql of the machine's user counts: HOME is the test's folder."""
    monkeypatch.setenv("HOME", str(tmp_path))


def with_certificate(cluster: Cluster, pki: Pki, **values: object) -> Settings:
    """verify-full with the test CA, as CERT_USER by its client certificate, changed by ``values``."""
    cert, key = pki.pair(CERT_USER)
    tls = dict(db_sslmode="verify-full", db_sslrootcert=pki.ca, db_sslcert=cert, db_sslkey=key)
    return cluster.settings(db_user=CERT_USER, db_name="source", **{**tls, **values})


def with_password(cluster: Cluster, pki: Pki, **values: object) -> Settings:
    """verify-full with the test CA, as SCRAM_USER by password (over TLS), changed by ``values``."""
    tls = dict(db_sslmode="verify-full", db_sslrootcert=pki.ca)
    login = dict(db_user=SCRAM_USER, db_password=SCRAM_PASSWORD, db_name="source")
    return cluster.settings(**{**login, **tls, **values})


def dump(settings: Settings, path: Path) -> dict[str, int]:
    with path.open("wb") as out:
        return dump_database(settings, out).tables


@pytest.mark.parametrize("login", [with_certificate, with_password], ids=["certificate", "scram"])
def test_the_dump_speaks_verify_full(cluster, pki, tmp_path, login):
    tables = dump(login(cluster, pki), tmp_path / "source.sql")
    assert tables == {"public.t": 25}
    assert "row 25" in (tmp_path / "source.sql").read_text()


def test_a_restore_loads_over_verify_full_with_a_client_certificate(cluster, pki, tmp_path):
    settings = with_certificate(cluster, pki)
    tables = dump(settings, tmp_path / "source.sql")
    target = settings.model_copy(update={"db_name": "restored"})

    result = restore_database(target, tmp_path / "source.sql", tables)  # psycopg, then psql

    assert result.database == "restored" and result.row_counts == {"public.t": 25}
    with connect(target, "restored") as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


@pytest.mark.parametrize("login", [with_certificate, with_password], ids=["certificate", "scram"])
def test_a_wrong_ca_is_a_permanent_error_naming_db_sslrootcert(cluster, pki, tmp_path, login):
    settings = login(cluster, pki, db_sslrootcert=pki.other_ca)
    errors = [failure_of(lambda: dump(settings, tmp_path / "out.sql")), failure_of(lambda: opened(settings))]
    for message in errors:
        assert "DB_SSLROOTCERT" in message and str(pki.other_ca) in message
        assert "certificate verify failed" in message
        assert_no_secret(message, pki)


def test_a_name_the_certificate_does_not_hold_names_db_host(cluster, pki, tmp_path):
    settings = with_certificate(cluster, pki, db_host="127.0.0.2")  # the server listens there too
    for message in (
        failure_of(lambda: dump(settings, tmp_path / "out.sql")),
        failure_of(lambda: opened(settings)),
    ):
        assert "does not name DB_HOST 127.0.0.2" in message and "verify-ca" not in message  # no weaker check
    assert dump(settings.model_copy(update={"db_sslmode": "verify-ca"}), tmp_path / "ok.sql")  # the CA holds


def test_the_workers_own_pgssl_variables_count_for_nothing(cluster, pki, tmp_path, monkeypatch):
    settings = with_password(cluster, pki, db_sslmode="require", db_sslrootcert=None)
    monkeypatch.setenv("PGSSLROOTCERT", str(pki.other_ca))  # libpq would check the server against it
    monkeypatch.setenv("PGSSLMODE", "disable")  # and pg_hba refuses a connection without TLS
    assert dump(settings, tmp_path / "out.sql") == {"public.t": 25}
    assert opened(settings)


def test_require_against_a_server_without_tls_names_db_sslmode(pki, tmp_path):
    with running_cluster(pki, ssl=False) as plain:
        settings = with_password(plain, pki, db_sslmode="require", db_sslrootcert=None)
        errors = [
            failure_of(lambda: dump(settings, tmp_path / "out.sql")),
            failure_of(lambda: opened(settings)),
        ]
    for message in errors:
        assert "does not offer TLS, which DB_SSLMODE=require requires" in message
        assert_no_secret(message, pki)


def opened(settings: Settings) -> bool:
    """Connect through the restore's connect() and say whether the session is over TLS."""
    with connect(settings, settings.db_name) as conn:
        return conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]


def failure_of(action) -> str:
    with pytest.raises(PermanentError) as caught:
        action()
    return str(caught.value)


def assert_no_secret(message: str, pki: Pki) -> None:
    assert SCRAM_PASSWORD not in message
    for name in (CERT_USER, SCRAM_USER):
        key_body = pki.pair(name)[1].read_text().splitlines()[1]
        assert key_body not in message
