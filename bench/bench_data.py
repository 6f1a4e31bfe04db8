"""Data for the benchmarks: a PostgreSQL database of a requested size, an application Redis full of
keys of every type, and config and log folders.

The database looks like the Virtual Queue's (customers, tickets, events, attachments) and is not
absurdly compressible: text is drawn from a word list, jsonb holds numbers, words and md5 strings,
bytea is part random (pgcrypto's ``gen_random_bytes``) and part repeated file headers. Its plain
dump compresses about 3:1 with gzip -6, not 1000:1 as pgbench's padding does. Rows are generated
on the server with ``generate_series``, in batches, until ``pg_database_size`` reaches the target.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import redis

DB_NAME = "vq_bench"
MARKER = "vq-bench size-gb={size_gb:g}"
SIZE_TOLERANCE = 0.05
BATCH_ROWS = {"customers": 10_000, "tickets": 25_000, "events": 50_000, "attachments": 2_500}

SCHEMA = """
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE TYPE ticket_state AS ENUM ('waiting', 'called', 'served', 'left');
CREATE TABLE queues (
  id serial PRIMARY KEY, name text NOT NULL, site text, opened_at timestamptz DEFAULT now()
);
CREATE TABLE customers (
  id bigserial PRIMARY KEY, name text, email text, phone text, profile jsonb, created_at timestamptz
);
CREATE TABLE tickets (
  id bigserial PRIMARY KEY, queue_id int REFERENCES queues, customer_id bigint, state ticket_state NOT NULL,
  note text, photo bytea, issued_at timestamptz NOT NULL
);
CREATE TABLE events (
  id bigserial PRIMARY KEY, ticket_id bigint, kind text, payload jsonb, created_at timestamptz
);
CREATE TABLE attachments (
  id bigserial PRIMARY KEY, ticket_id bigint, filename text, mime text, content bytea
);
CREATE FUNCTION bench_words(n int) RETURNS text LANGUAGE sql VOLATILE AS $$
  SELECT string_agg(w[1 + floor(random() * array_length(w, 1))::int], ' ')
  FROM generate_series(1, n), (SELECT ARRAY[
    'queue', 'ticket', 'customer', 'called', 'waiting', 'served', 'desk', 'counter', 'pharmacy',
    'appointment', 'visitor', 'display', 'please', 'wait', 'your', 'turn', 'number', 'service', 'window',
    'front', 'reception', 'delay', 'minutes', 'estimated', 'priority', 'senior', 'family', 'doctor',
    'payment', 'refund', 'question', 'information', 'help', 'closed', 'opened', 'room', 'floor',
    'building', 'north', 'south', 'east', 'west', 'morning', 'afternoon', 'evening', 'today', 'tomorrow',
    'status', 'update', 'message', 'sms', 'email', 'kiosk', 'badge', 'Zoë', 'Müller', 'François',
    'caisse', '窓口', 'guichet', 'attente'
  ]) AS words(w)
$$;
INSERT INTO queues (name, site) SELECT 'Queue ' || i, bench_words(3) FROM generate_series(1, 50) i;
"""

INSERT_CUSTOMERS = """
INSERT INTO customers (name, email, phone, profile, created_at)
SELECT initcap(bench_words(2)),
  substr(md5(random()::text), 1, 10) || '@example.' || (ARRAY['com', 'org', 'fr', 'de'])[1 + i %% 4],
  '+1-555-' || lpad((random() * 9999999)::int::text, 7, '0'),
  jsonb_build_object('visits', (random() * 200)::int, 'lang', (ARRAY['en', 'fr', 'de', 'ja'])[1 + i %% 4],
    'tags', to_jsonb(string_to_array(bench_words(3), ' ')),
    'notify', jsonb_build_object('sms', random() < 0.5, 'email', random() < 0.7),
    'device', md5(random()::text), 'note', bench_words(8)),
  now() - random() * interval '3 years'
FROM generate_series(1, %(rows)s) i
"""

INSERT_TICKETS = """
INSERT INTO tickets (queue_id, customer_id, state, note, photo, issued_at)
SELECT 1 + i %% 50, 1 + (random() * 1e6)::int,
  (ARRAY['waiting', 'called', 'served', 'left'])[1 + i %% 4]::ticket_state,
  CASE WHEN i %% 7 = 0 THEN NULL ELSE bench_words(5 + i %% 15) || E'\\n' || md5(i::text) END,
  CASE WHEN i %% 3 = 0 THEN NULL
    ELSE gen_random_bytes(96) || decode(repeat('ffd8ffe000104a464946', 8), 'hex') || gen_random_bytes(64) END,
  now() - random() * interval '2 years'
FROM generate_series(1, %(rows)s) i
"""

INSERT_EVENTS = """
INSERT INTO events (ticket_id, kind, payload, created_at)
SELECT 1 + (random() * 1e6)::int,
  (ARRAY['issued', 'called', 'recalled', 'served', 'left', 'moved'])[1 + i %% 6],
  jsonb_build_object('seq', i, 'desk', 1 + i %% 40, 'agent', substr(md5(random()::text), 1, 12),
    'wait_s', round((random() * 3600)::numeric, 1), 'lat', round((48 + random())::numeric, 6),
    'lon', round((2 + random())::numeric, 6), 'ua', bench_words(4)),
  now() - random() * interval '2 years'
FROM generate_series(1, %(rows)s) i
"""

INSERT_ATTACHMENTS = """
INSERT INTO attachments (ticket_id, filename, mime, content)
SELECT 1 + (random() * 1e6)::int, 'scan-' || i || '.pdf', 'application/pdf',
  decode(repeat('255044462d312e370a', 20), 'hex') || gen_random_bytes(1024) || gen_random_bytes(1024)
    || convert_to(repeat(bench_words(40) || E'\\n', 4), 'UTF8')
FROM generate_series(1, %(rows)s) i
"""

INSERTS = {
    "customers": INSERT_CUSTOMERS,
    "tickets": INSERT_TICKETS,
    "events": INSERT_EVENTS,
    "attachments": INSERT_ATTACHMENTS,
}


@dataclass
class PgServer:
    """Where the benchmark's database lives (trust authentication: no password)."""

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        """Return an autocommit connection to ``dbname``."""
        return psycopg.connect(host=self.host, port=self.port, user=self.user, dbname=dbname, autocommit=True)


@dataclass
class DatabaseInfo:
    """The database that was backed up and how it was made."""

    name: str
    size_bytes: int
    reused: bool
    generation_seconds: float | None
    rounds: int | None
    rows: dict[str, int]
    server_version: str


def database_size(pg: PgServer, name: str = DB_NAME) -> int | None:
    """Return ``pg_database_size`` of ``name``, or None if there is no such database."""
    with pg.connect() as conn:
        row = conn.execute("SELECT pg_database_size(datname) FROM pg_database WHERE datname = %s", (name,))
        found = row.fetchone()
    return int(found[0]) if found else None


def reusable(pg: PgServer, size_gb: float) -> bool:
    """Whether vq_bench exists, was completely generated for ``size_gb``, and has about that size."""
    size = database_size(pg)
    if size is None:
        return False
    with pg.connect() as conn:
        comment = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (DB_NAME,)
        ).fetchone()[0]
    target = size_gb * (1 << 30)
    return comment == MARKER.format(size_gb=size_gb) and abs(size - target) <= SIZE_TOLERANCE * target


def drop_database(pg: PgServer) -> None:
    """Drop vq_bench, disconnecting whoever is still connected."""
    with pg.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


def generate_database(pg: PgServer, size_gb: float) -> DatabaseInfo:
    """(Re)create vq_bench and fill it to ``size_gb`` GiB; return what was made and how long it took."""
    started = time.monotonic()
    drop_database(pg)
    with pg.connect() as conn:
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    with pg.connect(DB_NAME) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(SCHEMA)
        rounds = fill_to_size(conn, int(size_gb * (1 << 30)))
        conn.execute("DROP FUNCTION bench_words(int)")
        conn.execute("VACUUM (ANALYZE)")
        conn.execute(f"COMMENT ON DATABASE \"{DB_NAME}\" IS '{MARKER.format(size_gb=size_gb)}'")
    info = describe_database(pg, reused=False, rounds=rounds)
    info.generation_seconds = round(time.monotonic() - started, 1)
    return info


def fill_to_size(conn: psycopg.Connection, target: int) -> int:
    """Insert batches of rows into every table until the database holds ``target`` bytes; the last
    batch is shrunk to land near the target. Return the number of batches."""
    rounds, growth = 0, 0
    size = _current_size(conn)
    while size < target:
        fraction = min(1.0, (target - size) / growth) if growth else 1.0
        for table, rows in BATCH_ROWS.items():
            conn.execute(INSERTS[table], {"rows": max(1, int(rows * fraction))})
        rounds += 1
        new_size = _current_size(conn)
        growth = max(new_size - size, growth) if fraction == 1.0 else growth
        size = new_size
        print(f"  batch {rounds}: {size / (1 << 20):.0f} MiB of {target / (1 << 20):.0f} MiB", flush=True)
    return rounds


def _current_size(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])


def describe_database(pg: PgServer, reused: bool, rounds: int | None = None) -> DatabaseInfo:
    """Return the size, rows per table and server version of vq_bench."""
    with pg.connect(DB_NAME) as conn:
        rows = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("queues", *INSERTS)}
        version = conn.execute("SHOW server_version").fetchone()[0]
        size = _current_size(conn)
    return DatabaseInfo(DB_NAME, size, reused, None, rounds, rows, version)


def fill_app_redis(client: redis.Redis, keys: int, seed: int = 1) -> dict[str, int]:
    """Write ``keys`` keys of mixed types (strings, hashes, lists, sets, sorted sets, streams, some
    with a TTL) into database 0; return how many of each type."""
    rng = random.Random(seed)
    kinds = ["string"] * 50 + ["hash"] * 20 + ["list"] * 10 + ["set"] * 10 + ["zset"] * 6 + ["stream"] * 4
    counts: dict[str, int] = dict.fromkeys(sorted(set(kinds)), 0)
    pipe = client.pipeline(transaction=False)
    for i in range(keys):
        kind = rng.choice(kinds)
        counts[kind] += 1
        _write_key(pipe, rng, kind, i)
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()
    return counts


def _write_key(pipe: redis.client.Pipeline, rng: random.Random, kind: str, i: int) -> None:
    token = rng.randbytes(12).hex()
    if kind == "string":
        ttl = 3600 if i % 10 == 0 else None
        value = f'{{"ticket": {i}, "token": "{token}", "eta": {rng.random() * 900:.1f}, "desk": {i % 40}}}'
        pipe.set(f"session:{i}:{token[:6]}", value, ex=ttl)
    elif kind == "hash":
        fields = {"state": rng.choice(["waiting", "called", "served"]), "name": f"Customer {i}"}
        pipe.hset(f"ticket:{i}", mapping={**fields, "token": token, "queue": i % 50, "issued": i * 37})
    elif kind == "list":
        pipe.rpush(f"queue:{i}:waiting", *[f"t{rng.randrange(10**7)}" for _ in range(10)])
    elif kind == "set":
        pipe.sadd(f"open:{i}", *[rng.randbytes(4).hex() for _ in range(8)])
    elif kind == "zset":
        pipe.zadd(f"eta:{i}", {f"t{rng.randrange(10**7)}": rng.random() * 900 for _ in range(8)})
    else:
        pipe.xadd(f"events:{i}", {"kind": "called", "ticket": str(i), "token": token})


LOG_LINES = (
    "INFO  queue.api     GET /api/queues/{q}/tickets 200 {ms}ms req={token}",
    "INFO  queue.notify  sms sent to ticket {t} (desk {d}) id={token}",
    "WARN  queue.display display {d} reconnected after {ms}ms",
    "DEBUG queue.eta     recomputed eta for queue {q}: {ms}s over {t} tickets",
    "ERROR queue.api     POST /api/tickets 503 upstream timeout after {ms}ms req={token}",
)


def make_files(root: Path, log_mb: float, seed: int = 2) -> dict[str, Path]:
    """Create a config folder (a few small files, a symlink) and a log folder of about ``log_mb``
    MiB of realistic log lines under ``root``; return their paths."""
    config = root / "etc" / "virtualqueue"
    (config / "conf.d").mkdir(parents=True)
    (config / "app.yaml").write_text("queues: 50\ndisplays: 40\nsecret_ref: vault://vq/app\n" * 20)
    (config / "conf.d" / "tls.conf").write_text("ciphers HIGH:!aNULL\nprotocols TLSv1.2 TLSv1.3\n")
    (config / "conf.d" / "desks.conf").write_text("".join(f"desk {d} floor {d % 4}\n" for d in range(40)))
    (config / "current.yaml").symlink_to("app.yaml")
    logs = root / "log" / "virtualqueue"
    logs.mkdir(parents=True)
    rng = random.Random(seed)
    names = ("app.log", "app.log.1", "api.log", "notify.log")
    for name in names:
        _write_log(logs / name, int(log_mb * (1 << 20) / len(names)), rng)
    return {"config": config, "logs": logs}


def _write_log(path: Path, size: int, rng: random.Random) -> None:
    start = datetime.now(UTC) - timedelta(days=2)
    lines, written, second = [], 0, 0
    while written < size:
        second += rng.randrange(3)
        template = rng.choice(LOG_LINES)
        text = template.format(
            q=rng.randrange(50),
            t=rng.randrange(10**6),
            d=rng.randrange(40),
            ms=rng.randrange(2000),
            token=rng.randbytes(8).hex(),
        )
        line = f"{(start + timedelta(seconds=second)).isoformat(timespec='milliseconds')} {text}\n"
        lines.append(line)
        written += len(line)
    path.write_text("".join(lines))
    os.utime(path)
