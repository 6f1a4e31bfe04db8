"""Create the roles a restore needs from the backup's globals.sql: only those the server lacks, never
touching one that exists (its attributes, password, settings and memberships stay as they are).

The file is read (clients/globals_sql.py), never run: for each missing role this composes CREATE
ROLE with its attributes and password hash, then its settings and comments, then the memberships
that make it a member (granted by DB_USER), each from the values read and psycopg.sql, so a
tampered file cannot reach another role. Not created, and said so in the plan and the warnings:
SUPERUSER roles (never by a restore: create one by hand if it is wanted), a managed service's own
roles (the provider makes them), a role with REPLICATION or BYPASSRLS when DB_USER is not a
superuser, every role when DB_USER has neither CREATEROLE nor SUPERUSER, and a role whose
attributes are not pg_dumpall's. Each statement runs on its own; one that fails is a warning (its
primary message only: the server's context would quote a password hash), and psql's error then
names any role the dump still needs. Roles are the server's, not the database's: a restore that
fails later keeps the roles it created.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg
from psycopg import sql
from pydantic import BaseModel, Field

from vq_tasks.clients.globals_sql import Globals, GlobalsReader, Membership, RoleDefinition
from vq_tasks.clients.pg_connect import connect
from vq_tasks.settings import Settings

logger = logging.getLogger(__name__)
READ_SIZE = 64 << 10
# the roles managed services make for themselves (RDS, Azure Database, Cloud SQL, AlloyDB)
PROVIDER_ROLES = ("rdsadmin", "rdsrepladmin", "rdstopmgr", "azuresu", "azure_pg_admin", "azure_superuser")
PROVIDER_PREFIXES = ("rds_", "cloudsql", "alloydb")


class RolesPlan(BaseModel):
    create: list[str] = Field(description="roles of the backup the server lacks: the restore creates them")
    not_created: dict[str, str] = Field(
        default_factory=dict, description="roles the server lacks that the restore does not create, and why"
    )
    not_applied: list[str] = Field(
        default_factory=list, description="statements of globals.sql of another shape (their first words)"
    )


def read_globals(path: Path) -> Globals:
    """Read the globals.sql at ``path``. Raise PermanentError for a statement far too long."""
    reader = GlobalsReader()
    with path.open("rb") as source:
        while chunk := source.read(READ_SIZE):
            reader.feed(chunk)
    return reader.close()


def plan_roles(settings: Settings, maintenance_db: str, path: Path) -> RolesPlan:
    """Return which roles of globals.sql at ``path`` a restore would create, and which not and why.
    Change nothing."""
    wanted = read_globals(path)
    with connect(settings, maintenance_db) as admin:
        return _plan(admin, settings.db_user, wanted)


def create_roles(settings: Settings, maintenance_db: str, path: Path) -> tuple[list[str], list[str]]:
    """Create the roles of globals.sql at ``path`` that the server lacks; return those created and
    the warnings (roles not created and why, statements that failed or were not applied, roles
    without a password)."""
    wanted = read_globals(path)
    with connect(settings, maintenance_db) as admin:
        plan = _plan(admin, settings.db_user, wanted)
        warnings = [f"role {name} not created: {why}" for name, why in plan.not_created.items()]
        warnings += [
            f"globals.sql: not applied (of a shape a restore does not run): {s}" for s in plan.not_applied
        ]
        created = [n for n in plan.create if _run(admin, _create(wanted.roles[n]), n, warnings)]
        for name in created:
            for statement in _descriptions(wanted.roles[name]):
                _run(admin, statement, name, warnings)
        for grant in wanted.memberships:
            if grant.member in created:
                _run(admin, _grant(grant), grant.member, warnings)
            elif grant.granted in created:
                kept = f"existing role {grant.member} left as it is: not made a member of {grant.granted}"
                warnings.append(kept)
    warnings += [
        f"role {name} was created without a password (the backup holds none): give it one with ALTER ROLE"
        for name in created
        if "LOGIN" in wanted.roles[name].flags and wanted.roles[name].password is None
    ]
    if created:
        logger.info("created roles %s from globals.sql", ", ".join(created))
    return created, warnings


def _plan(admin: psycopg.Connection, user: str, wanted: Globals) -> RolesPlan:
    existing = {name for (name,) in admin.execute("SELECT rolname FROM pg_roles")}
    query = "SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user"
    superuser, createrole = admin.execute(query).fetchone() or (False, False)
    plan = RolesPlan(create=[], not_applied=wanted.other)
    for name, role in wanted.roles.items():
        if name in existing or name.startswith("pg_"):
            continue
        why = _refusal(role, user, superuser, createrole)
        if why:
            plan.not_created[name] = why
        else:
            plan.create.append(name)
    return plan


def _refusal(role: RoleDefinition, user: str, superuser: bool, createrole: bool) -> str | None:
    """Why a missing role is not created, or None."""
    if role.name in PROVIDER_ROLES or role.name.startswith(PROVIDER_PREFIXES):
        return "a managed service's own role (the provider makes it)"
    if role.malformed:
        return "its ALTER ROLE ... WITH holds words that are not pg_dumpall's attributes"
    if "SUPERUSER" in role.flags:
        return "SUPERUSER: a restore never creates one (create it by hand if it is wanted)"
    if not (superuser or createrole):
        return f"DB_USER {user} may not create roles: ALTER ROLE {user} CREATEROLE"
    if role.reserved and not superuser:
        return f"it has {' '.join(role.reserved)}, which only a superuser may give"
    return None


def _create(role: RoleDefinition) -> sql.Composed:
    """CREATE ROLE with the role's attributes, composed from the values read."""
    options: list[sql.Composable] = [sql.SQL(flag) for flag in role.flags]  # words of FLAGS only
    if role.connection_limit is not None:
        options.append(sql.SQL("CONNECTION LIMIT {}").format(sql.Literal(role.connection_limit)))
    if role.valid_until is not None:
        options.append(sql.SQL("VALID UNTIL {}").format(sql.Literal(role.valid_until)))
    if role.password is not None:
        options.append(sql.SQL("PASSWORD {}").format(sql.Literal(role.password)))
    statement = sql.SQL("CREATE ROLE {}").format(sql.Identifier(role.name))
    return statement + (sql.SQL(" WITH ") + sql.SQL(" ").join(options) if options else sql.SQL(""))


def _descriptions(role: RoleDefinition) -> list[sql.Composed]:
    """The role's settings and comments, composed from the values read."""
    statements = []
    for setting in role.settings:
        where: sql.Composable = sql.SQL("")
        if setting.database:
            where = sql.SQL(" IN DATABASE {}").format(sql.Identifier(setting.database))
        statements.append(
            sql.SQL("ALTER ROLE {}{} SET {} TO {}").format(
                sql.Identifier(role.name),
                where,
                sql.Identifier(*setting.parameter),
                sql.SQL(", ").join(sql.Literal(v) for v in setting.values),
            )
        )
    for comment in role.comments:
        name, text = sql.Identifier(role.name), sql.Literal(comment.text)
        if comment.provider:
            provider = sql.Identifier(comment.provider)
            statements.append(sql.SQL("SECURITY LABEL FOR {} ON ROLE {} IS {}").format(provider, name, text))
        else:
            statements.append(sql.SQL("COMMENT ON ROLE {} IS {}").format(name, text))
    return statements


def _grant(grant: Membership) -> sql.Composed:
    options = [sql.SQL(f"{option} {value}") for option, value in grant.options]  # words of _OPTIONS only
    statement = sql.SQL("GRANT {} TO {}").format(sql.Identifier(grant.granted), sql.Identifier(grant.member))
    return statement + (sql.SQL(" WITH ") + sql.SQL(", ").join(options) if options else sql.SQL(""))


def _run(admin: psycopg.Connection, statement: sql.Composed, role: str, warnings: list[str]) -> bool:
    """Run one composed statement about ``role``; a failure becomes a warning. Return whether it ran."""
    try:
        admin.execute(statement)
    except psycopg.Error as exc:
        reason = exc.diag.message_primary or type(exc).__name__  # never the statement: a password hash
        warnings.append(f"role {role}: {_verb(statement, admin)} failed: {reason}")
        return False
    return True


def _verb(statement: sql.Composed, admin: psycopg.Connection) -> str:
    """The first two words of a composed statement (CREATE ROLE, ALTER ROLE, GRANT ...)."""
    return " ".join(statement.as_string(admin).split()[:2])
