"""What the monitoring files of compose/ refer to: the metric names used by the Grafana dashboards'
panel expressions and by the Prometheus alert rules, and the fixed list the exporter serves.

``referenced_metrics()`` is the contract between the dashboards and rules (tests/unit/
test_dashboards.py) and the exporter (its own test checks that it serves every name here).

The dashboards' expressions filter every selector by the template variables ``$job`` and
``$instance``; ``dashboard_expressions()`` gives them as Grafana sends them with "All" selected,
so that promtool can parse them and a Prometheus can run them (tests/integration/
test_prometheus_rules.py), and with ``raw=True`` as the dashboards write them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose"
DASHBOARDS_DIR = COMPOSE / "grafana" / "dashboards"
DASHBOARD_FILES = tuple(
    DASHBOARDS_DIR / name
    for name in ("backup-status.json", "backup-history.json", "storage-usage.json", "backup-performance.json")
)
ALERTS_FILE = COMPOSE / "prometheus" / "alerts.yml"

# Every metric `vq-backup exporter` serves (counters with their exposed `_total` name).
EXPORTED_METRICS = frozenset(
    {
        "vq_backup_last_success_timestamp_seconds",
        "vq_backup_last_run_timestamp_seconds",
        "vq_backup_last_run_success",
        "vq_backup_run_in_progress",
        "vq_backup_last_duration_seconds",
        "vq_backup_last_size_bytes",
        "vq_backup_last_backup_suspicious",
        "vq_backup_last_backup_anomalies",
        "vq_backup_component_duration_seconds",
        "vq_backup_component_size_bytes",
        "vq_backup_runs_total",
        "vq_backup_failures_total",
        "vq_backup_integrity_failures_total",
        "vq_backup_backups",
        "vq_backup_incomplete_backups",
        "vq_backup_expired_backups",
        "vq_backup_last_prune_success",
        "vq_backup_last_prune_timestamp_seconds",
        "vq_backup_storage_used_bytes",
        "vq_backup_storage_free_bytes",
        "vq_backup_storage_capacity_bytes",
        "vq_backup_last_drill_success",
        "vq_backup_last_drill_timestamp_seconds",
        "vq_backup_last_drill_duration_seconds",
        "vq_backup_health_check",
        "vq_backup_status_timestamp_seconds",
    }
)

_METRIC = re.compile(r"(?<![A-Za-z0-9_:])vq_backup_[A-Za-z0-9_:]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def metric_names(expression: str) -> set[str]:
    """Given a PromQL expression, return the vq_backup_* metric names it uses (names inside
    quoted label values are not metric names and are ignored)."""
    return set(_METRIC.findall(_STRING.sub('""', expression)))


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside a collapsed row


def dashboard_panels(path: Path) -> list[dict]:
    """Return every panel of the dashboard at ``path`` that shows data (rows excluded)."""
    board = json.loads(path.read_text())
    return [panel for panel in _panels(board.get("panels", [])) if panel.get("type") != "row"]


# What Grafana puts in place of the dashboards' $job and $instance with "All" selected: the regex of
# every value the variable found (the jobs and instances that serve vq_backup_status_timestamp_seconds).
# Where every scraped series is the exporter's, as in compose and in the tests' Prometheus, that is
# any job and any instance.
ALL_SELECTED = {"job": ".+", "instance": ".+"}
_VARIABLE = re.compile(r"\$(job|instance)\b")


def with_all_selected(expression: str) -> str:
    """Replace $job and $instance in ``expression`` by ALL_SELECTED (Grafana's own $__range and
    $__interval are left to the caller)."""
    return _VARIABLE.sub(lambda m: ALL_SELECTED[m.group(1)], expression)


def dashboard_expressions(*, raw: bool = False) -> list[tuple[str, str, str]]:
    """Return (dashboard file name, panel title, expression) for every target of every panel: the
    expression as written with ``raw``, else with $job and $instance replaced (with_all_selected)."""
    found = []
    for path in DASHBOARD_FILES:
        for panel in dashboard_panels(path):
            for target in panel.get("targets", []):
                expression = target.get("expr", "")
                if not raw:
                    expression = with_all_selected(expression)
                found.append((path.name, panel.get("title", ""), expression))
    return found


def alert_rules() -> list[dict]:
    """Return every rule (alerting or recording) of compose/prometheus/alerts.yml."""
    document = yaml.safe_load(ALERTS_FILE.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def referenced_metrics() -> set[str]:
    """Return every vq_backup_* metric name used by a dashboard panel expression or an alert rule."""
    names: set[str] = set()
    for _file, _title, expression in dashboard_expressions():
        names |= metric_names(expression)
    for rule in alert_rules():
        names |= metric_names(str(rule["expr"]))
    return names
