#!/bin/sh
# /scripts/restore.sh FILE [--force]: the operators' guide's restore command, kept as a thin
# wrapper around `vq-backup restore`. FILE is a backup's file name or path (the bundle, its logs
# archive or its manifest), its id, or `latest`:
#   virtualqueue_backup_20240115_020000.tar.gz  ->  id virtualqueue_backup_20240115_020000
# Without --force: verify the backup and print the restore plan; nothing changes.
# With --force: restore database, Redis and config files at once (no question asked) and print
# the integrity report. Exit 0 on success, 1 if the restore failed, 2 on bad arguments.
set -eu

usage() {
  echo "usage: $0 FILE [--force]"
  echo "  FILE     a backup file name or path (virtualqueue_backup_20240115_020000.tar.gz),"
  echo "           a backup id (virtualqueue_backup_20240115_020000) or 'latest'"
  echo "  --force  restore now; without it, only verify and print the plan"
  echo "  'vq-backup list' shows the backups in storage"
}
fail() {
  echo "$0: $1" >&2
  usage >&2
  exit 2
}

file="" force=""
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) fail "unknown option $arg" ;;
    *)
      [ -z "$file" ] || fail "more than one FILE given"
      file="$arg"
      ;;
  esac
done
[ -n "$file" ] || fail "FILE is missing"

if [ "$file" = latest ]; then
  id=latest
else
  # The id is the file's name up to its timestamp: PREFIX_YYYYMMDD_HHMMSS.
  id=$(basename -- "$file" | sed -n 's/^\([A-Za-z0-9][A-Za-z0-9_-]*_[0-9]\{8\}_[0-9]\{6\}\)\([._].*\)\{0,1\}$/\1/p')
  [ -n "$id" ] || fail "$file is not a backup file name or id"
fi

if [ -n "$force" ]; then
  exec vq-backup restore "$id" --force --yes
fi
exec vq-backup restore "$id"
