"""The Grafana dashboards and Prometheus rules of compose/: four dashboards, provisioned where compose
mounts them, every panel on a query of the provisioned data source, and every metric named one
that the exporter serves (tests/monitoring_refs.EXPORTED_METRICS)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.monitoring_refs import (
    COMPOSE,
    DASHBOARD_FILES,
    DASHBOARDS_DIR,
    EXPORTED_METRICS,
    alert_rules,
    dashboard_expressions,
    dashboard_panels,
    metric_names,
    referenced_metrics,
)

PROVISIONING = COMPOSE / "grafana" / "provisioning"
VIEWS = {
    "backup-status.json": "Backup status",
    "backup-history.json": "Backup history",
    "storage-usage.json": "Storage usage",
    "backup-performance.json": "Backup performance",
}


def grafana_mounts() -> dict[str, str]:
    """Return the grafana service's bind mounts: repository folder -> container path."""
    service = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = {}
    for entry in service["volumes"]:
        source, target = entry.split(":")[:2]
        if source.startswith("."):
            mounts[str((COMPOSE / source).resolve())] = target
    return mounts


def provisioned_datasource() -> dict:
    document = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = document["datasources"]
    return source


@pytest.fixture(scope="module")
def boards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARD_FILES}


def test_the_four_views_of_the_guide_are_there_and_nothing_else(boards):
    assert sorted(p.name for p in DASHBOARDS_DIR.iterdir()) == sorted(VIEWS)
    for name, title in VIEWS.items():
        assert boards[name]["title"] == f"VQ Backup / {title}"
    uids = [board["uid"] for board in boards.values()]
    assert len(set(uids)) == 4 and all(0 < len(uid) <= 40 for uid in uids)
    assert all("vq-backup" in board["tags"] for board in boards.values())


def test_the_dashboards_are_provisioned_from_the_folder_compose_mounts():
    mounts = grafana_mounts()
    assert mounts[str(PROVISIONING.resolve())] == "/etc/grafana/provisioning"
    document = yaml.safe_load((PROVISIONING / "dashboards" / "vq-backup.yml").read_text())
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == mounts[str(DASHBOARDS_DIR.resolve())]


def test_the_datasource_is_the_compose_prometheus():
    source = provisioned_datasource()
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    services = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]
    assert "prometheus" in services and source["uid"]


def test_every_panel_queries_the_provisioned_datasource(boards):
    uid = provisioned_datasource()["uid"]
    for name in boards:
        panels = dashboard_panels(DASHBOARDS_DIR / name)
        assert len(panels) >= 6, name
        for panel in panels:
            where = f"{name}: panel {panel['title']!r}"
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, where
            assert panel["targets"], f"{where} has no query"
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(set(ref_ids)) == len(ref_ids), where
            for target in panel["targets"]:
                assert target["expr"].strip(), f"{where} has an empty query"
                assert target["datasource"]["uid"] == uid, where
            assert panel.get("description"), f"{where} says nothing about what it shows"


def test_every_metric_on_a_dashboard_or_in_a_rule_is_served_by_the_exporter():
    unknown = []
    for name, title, expression in dashboard_expressions():
        unknown += [f"{name}: {title}: {m}" for m in metric_names(expression) - EXPORTED_METRICS]
    for rule in alert_rules():
        extra = metric_names(rule["expr"]) - EXPORTED_METRICS
        unknown += [f"alerts.yml: {rule['alert']}: {m}" for m in extra]
    assert not unknown, "metrics the exporter does not serve:\n" + "\n".join(unknown)
    assert referenced_metrics() == EXPORTED_METRICS  # and every metric it serves is shown somewhere


def test_every_panel_query_names_a_vq_backup_metric_or_the_exporter_scrape():
    for name, title, expression in dashboard_expressions():
        assert metric_names(expression) or 'up{job="vq-backup-exporter"}' in expression, f"{name}: {title}"


def test_panels_fit_the_grid_without_overlapping(boards):
    for name, board in boards.items():
        taken: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{name}: {panel['title']}"
            xs, ys = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
            cells = {(x, y) for x in xs for y in ys}
            assert not cells & taken, f"{name}: panel {panel['title']!r} overlaps another"
            taken |= cells
        ids = [panel["id"] for panel in board["panels"]]
        assert len(set(ids)) == len(ids), name


def test_metric_names_ignores_label_values_and_finds_every_name():
    expression = 'sum(rate(vq_backup_runs_total{status="vq_backup_x"}[1h])) / vq_backup_last_run_success'
    assert metric_names(expression) == {"vq_backup_runs_total", "vq_backup_last_run_success"}
    assert metric_names('up{job="vq-backup-exporter"}') == set()
    assert metric_names("my_vq_backup_x + vq_backup_a:b") == {"vq_backup_a:b"}


def test_the_alert_rules_are_complete():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(set(names)) == len(names)
    expected = {
        "VQBackupFailed",  # backup failure
        "VQBackupStale",  # no complete backup within 26 h
        "VQBackupNeverCompleted",  # none at all, 26 h after monitoring began
        "VQBackupStorageNearlyFull",  # free space under BACKUP_STORAGE_MIN_FREE_PERCENT
        "VQBackupPruneFailed",  # retention: prune failing
        "VQBackupExpiredBackupsRemain",  # retention: past-retention backups still present
        "VQBackupRestoreDrillFailed",
        "VQBackupHealthCheckFailing",
        "VQBackupExporterDown",
        "VQBackupExporterAbsent",
    }
    assert expected <= set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    config = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vq-backup-exporter"]
    assert job["static_configs"][0]["targets"] == ["exporter:8080"]
    for rule in rules:  # the rules name the job prometheus.yml scrapes
        if "job=" in rule["expr"]:
            assert 'job="vq-backup-exporter"' in rule["expr"], rule["alert"]


def test_the_dashboards_are_valid_json_files_in_grafana_form():
    for path in DASHBOARD_FILES:
        board = json.loads(Path(path).read_text())
        assert board["schemaVersion"] >= 36 and isinstance(board["panels"], list)
        assert "id" not in board  # provisioned dashboards get their id from Grafana
