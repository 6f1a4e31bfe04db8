#!/usr/bin/env bash
# The restore an operator would write by hand for manual_backup.sh's files: check the checksums,
# unpack the newest backup, load the dump into a new database, start a new redis-server on the RDB
# (done when it answers PING, that is when it has loaded it), unpack the config.
#
#   manual_restore.sh SOURCE
#
# Settings come from the environment, passwords included (never on the command line):
#   PGHOST PGPORT PGUSER PGPASSWORD   libpq's own variables, read by createdb and psql
#   RESTORE_DB                        the new database to create and load
#   REDIS_DIR REDIS_PORT              folder and port of the new redis-server (it stays running,
#                                     daemonized; its pid is in REDIS_DIR/redis.pid)
#   REDIS_SERVER                      the redis-server to run (default: the one on PATH)
#   CONFIG_RESTORE_DIR                where the config files go
set -euo pipefail

src=${1:?usage: manual_restore.sh SOURCE}
sums=$(ls -t "$src"/*.md5 | head -n 1)
name=$(basename "$sums" .md5)
step() { echo "step: $*" >&2; }

step md5sum
(cd "$src" && md5sum --check --quiet "$name.md5")
work=$(mktemp -d "$src/.restore.XXXXXX")
trap 'rm -rf "$work"' EXIT
step unpack
tar xzf "$src/$name.tar.gz" -C "$work"

step database
createdb --no-password "$RESTORE_DB"
psql -X --quiet --no-password -v ON_ERROR_STOP=1 --single-transaction -d "$RESTORE_DB" \
  -f "$work/db.sql" > /dev/null

step redis
mkdir -p "$REDIS_DIR"
cp "$work/dump.rdb" "$REDIS_DIR/dump.rdb"
"${REDIS_SERVER:-redis-server}" --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$REDIS_DIR" \
  --dbfilename dump.rdb --save "" --appendonly no --daemonize yes \
  --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log"
deadline=$((SECONDS + 600))
until [ "$(redis-cli -p "$REDIS_PORT" ping 2> /dev/null)" = PONG ]; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "redis-server did not load $REDIS_DIR/dump.rdb within 600 s" >&2
    exit 1
  fi
  sleep 0.05
done

step config
mkdir -p "$CONFIG_RESTORE_DIR"
tar xzf "$work/config.tar.gz" -C "$CONFIG_RESTORE_DIR"
step done
echo "restored $name into database $RESTORE_DB and redis-server :$REDIS_PORT"
