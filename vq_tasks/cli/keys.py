"""``vq-backup signing-key -o PATH``: make the Ed25519 key pair that signs manifests."""

from __future__ import annotations

import argparse
from pathlib import Path

from vq_tasks.settings import Settings


def add_signing_key_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("signing-key", help="make a key pair for signing manifests")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the private key file to write")
    parser.set_defaults(handler=cmd_signing_key, needs_settings=False)


def cmd_signing_key(args: argparse.Namespace, settings: Settings | None) -> int:
    """Write a new private key (mode 600, never over an existing file) and print the public key."""
    from vq_tasks.crypto.signing import key_id, new_signing_key, public_key_text

    public = new_signing_key(args.output)
    print(f"# private key written to {args.output}: give it to the workers as BACKUP_SIGNING_KEY_FILE")
    print(
        f"# public key (id {key_id(public)}): add it to BACKUP_SIGNING_PUBLIC_KEYS where backups are verified"
    )
    print(public_key_text(public))
    return 0
