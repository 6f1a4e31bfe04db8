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


def reusable(pg: PgServer, size_gb: float, name: str = DB_NAME) -> bool:
    """Whether database ``name`` exists, was completely generated for ``size_gb``, and has about
    that size."""
    size = database_size(pg, name)
    if size is None:
        return False
    with pg.connect() as conn:
        comment = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()[0]
    target = size_gb * (1 << 30)
    return comment == MARKER.format(size_gb=size_gb) and abs(size - target) <= SIZE_TOLERANCE * target


def drop_database(pg: PgServer, name: str = DB_NAME) -> None:
    """Drop database ``name`` (vq_bench), disconnecting whoever is still connected."""
    with pg.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def generate_database(pg: PgServer, size_gb: float, name: str = DB_NAME) -> DatabaseInfo:
    """(Re)create database ``name`` (vq_bench) and fill it to ``size_gb`` GiB; return what was made
    and how long it took."""
    started = time.monotonic()
    drop_database(pg, name)
    with pg.connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    with pg.connect(name) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(SCHEMA)
        rounds = fill_to_size(conn, int(size_gb * (1 << 30)))
        conn.execute("DROP FUNCTION bench_words(int)")
        conn.execute("VACUUM (ANALYZE)")
        conn.execute(f"COMMENT ON DATABASE \"{name}\" IS '{MARKER.format(size_gb=size_gb)}'")
    info = describe_database(pg, reused=False, rounds=rounds, name=name)
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


def describe_database(
    pg: PgServer, reused: bool, rounds: int | None = None, name: str = DB_NAME
) -> DatabaseInfo:
    """Return the size, rows per table and server version of database ``name`` (vq_bench)."""
    with pg.connect(name) as conn:
        rows = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("queues", *INSERTS)}
        version = conn.execute("SHOW server_version").fetchone()[0]
        size = _current_size(conn)
    return DatabaseInfo(name, size, reused, None, rounds, rows, version)


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


FILL_LUA = """
local first, count = tonumber(ARGV[1]), tonumber(ARGV[2])
math.randomseed(tonumber(ARGV[3]))
local states = {'waiting', 'called', 'served', 'left'}
local counts = {0, 0, 0, 0, 0, 0}
local function hex(groups)
  local parts = {}
  for j = 1, groups do parts[j] = string.format('%06x', math.random(0, 16777215)) end
  return table.concat(parts)
end
for i = first, first + count - 1 do
  local r, token = math.random(100), hex(4)
  if r <= 50 then
    local key = 'session:' .. i .. ':' .. string.sub(token, 1, 6)
    local value = string.format('{"ticket": %d, "token": "%s", "eta": %.1f, "desk": %d}',
      i, token, math.random() * 900, i % 40)
    if i % 10 == 0 then redis.call('SET', key, value, 'EX', 2592000) else redis.call('SET', key, value) end
    counts[1] = counts[1] + 1
  elseif r <= 70 then
    redis.call('HSET', 'ticket:' .. i, 'state', states[math.random(4)], 'name', 'Customer ' .. i,
      'token', token, 'queue', i % 50, 'issued', i * 37)
    counts[2] = counts[2] + 1
  elseif r <= 80 then
    local items = {}
    for j = 1, 10 do items[j] = 't' .. math.random(0, 9999999) end
    redis.call('RPUSH', 'queue:' .. i .. ':waiting', unpack(items))
    counts[3] = counts[3] + 1
  elseif r <= 90 then
    local members = {}
    for j = 1, 8 do members[j] = hex(1) end
    redis.call('SADD', 'open:' .. i, unpack(members))
    counts[4] = counts[4] + 1
  elseif r <= 96 then
    local scored = {}
    for j = 1, 8 do
      scored[2 * j - 1] = string.format('%.2f', math.random() * 900)
      scored[2 * j] = 't' .. math.random(0, 9999999)
    end
    redis.call('ZADD', 'eta:' .. i, unpack(scored))
    counts[5] = counts[5] + 1
  else
    redis.call('XADD', 'events:' .. i, '*', 'kind', 'called', 'ticket', tostring(i), 'token', token)
    counts[6] = counts[6] + 1
  end
end
return counts
"""
KEY_TYPES = ("string", "hash", "list", "set", "zset", "stream")


def fill_app_redis_fast(client: redis.Redis, keys: int, seed: int = 1, batch: int = 50_000) -> dict[str, int]:
    """Write ``keys`` keys of mixed types into database 0 as fill_app_redis does (half strings, a
    tenth of them with a 30-day TTL; hashes, lists, sets, sorted sets, streams), generated on the
    server by a Lua script in batches of ``batch`` keys: a million keys take seconds, not minutes.
    Return how many of each type."""
    script = client.register_script(FILL_LUA)
    counts = dict.fromkeys(KEY_TYPES, 0)
    for number, first in enumerate(range(0, keys, batch)):
        made = script(args=[first, min(batch, keys - first), seed * 100_003 + number])
        for kind, count in zip(KEY_TYPES, made, strict=True):
            counts[kind] += int(count)
    return counts


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
    config = make_config(root)
    logs = root / "log" / "virtualqueue"
    logs.mkdir(parents=True)
    rng = random.Random(seed)
    names = ("app.log", "app.log.1", "api.log", "notify.log")
    for name in names:
        _write_log(logs / name, int(log_mb * (1 << 20) / len(names)), rng)
    return {"config": config, "logs": logs}


def make_config(root: Path) -> Path:
    """Create the config folder root/etc/virtualqueue (a few small files, a symlink); return it."""
    config = root / "etc" / "virtualqueue"
    (config / "conf.d").mkdir(parents=True)
    (config / "app.yaml").write_text("queues: 50\ndisplays: 40\nsecret_ref: vault://vq/app\n" * 20)
    (config / "conf.d" / "tls.conf").write_text("ciphers HIGH:!aNULL\nprotocols TLSv1.2 TLSv1.3\n")
    (config / "conf.d" / "desks.conf").write_text("".join(f"desk {d} floor {d % 4}\n" for d in range(40)))
    (config / "current.yaml").symlink_to("app.yaml")
    return config


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


MORE_LOG_LINES = (
    'INFO  queue.http    {ip} - "GET /api/displays/{d}/state HTTP/1.1" 200 {size} "{agent}" {ms}ms',
    "INFO  queue.worker  task notify_customer[{uuid}] succeeded in {sec:.3f}s",
    "WARN  queue.db      slow query ({ms}ms): SELECT * FROM tickets WHERE queue_id = {q} AND state = 'left'",
    "INFO  queue.auth    agent{d}@site{q}.example.org signed in from {ip}",
)
AGENTS = ("Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0", "VQ-Kiosk/3.2 (Android 12)", "curl/7.88.1")
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/app/queue/api.py", line {line}, in create_ticket\n'
    "    ticket = service.issue(queue_id={q}, customer_id={t})\n"
    "TimeoutError: upstream did not answer within 5s (req={token})\n"
)
LOG_FILE_BYTES = 64 << 20


def write_logs(folder: Path, total_bytes: int, seed: int = 2) -> list[Path]:
    """Write about ``total_bytes`` of application log lines under ``folder`` in rotated files of at
    most 64 MiB (app.log, app.log.1, ...): timestamps a few milliseconds apart, a dozen kinds of
    line with ids, addresses, durations and the odd traceback. Like real logs they compress about
    5:1, and no two lines are alike. Return the files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    count = max(1, -(-total_bytes // LOG_FILE_BYTES))
    clock = datetime.now(UTC) - timedelta(days=1)
    paths = [folder / ("app.log" if n == 0 else f"app.log.{n}") for n in range(count)]
    for path in reversed(paths):  # the oldest rotation first, so that time runs on
        clock = _write_log_file(path, total_bytes // count, rng, clock)
    return paths


def _write_log_file(path: Path, size: int, rng: random.Random, clock: datetime) -> datetime:
    templates = LOG_LINES + MORE_LOG_LINES
    written = 0
    with open(path, "w") as out:
        while written < size:
            lines = []
            for _ in range(5000):
                clock += timedelta(microseconds=rng.randrange(40_000))
                lines.append(f"{clock.isoformat(timespec='milliseconds')} {_log_text(rng, templates)}\n")
            chunk = "".join(lines)
            out.write(chunk)
            written += len(chunk)
    return clock


def _log_text(rng: random.Random, templates: tuple[str, ...]) -> str:
    values = {
        "q": rng.randrange(50),
        "t": rng.randrange(10**6),
        "d": rng.randrange(40),
        "ms": rng.randrange(2000),
        "token": f"{rng.getrandbits(64):016x}",
        "ip": f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(256)}",
        "size": rng.randrange(200, 9000),
        "agent": rng.choice(AGENTS),
        "uuid": f"{rng.getrandbits(128):032x}",
        "sec": rng.random() * 3,
        "line": rng.randrange(40, 400),
    }
    text = rng.choice(templates).format(**values)
    if text.startswith("ERROR") and rng.random() < 0.3:
        text += "\n" + TRACEBACK.format(**values).rstrip("\n")
    return text
