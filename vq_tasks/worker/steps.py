"""How a task runs one step of a run (vq_tasks.worker.leases): under the step's lease, giving its
message back when it may not finish, and, for a task that is one step by itself, once per task id."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NoReturn

from celery.exceptions import Reject
from celery.utils.log import get_task_logger

from vq_tasks import coordination
from vq_tasks.settings import Settings
from vq_tasks.worker import leases

logger = get_task_logger(__name__)


def step(settings: Settings, name: str) -> contextlib.AbstractContextManager[leases.Lease]:
    """The lease of step ``name``: one live execution at a time (vq_tasks.worker.leases)."""
    r = coordination.client(settings)
    return leases.leased(r, name, settings.backup_worker_lost_after, logger.info)


def give_back(lost: leases.LeaseLost) -> NoReturn:
    """This execution may not finish its step: hand its message back to the broker. A message
    handed out again already is gone from it, and giving it back does nothing; a live one comes
    back and waits for the step again, so that a step never loses its only message."""
    logger.warning("%s", lost)
    raise Reject(str(lost), requeue=True) from None


def run_once(settings: Settings, task: Any, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work`` for this task: one execution at a time, and a delivery handed out again after
    an execution finished returns that execution's result instead of doing the work again (the
    result backend cannot tell: each execution marks the task STARTED anew)."""
    task_id = task.request.id
    try:
        with step(settings, f"task:{task_id}"):
            r = coordination.client(settings)
            done = coordination.result_of(r, task_id)
            if done is not None:
                logger.info("task %s was done by an earlier delivery; its result stands", task_id)
                return done
            result = work()
            coordination.record_result(r, task_id, result)
            return result
    except leases.LeaseLost as lost:
        give_back(lost)
