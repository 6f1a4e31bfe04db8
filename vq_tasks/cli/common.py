"""``vq-backup``: the operators' command line.

vq-backup run [--wait]     enqueue a backup; with --wait follow it and exit non-zero on failure
vq-backup list             the backups in storage, read from their manifests
vq-backup show ID          one backup's manifest, readable (--json for the document itself)
vq-backup prune [--dry-run]  apply the retention policy now
vq-backup verify ID|latest  read every file of a backup once and check it against the manifest
vq-backup restore ID|latest  print the plan of a restore; --force restores (in this process)
vq-backup extract ID COMPONENT -o PATH  write one component of a backup to PATH, checked
vq-backup drill [ID|latest]  restore into a scratch database and Redis, check, drop (cli_drill.py)
vq-backup storage-check    check that each destination is reachable, readable and writable
vq-backup exporter         serve Prometheus /metrics and /healthz on port 8080 (cli_exporter.py)
vq-backup audit            the recent operations from the audit log (cli_audit.py)
vq-backup signing-key -o PATH  make the Ed25519 key pair that signs manifests (cli_keys.py)
vq-backup demo             the quick start: embedded PostgreSQL and Redis, a real worker, a backup

list, show, verify, restore, extract and drill take --offsite to work on the off-site copy.
"""

from __future__ import annotations

import argparse

from vq_tasks.settings import Settings

EXIT_FAILED = 1


EXIT_USAGE = 2


EXIT_INTERRUPTED = 130


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def add_destination_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--offsite``: work on the off-site copy instead of the primary storage."""
    parser.add_argument(
        "--offsite",
        dest="destination",
        action="store_const",
        const="offsite",
        default="primary",
        help="use the off-site copy (BACKUP_OFFSITE_PATH) instead of the primary storage",
    )


def storage_of(args: argparse.Namespace, settings: Settings):
    """Return the storage the command works on: the primary one, or the off-site one."""
    from vq_tasks.storage import open_storage

    return open_storage(settings, getattr(args, "destination", "primary"))


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
