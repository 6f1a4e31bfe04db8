"""The Redis that is backed up, over TLS and as an ACL user, as managed services run it: real
redis-servers listening on TLS only (tests/redis_tls.py), certificates made with openssl. A backup
loads with every key, a restore goes into a TLS Redis that wants client certificates, and a wrong
CA, a wrong server name, a missing client certificate or a port without TLS fail at once with a
message naming the setting to fix, never the password."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import fill_redis
from tests.integration.test_restore_redis import assert_same, fill_target
from tests.redis_tls import (
    Certificates,
    TLSRedisServer,
    make_ca,
    make_certificates,
    start_tls_redis,
    user_line,
)
from tests.servers import redis_settings, start_redis
from vq_tasks.clients.redis_wire import Connection, server_facts
from vq_tasks.errors import BackupError, PermanentError, TransientError
from vq_tasks.restore.redis import restore_redis
from vq_tasks.settings import Settings
from vq_tasks.sources.redis import dump_redis

pytestmark = pytest.mark.integration

USER, PASSWORD = "vq-backup", "acl-Pa$$-w0rd"  # the ACL user the backup and the restore log in as
DUMP_ONLY = "-@all +info +ping +replconf +sync"  # all a backup needs
EVERYTHING = "~* &* +@all"  # a restore's user


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def as_user(server: TLSRedisServer, **overrides: object) -> Settings:
    """Settings naming ``server`` over TLS as the ACL user, with ``overrides``."""
    return server.settings(**{"redis_username": USER, "redis_password": PASSWORD, **overrides})


def with_client_cert(certs: Certificates) -> dict[str, object]:
    return {"redis_tls_cert_file": certs.client_cert, "redis_tls_key_file": certs.client_key}


def fails_at_once(connect: Callable[[], object], kind: type[BackupError] = PermanentError) -> str:
    """Call ``connect``; return the message of the ``kind`` it raises, checked to be quick (no
    retry inside) and free of the password."""
    started = time.monotonic()
    with pytest.raises(kind) as caught:
        connect()
    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert PASSWORD not in message
    return message


class Sink:
    def write(self, data: bytes) -> None:
        pass


def both_ways(settings: Settings) -> tuple[Callable[[], object], Callable[[], object]]:
    """A backup (redis-py's INFO, then our own socket for SYNC) and a connection of our own (the
    restore's transaction) to the Redis of ``settings``."""
    return (lambda: dump_redis(settings, Sink()), lambda: Connection(settings).call("PING"))


@pytest.mark.parametrize("diskless", ["yes", "no"])
def test_a_backup_over_tls_as_an_acl_user_loads_with_every_key(
    tmp_path: Path, certs: Certificates, diskless: str
):
    users = [user_line(USER, PASSWORD, DUMP_ONLY)]
    args = ["--repl-diskless-sync", diskless]
    with start_tls_redis(tmp_path / "source", certs, users=users, args=args) as source:
        fill_redis(source)
        source.client(0).set("large", os.urandom(3 << 20))  # the RDB spans many TLS records
        rdb = tmp_path / "backup" / "redis.rdb"
        rdb.parent.mkdir()
        with open(rdb, "wb") as out:
            facts = dump_redis(as_user(source), out)
        target = "replicas sockets" if diskless == "yes" else "disk"
        assert f"Starting BGSAVE for SYNC with target: {target}" in source.log_text()
        assert facts.keys == {str(db): n for db in range(4) if (n := source.client(db).dbsize())}
        assert facts.crc64_checked and rdb.read_bytes()[:5] == b"REDIS"
        with start_redis(tmp_path / "restored", rdb_file=rdb) as restored:
            assert_same(source, restored, by_dump=True)


def test_the_acl_user_is_the_one_logged_in_and_a_wrong_password_is_named(tmp_path: Path, certs: Certificates):
    users = [user_line(USER, PASSWORD, DUMP_ONLY), f"user open on nopass {DUMP_ONLY}"]
    with start_tls_redis(tmp_path, certs, users=users) as server:
        assert server_facts(as_user(server))[0]  # the ACL user logs in
        no_password = server.settings(redis_username="open", redis_password=None)
        for attempt in both_ways(no_password):
            attempt()  # a user without a password takes any
        as_default = server.settings(redis_password=PASSWORD)  # the default user has another one
        message = fails_at_once(lambda: dump_redis(as_default, Sink()))
        assert "refused the password (REDIS_PASSWORD) or user (REDIS_USERNAME)" in message
        wrong = as_user(server, redis_password="not-" + PASSWORD)
        for attempt in both_ways(wrong):
            message = fails_at_once(attempt)
            assert "REDIS_USERNAME" in message and "not-" not in message


def test_a_restore_into_a_tls_redis_that_wants_client_certificates(tmp_path: Path, certs: Certificates):
    with (
        start_redis(tmp_path / "source") as source,
        start_tls_redis(
            tmp_path / "target", certs, users=[user_line(USER, PASSWORD, EVERYTHING)], auth_clients="yes"
        ) as target,
    ):
        fill_redis(source)
        rdb = tmp_path / "backup" / "redis.rdb"
        rdb.parent.mkdir()
        with open(rdb, "wb") as out:
            dump_redis(redis_settings(source.port), out)
        fill_target(target)
        result = restore_redis(as_user(target, **with_client_cert(certs)), rdb)
        assert_same(source, target, by_dump=True)
        assert result.removed == {"0": 3, "1": 2, "3": 2}  # fill_target's keys that fill_redis lacks
        assert result.keys == {str(db): n for db in range(4) if (n := source.client(db).dbsize())}


def test_a_wrong_ca_fails_naming_redis_tls_ca_file(tmp_path: Path, certs: Certificates):
    other_ca, _ = make_ca(tmp_path / "other", "other CA")
    with start_tls_redis(tmp_path / "server", certs, users=[user_line(USER, PASSWORD)]) as server:
        for ca in (other_ca, None):  # another CA, or the system's, which never signed the tests' CA
            settings = as_user(server, redis_tls_ca_file=ca)
            for attempt in both_ways(settings):
                message = fails_at_once(attempt)
                assert "REDIS_TLS_CA_FILE" in message and "its TLS certificate failed the check" in message
        assert server_facts(as_user(server))  # the right CA


def test_a_certificate_for_another_name_fails_naming_redis_host(tmp_path: Path):
    named = make_certificates(tmp_path / "certs", alt_names=["DNS:localhost"])  # not 127.0.0.1
    with start_tls_redis(tmp_path / "server", named, users=[user_line(USER, PASSWORD)]) as server:
        settings = as_user(server)  # REDIS_HOST=127.0.0.1
        for attempt in both_ways(settings):
            message = fails_at_once(attempt)
            assert "REDIS_HOST" in message and "not for that name" in message
        by_name = as_user(server, redis_host="localhost")
        assert server_facts(by_name)[0]
        dump_redis(by_name, Sink())


def test_a_required_client_certificate_given_works_missing_is_named(tmp_path: Path, certs: Certificates):
    users = [user_line(USER, PASSWORD, DUMP_ONLY)]
    with start_tls_redis(tmp_path, certs, users=users, auth_clients="yes") as server:
        facts = dump_redis(as_user(server, **with_client_cert(certs)), Sink())
        assert facts.crc64_checked
        without = as_user(server)
        for attempt in both_ways(without):
            # a TLS 1.3 server refuses the client after the handshake: an alert, or only a
            # closed connection, depending on which the client meets first
            message = fails_at_once(attempt, BackupError)
            assert "REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE" in message


def test_tls_to_a_plain_port_and_plain_to_a_tls_port_name_redis_tls(tmp_path: Path, certs: Certificates):
    with (
        start_redis(tmp_path / "plain", password=PASSWORD) as plain,
        start_tls_redis(tmp_path / "tls", certs) as tls,
    ):
        settings = tls.settings(redis_port=plain.port, redis_timeout=0.5)  # waits for a command
        for attempt in both_ways(settings):
            assert "REDIS_TLS" in fails_at_once(attempt, TransientError)
        plain_to_tls = redis_settings(tls.port, PASSWORD)
        assert "REDIS_TLS" in fails_at_once(lambda: dump_redis(plain_to_tls, Sink()), TransientError)


def test_celerys_own_redis_over_rediss_carries_tasks_and_run_records(certs, tmp_path):
    """The broker and result backend as a managed Redis serves them: TLS only, an ACL user."""
    from kombu import Connection as Broker

    from vq_tasks import coordination
    from vq_tasks.settings import load_settings

    users = [user_line("celery", "celery-pw")]
    with start_tls_redis(tmp_path, certs, users=users) as server:
        url = f"rediss://celery:celery-pw@localhost:{server.port}/0?ssl_cert_reqs=required&ssl_ca_certs={certs.ca}"
        settings = load_settings(celery_broker_url=url, redis_port=1)
        r = coordination.client(settings)
        r.set("vq:test", "1")
        assert r.get("vq:test") == "1" and r.acl_whoami() == "celery"
        with Broker(url) as broker, broker.SimpleQueue("vq.test") as queue:
            queue.put({"task": "vq_tasks.backup"})
            assert queue.get(timeout=5).payload == {"task": "vq_tasks.backup"}
        wrong_ca = url.replace(str(certs.ca), str(certs.client_cert))  # not a CA that signed the server
        with pytest.raises(Exception, match="certificate verify failed"):
            coordination.client(load_settings(celery_broker_url=wrong_ca, redis_port=1)).ping()
