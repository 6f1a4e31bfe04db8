"""``vq-backup accept ID --reason TEXT``: mark a suspicious backup as intended (a planned cleanup).

From then on it counts as good: later backups are compared with it, and retention no longer keeps
the older good backups for its sake. The record (``<id>_accepted.json``, catalog.acceptance) names
the manifest by its SHA-256 and is signed with BACKUP_SIGNING_KEY_FILE when set. Where
BACKUP_SIGNING_PUBLIC_KEYS is set an unsigned record would not count, so without the key file
accept refuses. It is audited, and when the backup is the newest complete one the open
"suspicious" incident is resolved (a newer backup's own verdict decides it otherwise).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from vq_tasks.errors import PermanentError
from vq_tasks.settings import Settings

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from vq_tasks.catalog.acceptance import Acceptance
    from vq_tasks.crypto.signing import PublicKeys
    from vq_tasks.manifest import Manifest
    from vq_tasks.storage.base import Storage

MAX_REASON = 1000  # Acceptance.reason's limit


def add_accept_command(commands: argparse._SubParsersAction) -> None:
    """Add the ``accept`` subcommand."""
    accept = commands.add_parser("accept", help="mark a suspicious backup as intended: it counts as good")
    accept.add_argument("backup_id", help="the id of the suspicious backup (as the alert names it)")
    accept.add_argument("--reason", required=True, help="why the drop was intended (kept and audited)")
    accept.set_defaults(handler=cmd_accept)


def cmd_accept(args: argparse.Namespace, settings: Settings) -> int:
    """Write the acceptance of a suspicious backup, audit it, resolve its incident; print each step.
    Refuse (exit 1, nothing written) a backup that is not suspicious, accepted already, or whose
    manifest is not trusted, and an acceptance that could not be signed where it must be."""
    from vq_tasks.audit import audit
    from vq_tasks.catalog.acceptance import write_acceptance
    from vq_tasks.crypto import signing
    from vq_tasks.manifest import acceptance_name
    from vq_tasks.storage import open_storage

    reason, origin = _checked_reason(args.reason), f"cli:{getpass.getuser()}"
    storage = open_storage(settings, "primary")
    keys = signing.trusted_keys(settings)
    manifest = _trusted_manifest(storage, settings, args.backup_id, keys)
    if not keys and (manifest.detached_signature is not None or manifest.signature is not None):
        raise PermanentError(
            f"{manifest.backup_id}'s manifest is signed, so its workers trust a signing key and count only "
            "signed acceptances: set BACKUP_SIGNING_KEY_FILE (or BACKUP_SIGNING_PUBLIC_KEYS) here as there"
        )
    name = acceptance_name(manifest.backup_id)
    if not _accepted_before(storage, manifest, keys):
        key = _signing_key(settings, manifest)
        write_acceptance(storage, _acceptance(manifest, origin, reason, key))
        _check_counts(storage, manifest, keys, name)
        audit(settings, "accept", "succeeded", backup_id=manifest.backup_id, reason=reason, origin=origin,
              signed=key is not None, anomalies=[a.text for a in manifest.anomalies])  # fmt: skip
        how = "signed" if key is not None else "unsigned: BACKUP_SIGNING_KEY_FILE is not set"
        print(f"accepted {manifest.backup_id} as intended: wrote {name} ({how}) to {storage.describe()}")
        print(f"  was: {'; '.join(a.text for a in manifest.anomalies)}")
        print("  it counts as a good backup from now on")
    if settings.destination("offsite") is not None:
        print(f"  {_accept_offsite(settings, manifest, name, storage)}")
    _resolve_incident(settings, storage, manifest, origin)
    return 0


def _accept_offsite(settings: Settings, manifest: Manifest, name: str, primary: Storage) -> str:
    """Write the acceptance beside the off-site copy's manifest too, if it is there (a copy made
    later takes the acceptance with it); return what happened."""
    from vq_tasks.errors import BackupError
    from vq_tasks.manifest import manifest_name
    from vq_tasks.storage import open_storage

    try:
        offsite = open_storage(settings, "offsite")
        if offsite.stat(manifest_name(manifest.backup_id)) is None:
            return f"the off-site copy has no {manifest.backup_id} yet: its copy takes the acceptance along"
        with offsite.open_write(name) as out:
            out.write(primary.read_bytes(name))
    except (BackupError, OSError) as exc:
        return f"the off-site copy did not get {name} ({exc}): run accept again to finish"
    return f"wrote {name} to the off-site copy ({offsite.describe()}) too"


def _checked_reason(reason: str) -> str:
    """Return the reason stripped. Raise PermanentError if it is empty or too long."""
    reason = reason.strip()
    if not reason:
        raise PermanentError("--reason must say why the drop was intended")
    if len(reason) > MAX_REASON:
        raise PermanentError(f"--reason is {len(reason)} characters long: at most {MAX_REASON}")
    return reason


def _signing_key(settings: Settings, manifest: Manifest) -> Ed25519PrivateKey | None:
    """Return the key that signs the acceptance (None: unsigned, and it counts so). Raise
    PermanentError when BACKUP_SIGNING_PUBLIC_KEYS is set, or the manifest is signed (its workers
    trust their key and count only signed acceptances), without BACKUP_SIGNING_KEY_FILE."""
    from vq_tasks.crypto import signing

    if settings.backup_signing_key_file is not None:
        return signing.load_signing_key(settings.backup_signing_key_file)
    if settings.backup_signing_public_keys or manifest.detached_signature or manifest.signature:
        raise PermanentError(
            "signing keys are trusted here (or the manifest is signed), so an acceptance counts only when "
            "signed: set BACKUP_SIGNING_KEY_FILE to the signing key and accept again (nothing was written)"
        )
    return None


def _trusted_manifest(storage: Storage, settings: Settings, backup_id: str, keys: PublicKeys) -> Manifest:
    """Return the manifest of ``backup_id`` checked as a restore checks it: it names only its own
    files and, with trusted keys, its signature holds. Raise PermanentError otherwise."""
    from vq_tasks.catalog.listing import load_manifest
    from vq_tasks.catalog.trust import check_manifest
    from vq_tasks.crypto import signing
    from vq_tasks.manifest import parse_backup_id

    prefix = settings.backup_name_prefix
    try:
        parse_backup_id(backup_id, prefix)
    except ValueError as exc:
        raise PermanentError(f"{exc}: accept takes the id of one backup") from None
    manifest = check_manifest(load_manifest(storage, backup_id), backup_id, prefix)
    signed = signing.check(manifest, keys)
    if not signed.ok:
        raise PermanentError(f"{backup_id}: manifest signature: {signed.actual} (expected {signed.expected})")
    return manifest


def _accepted_before(storage: Storage, manifest: Manifest, keys: PublicKeys) -> bool:
    """Return whether the backup's acceptance is there and counts (then say so: a rerun finishes
    the off-site copy and the alert). Raise PermanentError if the backup is not suspicious."""
    from vq_tasks.catalog.acceptance import read_acceptance
    from vq_tasks.manifest import acceptance_name

    backup_id = manifest.backup_id
    if not manifest.anomalies:
        raise PermanentError(f"{backup_id} is not suspicious (no anomaly in its manifest): nothing to accept")
    if storage.stat(acceptance_name(backup_id)) is None:
        return False
    found = read_acceptance(storage, manifest, keys)
    if found is None:
        print(f"replacing {acceptance_name(backup_id)}: it does not count (another manifest's, unsigned)")
        return False
    when = found.accepted_at.isoformat(timespec="seconds")
    print(f"{backup_id} was accepted already, by {found.by} at {when}: {found.reason}")
    return True


def _acceptance(manifest: Manifest, origin: str, reason: str, key: Ed25519PrivateKey | None) -> Acceptance:
    """Return the acceptance of ``manifest`` by ``origin``, signed with ``key`` when there is one."""
    from vq_tasks.catalog.acceptance import Acceptance, manifest_digest, signed

    record = Acceptance(
        backup_id=manifest.backup_id,
        accepted_at=datetime.now(UTC),
        by=origin,
        reason=reason,
        manifest_sha256=manifest_digest(manifest),
        signature=None,
    )
    return signed(record, key)


def _check_counts(storage: Storage, manifest: Manifest, keys: PublicKeys, name: str) -> None:
    """Read the acceptance back as retention and the anomaly checks will. Raise PermanentError if
    it does not count (a store that changed it, a key that is not among the trusted ones)."""
    from vq_tasks.catalog.acceptance import read_acceptance

    if read_acceptance(storage, manifest, keys) is None:
        raise PermanentError(f"{name} was written but does not count when read back: nothing is accepted")


def _resolve_incident(settings: Settings, storage: Storage, manifest: Manifest, origin: str) -> None:
    """Resolve the "suspicious" incident when ``manifest``'s backup is the newest complete one;
    print what happened. A failure is printed, not raised: the acceptance stands."""
    import redis

    from vq_tasks.catalog.latest import resolve_backup_id
    from vq_tasks.errors import BackupError, redacted_message
    from vq_tasks.monitoring.alerts import deliver
    from vq_tasks.monitoring.suspicious import suspicious_event

    newest = resolve_backup_id(storage, settings, "latest")
    if newest != manifest.backup_id:
        print(f"  a newer backup exists ({newest}): its own verdict decides the suspicious-backup alert")
        return
    try:
        outcome = deliver(settings, suspicious_event(manifest, accepted=True), origin=origin)
    except (BackupError, redis.RedisError, OSError) as exc:
        why = redacted_message(exc, settings.secret_values())
        print(f"vq-backup: accepted, but the alert was not resolved now: {why}", file=sys.stderr)
        return
    print(f"  suspicious-backup alert: {outcome}")
