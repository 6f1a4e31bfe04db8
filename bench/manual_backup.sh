#!/usr/bin/env bash
# The backup an operator would write by hand: dump PostgreSQL and Redis, archive the config and the
# logs, bundle the lot, checksum it. bench/run.py times it against a VQ Backup run.
#
#   manual_backup.sh DEST
#
# DEST receives <name>.tar.gz (db.sql, dump.rdb, config.tar.gz), <name>_logs.tar.gz and <name>.md5.
# Settings come from the environment, passwords included (never on the command line):
#   PGHOST PGPORT PGUSER PGDATABASE PGPASSWORD   libpq's own variables, read by pg_dump
#   REDIS_HOST REDIS_PORT REDISCLI_AUTH          the Redis to dump (REDISCLI_AUTH: its password)
#   CONFIG_DIR LOG_DIR                           absolute paths of the folders to archive
set -euo pipefail

dest=${1:?usage: manual_backup.sh DEST}
name=backup_$(date -u +%Y%m%d_%H%M%S)
mkdir -p "$dest"
work=$(mktemp -d "$dest/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

step() { echo "step: $*" >&2; }

step pg_dump
pg_dump --format=plain --no-password > "$work/db.sql"
step redis
redis-cli -h "${REDIS_HOST:-127.0.0.1}" -p "${REDIS_PORT:-6379}" --rdb "$work/dump.rdb" > /dev/null
step config
tar czf "$work/config.tar.gz" -C / "${CONFIG_DIR#/}"
step logs
tar czf "$dest/${name}_logs.tar.gz" -C / "${LOG_DIR#/}"
step bundle
tar czf "$dest/$name.tar.gz" -C "$work" db.sql dump.rdb config.tar.gz
step md5sum
(cd "$dest" && md5sum "$name.tar.gz" "${name}_logs.tar.gz" > "$name.md5")
step done
echo "$dest/$name.tar.gz"
