"""Dump a Redis as ``redis-cli --rdb`` does: ask for a full resync over the replication protocol and
stream the RDB the server sends, checking it as it passes (the ``REDIS`` header and version, and the
CRC64 in its trailer) without ever holding it in memory. The protocol and the RDB checks are in
clients/.
"""

from __future__ import annotations

from collections.abc import Callable

from vq_tasks.clients.rdb import RdbCheck, RdbInfo
from vq_tasks.clients.redis_connect import auth_args
from vq_tasks.clients.redis_wire import (
    Link,
    ReplyReader,
    call,
    command,
    password_of,
    server_error,
    server_facts,
)
from vq_tasks.manifest import RedisFacts
from vq_tasks.settings import Settings
from vq_tasks.streams.stages import Writer

MARK_SIZE = 40


def dump_redis(settings: Settings, out: Writer) -> RedisFacts:
    """Stream the RDB of the Redis at settings.redis_host:redis_port into `out` and return its facts.

    Given settings naming a Redis, take its version and keys per database from INFO, then stream
    its RDB into ``out`` and return both. Raise TransientError when a retry may help (refused,
    timed out, loading, checksum mismatch), PermanentError when it cannot (password, permissions,
    not an RDB).
    """
    redis_version, keys, expires = server_facts(settings)
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
