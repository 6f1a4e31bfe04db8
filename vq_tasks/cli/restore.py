"""``vq-backup restore`` and ``vq-backup extract``: the operator's side of a restore, run in the
CLI process (progress lines, confirmation, the integrity report)."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence

from vq_tasks.cli.common import EXIT_FAILED, add_destination_flag, print_table, storage_of
from vq_tasks.settings import Settings


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    from vq_tasks.catalog.latest import resolve_backup_id
    from vq_tasks.restore.run import choose_components, restore_backup

    storage = storage_of(args, settings)
    components = choose_components(args.component)
    backup_id = resolve_backup_id(storage, settings, args.backup_id, restorable=True)
    if args.force and not args.yes and not confirm_restore(settings, backup_id, components):
        print("cancelled: nothing was changed", file=sys.stderr)
        return EXIT_FAILED
    out = sys.stderr if args.json else sys.stdout
    report = restore_backup(
        settings, storage, backup_id, components, args.force,
        say=lambda line: print(line, file=out, flush=True), origin=f"cli:{getpass.getuser()}",
    )  # fmt: skip
    if args.json:
        print(report.model_dump_json(indent=2))
    elif report.plan is not None:
        print("\n".join(plan_lines(report.plan)))
        print(f"\nnothing was changed; to restore: vq-backup restore {backup_id} --force")
    else:
        print_restore_outcome(report)
    return 0 if report.ok else EXIT_FAILED


def confirm_restore(settings: Settings, backup_id: str, components: Sequence[str]) -> bool:
    """Say what a restore replaces; return whether the operator typed the backup id."""
    from vq_tasks.restore.apply import config_target

    replaced = {
        "database": f"database {settings.db_name} on {settings.db_host}:{settings.db_port} (kept, renamed)",
        "redis": f"every key of Redis {settings.redis_host}:{settings.redis_port}",
        "config": f"config files under {config_target(settings)}",
        "logs": f"log files under {settings.backup_restore_logs_dir}",
    }
    print(f"Restoring {backup_id} replaces:")
    for component in components:
        print(f"  {component}: {replaced[component]}")
    try:
        answer = input("type the backup id to continue: ")
    except EOFError:
        return False
    return answer.strip() == backup_id


def per_db(keys: dict[str, int]) -> str:
    return ", ".join(f"db{db}={n}" for db, n in sorted(keys.items(), key=lambda kv: int(kv[0]))) or "none"


def plan_lines(plan) -> list[str]:
    """Return readable lines for a restore plan (vq_tasks.restore.run.RestorePlan)."""
    lines = []
    if (db := plan.database) is not None:
        now = f"{len(db.tables)} tables, {sum(db.tables.values())} rows" if db.exists else "does not exist"
        backup = f"{len(db.expected_tables)} tables, {sum(db.expected_tables.values())} rows"
        lines.append(f"database {db.database}: now {now}; the backup has {backup}")
        for table in sorted(db.tables.keys() | db.expected_tables.keys()):
            now_rows, backup_rows = db.tables.get(table, "-"), db.expected_tables.get(table, "-")
            lines.append(f"  {table}: {now_rows} rows now, {backup_rows} in the backup")
        if db.roles is not None:
            lines.append(f"  roles to create (the server lacks them): {', '.join(db.roles.create) or 'none'}")
            refused = db.roles.not_created.items()
            lines += [f"  role {name} would NOT be created: {why}" for name, why in refused]
    if (rd := plan.redis) is not None:
        lines.append(f"redis {rd.target} ({rd.target_version}): keys now {per_db(rd.target_keys)}")
        lines.append(f"  the backup has {per_db(rd.backup_keys)}; replaced {per_db(rd.replaced)}")
        lines.append(f"  removed (not in the backup) {per_db(rd.removed)}")
    for name, files in (("config", plan.config), ("logs", plan.logs)):
        if files is not None:
            lines.append(
                f"{name}: {files.files} files into {files.target}, {len(files.changed)} would change"
            )
            lines += [f"  {path}" for path in files.changed[:20]]
            lines += [f"  REFUSED {entry}" for entry in files.refused]
    return lines


def print_restore_outcome(report) -> None:
    """Print what a forced restore did and its integrity report (vq_tasks.restore.run.RestoreReport)."""
    results = report.results
    if results.database is not None:
        database = results.database
        how = f"over {database.jobs} connection(s)" if database.split_by_toc else "with one psql session"
        phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in database.phases.items())
        print(f"database: loaded {how} in {database.duration_seconds:.1f} s ({phases})")
        if results.database.roles_created:
            print(f"created roles (from globals.sql): {', '.join(results.database.roles_created)}")
        for warning in results.database.warnings:
            print(f"warning: {warning}")
        if results.database.previous_name:
            print(
                f"the replaced database is kept as {results.database.previous_name}: drop it once satisfied"
            )
    if results.redis is not None:
        print(f"redis: restored {per_db(results.redis.restored)}, removed {per_db(results.redis.removed)}")
    rows = [(c.check, c.expected, c.actual, "OK" if c.ok else "FAILED") for c in report.integrity.checks]
    print_table(("CHECK", "EXPECTED", "ACTUAL", "RESULT"), rows)
    verdict = "integrity OK" if report.ok else "integrity check FAILED"
    took = f"{report.duration_seconds:.1f} s"
    print(f"\n{report.backup_id}: restored {', '.join(report.components)} in {took}; {verdict}")


def say_now(line: str) -> None:
    print(line, flush=True)


def cmd_extract(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from vq_tasks.catalog.latest import resolve_backup_id
    from vq_tasks.catalog.listing import load_manifest
    from vq_tasks.catalog.trust import check_manifest
    from vq_tasks.crypto import signing
    from vq_tasks.errors import PermanentError
    from vq_tasks.manifest import GLOBALS_MEMBER
    from vq_tasks.restore.extract import component_named, extract_one

    storage = storage_of(args, settings)
    backup_id = resolve_backup_id(storage, settings, args.backup_id, restorable=True)
    manifest = check_manifest(load_manifest(storage, backup_id), backup_id, settings.backup_name_prefix)
    signed = signing.check(manifest, signing.trusted_keys(settings))
    if not signed.ok:
        raise PermanentError(f"{backup_id}: manifest signature: {signed.actual} (expected {signed.expected})")
    roles = args.component == GLOBALS_MEMBER  # the database's second member
    component = "database" if roles else component_named(manifest, args.component)
    path = Path(args.output)
    extract_one(storage, manifest, component, path, say=say_now, settings=settings, roles=roles)
    member = GLOBALS_MEMBER if roles else manifest.components[component].member
    print(f"wrote {path}: {member} of {backup_id}, checksums OK")
    return 0


def add_restore_commands(commands: argparse._SubParsersAction) -> None:
    """Add the ``restore`` and ``extract`` subcommands."""
    restore = commands.add_parser("restore", help="plan a restore, or with --force restore")
    restore.add_argument("backup_id", help="a backup id, or 'latest'")
    restore.add_argument(
        "--component",
        action="append",
        metavar="NAME",
        help="database, redis, config or logs (repeatable; default: database, redis, config)",
    )
    restore.add_argument("--force", action="store_true", help="restore; without it only the plan")
    restore.add_argument("--yes", action="store_true", help="with --force: do not ask for confirmation")
    restore.add_argument("--json", action="store_true", help="print the report as JSON")
    add_destination_flag(restore)
    restore.set_defaults(handler=cmd_restore)
    extract = commands.add_parser("extract", help="write one component of a backup to a file")
    extract.add_argument("backup_id", help="a backup id, or 'latest'")
    extract.add_argument(
        "component", help="database.sql, globals.sql, redis.rdb, config.tar.gz (.tar.zst), logs, ..."
    )
    extract.add_argument("-o", "--output", required=True, help="the file to write (must not exist)")
    add_destination_flag(extract)
    extract.set_defaults(handler=cmd_extract)
