#!/bin/sh
# /scripts/backup.sh [vq-backup run options]: take a backup now and wait for it, as the operators'
# guide says (`docker exec backup-service /scripts/backup.sh`). A thin wrapper kept for operators
# who learned it: it runs `vq-backup run --wait`, which enqueues vq_tasks.backup on the workers,
# shows each component's progress, prints the backup id and exits 1 if the backup failed.
set -eu
case "${1:-}" in
  -h | --help)
    echo "usage: $0 [--timeout SECONDS]"
    echo "take a backup now through the workers and wait for it (vq-backup run --wait)"
    exit 0
    ;;
esac
exec vq-backup run --wait "$@"
