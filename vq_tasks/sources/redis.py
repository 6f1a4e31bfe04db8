"""Dump a Redis as ``redis-cli --rdb`` does: ask for a full resync over the replication protocol and
stream the RDB the server sends, checking it as it passes (the ``REDIS`` header and version, and the
CRC64 in its trailer) without ever holding it in memory. Where the server refuses replication (a
managed service), write a logical snapshot as an RDB instead (sources/redis_logical.py). The
protocol and the RDB checks are in clients/.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from vq_tasks.clients.rdb import RdbCheck, RdbInfo
from vq_tasks.clients.redis_connect import auth_args, redis_client
from vq_tasks.clients.redis_wire import (
    Link,
    ReplicationRefused,
    ReplyReader,
    ServerFacts,
    call,
    command,
    password_of,
    server_error,
    server_facts,
)
from vq_tasks.manifest import RedisFacts
from vq_tasks.settings import Settings
from vq_tasks.sources.redis_logical import logical_snapshot
from vq_tasks.streams.stages import TapStage, Writer

MARK_SIZE = 40
logger = logging.getLogger(__name__)


def dump_redis(settings: Settings, out: Writer) -> RedisFacts:
    """Write the RDB of the Redis at REDIS_HOST:REDIS_PORT into ``out`` and return its facts, by
    REDIS_BACKUP_METHOD: ``sync`` the server's own RDB over the replication protocol (one point in
    time), ``dump`` a logical snapshot written as an RDB (sources/redis_logical.py), ``auto`` SYNC
    where the server allows it, else the snapshot. One log line says which. Raise TransientError
    when a retry may help (refused, timed out, loading, checksum mismatch), PermanentError when it
    cannot (password, permissions, not an RDB)."""
    server = server_facts(settings)
    method = settings.redis_backup_method
    if method != "dump":
        written: set[bool] = set()  # {True} once a byte of the RDB went to ``out``
        try:
            facts = sync_rdb(settings, TapStage(out, lambda _: written.add(True)), server)
        except ReplicationRefused as refused:
            if method == "sync" or written:  # the snapshot must never follow part of an RDB in ``out``
                raise
            logger.warning("Redis backup: a logical snapshot (REDIS_BACKUP_METHOD=auto): %s", refused)
        else:
            logger.info("Redis backup: the server's RDB over SYNC (REDIS_BACKUP_METHOD=%s)", method)
            return facts
    else:
        logger.info("Redis backup: a logical snapshot (REDIS_BACKUP_METHOD=dump)")
    return logical_rdb(settings, out, server)


def sync_rdb(settings: Settings, out: Writer, server: ServerFacts) -> RedisFacts:
    """Stream the server's RDB over the replication protocol into ``out``, checking it on the way."""
    redis_version, keys, expires = server
    password = password_of(settings)
    link = Link(settings)
    try:
        reader = ReplyReader(link.recv_into, link.where, secrets=[password] if password else [])
        request_rdb(link.send, reader, password, settings.redis_username)
        rdb = read_rdb(reader, out)
    finally:
        link.close()  # without rdb-only, the server would go on streaming its commands
    return RedisFacts(
        redis_version=redis_version,
        rdb_version=rdb.rdb_version,
        keys=keys,
        expires=expires,
        crc64_checked=rdb.crc64_checked,
    )


def logical_rdb(settings: Settings, out: Writer, server: ServerFacts) -> RedisFacts:
    """Write a logical snapshot of every database INFO lists into ``out`` as an RDB. It is not one
    point in time: the manifest records how long it took and the keys that vanished meanwhile."""
    clients: dict[int, redis.Redis] = {}

    def client_for(db: int) -> redis.Redis:
        return clients.setdefault(db, redis_client(settings, db))

    try:
        databases = sorted(int(db) for db in server[1]) or [0]
        facts = logical_snapshot(client_for, databases, out, server=server)
    finally:
        for client in clients.values():
            client.close()
    return RedisFacts(
        redis_version=facts.redis_version,
        rdb_version=facts.rdb_version,
        keys=facts.keys,
        expires=facts.expires,
        crc64_checked=True,  # written with its CRC64 (each batch's first payload's own checked)
        method="dump",
        snapshot_seconds=round(facts.seconds, 3),
        keys_vanished=facts.vanished,
        keys_repeated=facts.duplicates,
        functions=facts.functions,
    )


def request_rdb(
    send: Callable[[bytes], object], reader: ReplyReader, password: str | None, username: str | None = None
) -> None:
    """Given a way to send to a Redis and a reader of its replies, authenticate if ``password``
    or ``username`` (an ACL user) is given, then ask for a full resync: diskless if the server is
    set so, and the RDB only, with no command stream after it (older servers refuse that option,
    which is harmless). Raise the server's error as server_error classifies it, never with the
    password (the reader's secrets)."""
    login = auth_args(username, password)
    if login:
        call(send, reader, *login)
    call(send, reader, "REPLCONF", "capa", "eof")
    call(send, reader, "REPLCONF", "rdb-only", "1", optional=True)
    send(command("SYNC"))


def read_rdb(reader: ReplyReader, out: Writer) -> RdbInfo:
    """Given a reader at the reply to SYNC, stream the RDB it announces into ``out`` in chunks of
    at most the reader's buffer size, checking it on the way, and return its version, whether its
    CRC64 was checked, and its size. Raise as RdbCheck and ReplyReader do, or the server's error."""
    line = reader.line()
    if line.startswith(b"-"):
        raise server_error(line[1:].decode(errors="replace"), reader.where, reader.secrets)
    if line.startswith(b"$EOF:") and len(line) == 5 + MARK_SIZE:
        chunks = reader.until_mark(line[5:])  # diskless: the end is marked, the size unknown
    elif line.startswith(b"$") and line[1:].isdigit():
        chunks = reader.exactly(int(line[1:]))
    else:
        raise reader.unexpected(line)
    check = RdbCheck(reader.where)
    for view in chunks:
        data = bytes(view)
        check.feed(data)
        out.write(data)
    return check.finish()
