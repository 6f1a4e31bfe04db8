"""The Grafana dashboards and Prometheus rules of compose/: four dashboards, provisioned where compose
mounts them, every metric named one that the exporter serves (tests/monitoring_refs.EXPORTED_METRICS),
and importable into any Grafana: every panel queries the data source of the `datasource` variable
(no fixed uid; the provisioned one is its default), and every selector filters by the `job` and
`instance` variables."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
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
    with_all_selected,
)

PROVISIONING = COMPOSE / "grafana" / "provisioning"
VIEWS = {
    "backup-status.json": "Backup status",
    "backup-history.json": "Backup history",
    "storage-usage.json": "Storage usage",
    "backup-performance.json": "Backup performance",
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}  # the `datasource` variable's
BUILT_IN_ANNOTATIONS = {"type": "grafana", "uid": "-- Grafana --"}  # Grafana's own, in every Grafana
FILTER = {("job", "=~", "$job"), ("instance", "=~", "$instance")}

# A PromQL selector of one of our metrics or of `up`, with its braces; quoted strings are matched
# first so that a name inside a label value is not taken for a selector.
_QUOTED = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'
_TOKEN = re.compile(
    rf"(?P<string>{_QUOTED})"
    r"|(?<![A-Za-z0-9_:])(?P<name>vq_backup_[A-Za-z0-9_:]*|up)(?![A-Za-z0-9_:(])"
    rf"\s*(?P<braces>\{{(?:[^{{}}\"\'`]|{_QUOTED})*\}})?"
)
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


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


def selectors(expression: str) -> list[tuple[str, set[tuple[str, str, str]]]]:
    """Return (metric name, {(label, operator, value)}) for every selector of a vq_backup_* metric
    or of `up` in a PromQL expression."""
    found = []
    for token in _TOKEN.finditer(expression):
        if token["name"]:
            inner = (token["braces"] or "{}")[1:-1].strip()
            matchers = _MATCHER.findall(inner)
            assert "".join(m.group(0) for m in _MATCHER.finditer(inner)) == inner, f"unparsed: {inner!r}"
            found.append((token["name"], set(matchers)))
    return found


def datasource_references(node, where: str = "") -> Iterator[tuple[str, object]]:
    """Yield (where, value) for every "datasource" key anywhere in a dashboard's JSON."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield f"{where}.{key}", value
            yield from datasource_references(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            label = value.get("title") or value.get("name") or index if isinstance(value, dict) else index
            yield from datasource_references(value, f"{where}[{label!r}]")


def variables(board: dict) -> dict[str, dict]:
    return {variable["name"]: variable for variable in board["templating"]["list"]}


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


def test_every_panel_queries_the_datasource_variable(boards):
    for name in boards:
        panels = dashboard_panels(DASHBOARDS_DIR / name)
        assert len(panels) >= 6, name
        for panel in panels:
            where = f"{name}: panel {panel['title']!r}"
            assert panel["datasource"] == DATASOURCE, where
            assert panel["targets"], f"{where} has no query"
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(set(ref_ids)) == len(ref_ids), where
            for target in panel["targets"]:
                assert target["expr"].strip(), f"{where} has an empty query"
                assert target["datasource"] == DATASOURCE, where
            assert panel.get("description"), f"{where} says nothing about what it shows"


def test_no_fixed_datasource_uid_anywhere(boards):
    """A uid is one Grafana's: a dashboard naming one shows nothing in another Grafana. Every data
    source reference is the variable, but the built-in annotations' (Grafana's own)."""
    uid = provisioned_datasource()["uid"]
    for name, board in boards.items():
        assert uid not in (DASHBOARDS_DIR / name).read_text(), name
        references = list(datasource_references(board))
        assert len(references) > len(dashboard_panels(DASHBOARDS_DIR / name)), name
        for where, value in references:
            allowed = [DATASOURCE, BUILT_IN_ANNOTATIONS] if where.startswith(".annotations") else [DATASOURCE]
            assert value in allowed, f"{name}{where}: {value!r}"
        assert "__inputs" not in board  # file provisioning would leave its ${DS_...} unresolved


def test_the_datasource_job_and_instance_variables(boards):
    source = provisioned_datasource()
    for name, board in boards.items():
        found = variables(board)
        # in this order: each is resolved after the ones its query uses
        assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "job", "instance"], name
        chosen = found["datasource"]
        assert chosen["type"] == "datasource" and chosen["query"] == source["type"] == "prometheus", name
        assert not chosen.get("multi") and not chosen.get("includeAll") and not chosen.get("regex"), name
        # Grafana keeps the saved choice if a data source has its value as uid or its text as name,
        # else takes the first: the provisioned one is chosen by its name (and is the only one).
        assert chosen["current"]["text"] == source["name"] and source["isDefault"], name

        job, instance = found["job"], found["instance"]
        anchor = re.fullmatch(r"label_values\((vq_backup_\w+), job\)", job["query"]["query"])
        assert anchor and anchor[1] in EXPORTED_METRICS, f"{name}: {job['query']}"
        assert instance["query"]["query"] == f'label_values({anchor[1]}{{job=~"$job"}}, instance)', name
        for variable in (job, instance):
            where = f"{name}: ${variable['name']}"
            assert variable["type"] == "query" and variable["datasource"] == DATASOURCE, where
            assert variable["definition"] == variable["query"]["query"], where
            assert variable["includeAll"] and variable["multi"], where
            assert variable["current"]["value"] == ["$__all"], where
            assert variable["refresh"] == 2, where  # options read again when the time range changes
            # "All" is the values found, never ".*", which would match every job's `up`
            assert not variable.get("allValue"), where
        for link in board["links"]:  # the links to the other dashboards keep the three choices
            assert link["includeVars"], name


def test_every_selector_filters_by_job_and_instance():
    for name, title, expression in dashboard_expressions(raw=True):
        found = selectors(expression)
        assert found, f"{name}: {title}: no selector in {expression!r}"
        for metric, matchers in found:
            where = f"{name}: {title}: {metric} in {expression!r}"
            # both, and no other matcher on job or instance that would narrow them
            assert {m for m in matchers if m[0] in {"job", "instance"}} == FILTER, where
        assert metric_names(expression) <= {metric for metric, _ in found}, expression  # none missed


def test_the_expressions_with_all_selected_name_no_variable_but_grafanas():
    """What promtool parses and the tests' Prometheus runs (tests/integration/test_prometheus_rules)."""
    assert with_all_selected('up{job=~"$job", instance=~"$instance"}') == 'up{job=~".+", instance=~".+"}'
    for _name, _title, expression in dashboard_expressions():
        assert not re.findall(r"\$(?!__range\b|__interval\b)", expression), expression


def test_selectors_reads_each_selector_and_its_matchers():
    expression = (
        'sum(increase(vq_backup_runs_total{status="vq_backup_x", job=~"$job"}[1h])) '
        '/ ignoring(a) group_left vq_backup_last_run_success + up{job="a,b"} * max_over_time(up[5m])'
    )
    assert selectors(expression) == [
        ("vq_backup_runs_total", {("status", "=", "vq_backup_x"), ("job", "=~", "$job")}),
        ("vq_backup_last_run_success", set()),
        ("up", {("job", "=", "a,b")}),
        ("up", set()),
    ]
    assert selectors("setup + up_x + my_vq_backup_a + vq_backup_b {}") == [("vq_backup_b", set())]
    with pytest.raises(AssertionError, match="unparsed"):  # what it cannot read fails, never passes
        selectors("vq_backup_a{instance=~'x'}")


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
    scrape = 'up{job=~"$job", instance=~"$instance"}'  # $job: the jobs that serve our metrics
    for name, title, expression in dashboard_expressions(raw=True):
        assert metric_names(expression) or scrape in expression, f"{name}: {title}"


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
        "VQBackupSuspicious",  # the newest backup much smaller than the good ones before it
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
