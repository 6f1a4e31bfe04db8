"""What every ``vq-backup`` command shares: exit codes, sizes and ages for people, tables, and
the --offsite flag with the storage it names."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vq_tasks.settings import Settings

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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


def print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
