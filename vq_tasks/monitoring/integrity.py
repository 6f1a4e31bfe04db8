"""Forgery and erasure, seen: the integrity failures a verify found (``verify.protection``) each
open an ``integrity`` alert incident, count in ``vq_backup_integrity_failures_total`` (once per
backup and kind) and write an ``integrity`` audit line; a later clean verify of the same backup
resolves the incident. Called by whoever ran the verify (the task, the CLI), after it."""

from __future__ import annotations

import logging

from vq_tasks import coordination
from vq_tasks.audit import audit
from vq_tasks.monitoring.alerts import AlertEvent, deliver
from vq_tasks.settings import Settings
from vq_tasks.verify.protection import CHECKSUM_CHECKS, INTEGRITY_CHECKS
from vq_tasks.verify.run import VerifyReport, report_rows

logger = logging.getLogger(__name__)


def observe_verify(settings: Settings, report: VerifyReport, origin: str, task_id: str | None = None) -> None:
    """Open or update the integrity incident of ``report``'s failures, or resolve it when the
    backup it was opened for verified clean now. Never raise: the report is what the caller needs."""
    files = {f.name for f in report.files} if settings.backup_immutability else set()
    found = integrity_failures(report_rows(report), files)
    if found:
        report_integrity(settings, report.backup_id, found, origin, task_id)
    elif report.ok:
        resolve_integrity(settings, report.backup_id, origin, task_id)


def integrity_failures(
    rows: list[tuple[str, str, str, str, str]], locked_files: set[str]
) -> list[tuple[str, str, str]]:
    """Given verify's report rows, return (file, check, what was found) of each failed integrity
    check; of ``locked_files`` (BACKUP_IMMUTABILITY: every stored file) failed checksums too, as
    ``unchanged``: a locked object that differs from its manifest was replaced."""
    found = []
    for subject, check, _expected, actual, result in rows:
        if result != "MISMATCH":
            continue
        if check in INTEGRITY_CHECKS:
            found.append((subject, check, actual))
        elif subject in locked_files and check in CHECKSUM_CHECKS:
            found.append((subject, "unchanged", f"{check} {actual}, not as its manifest says"))
    return found


def report_integrity(
    settings: Settings, backup_id: str, found: list[tuple[str, str, str]], origin: str, task_id: str | None
) -> None:
    """Open (or update) the integrity incident for ``backup_id``'s failures: the audit line, the
    counter (once per backup and kind of failure) and the alert. Never raise: verify's report
    is what its caller needs; a mail that cannot go out now stays owed and the exporter sends it."""
    kinds = sorted({INTEGRITY_CHECKS[check] for _, check, _ in found})
    failures = {f"{subject} {check}": actual for subject, check, actual in found}
    audit(settings, "integrity", "failed", backup_id=backup_id, kinds=kinds, problems=failures,
          origin=origin, task_id=task_id)  # fmt: skip
    try:
        r = coordination.client(settings)
        for kind in kinds:
            coordination.count_once(r, f"integrity:{backup_id}:{kind}", {f"integrity:{kind}": 1})
    except Exception as exc:  # Celery's Redis down: the audit line and the mail still tell
        logger.warning("could not count the integrity failures of %s: %s", backup_id, exc)
    event = AlertEvent(condition="integrity", failures=failures, backup_id=backup_id)
    try:
        deliver(settings, event, origin, task_id)
    except Exception as exc:
        logger.warning("the integrity alert of %s is owed: %s", backup_id, exc)


def resolve_integrity(settings: Settings, backup_id: str, origin: str, task_id: str | None) -> None:
    """Close the integrity incident if it was opened for ``backup_id``, which verified clean now
    (put back as committed, or an operator's mistake undone). Never raise."""
    try:
        opened = coordination.open_incident(coordination.client(settings), "integrity")
        if opened is None or AlertEvent.model_validate_json(opened).backup_id != backup_id:
            return
        deliver(settings, AlertEvent(condition="integrity", backup_id=backup_id), origin, task_id)
    except Exception as exc:
        logger.warning("could not close the integrity incident of %s: %s", backup_id, exc)
