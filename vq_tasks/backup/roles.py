"""The database component's second member, globals.sql: the server's roles, staged after the dump
(whose errors name a missing database or a refused user best; pg_dumpall's do not) and described
in the database's facts."""

from __future__ import annotations

import logging
from collections.abc import Callable

from vq_tasks.backup.staging import StagingArea, stage_member
from vq_tasks.manifest import GLOBALS_MEMBER, DatabaseFacts, GlobalsFacts, StagedMember, StagedPart
from vq_tasks.settings import Settings
from vq_tasks.sources.postgres_globals import dump_globals

logger = logging.getLogger(__name__)


def stage_globals(
    settings: Settings, area: StagingArea, fence: Callable[[], None]
) -> tuple[StagedMember, GlobalsFacts]:
    """Stage globals.sql; return its record and its facts."""
    staged, roles = stage_member(
        settings, area, "globals", GLOBALS_MEMBER, lambda out: dump_globals(settings, out), fence=fence
    )
    if not roles.passwords:
        logger.warning(
            "globals.sql holds %d roles without their passwords: DB_USER %s may not read pg_authid (it is "
            "not a superuser); a restore onto a server without them creates them with no password",
            len(roles.roles),
            settings.db_user,
        )
    return staged, GlobalsFacts(content=staged.content, roles=roles.roles, passwords=roles.passwords)


def with_globals(part: StagedPart, staged: StagedMember, facts: GlobalsFacts) -> StagedPart:
    """Return the database part with globals.sql as its second member, described in its facts."""
    assert isinstance(part.facts, DatabaseFacts)
    database = part.facts.model_copy(update={"globals": facts})
    return part.model_copy(update={"facts": database, "extras": [*part.extras, staged]})
