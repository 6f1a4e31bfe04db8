"""The Prometheus files of compose/, checked by Prometheus' own promtool (Debian's `prometheus`
package; .ci/run installs it): the config and the rules load, every alert's unit tests in
alerts_test.yml pass and show it both firing and silent, a changed threshold makes them fail, and
every dashboard query parses as PromQL."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import fill_database, run_cli
from tests.monitoring_refs import ALERTS_FILE, COMPOSE, alert_rules, dashboard_expressions, referenced_metrics
from tests.servers import free_port, redis_server_binary, stop_process

pytestmark = pytest.mark.integration
PROMETHEUS_DIR = COMPOSE / "prometheus"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail(
            "promtool is missing: install Debian's prometheus package "
            "(apt-get install --no-install-recommends prometheus), as .ci/run does"
        )
    return found


def run(promtool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_the_prometheus_config_and_its_rule_files_load(promtool):
    done = run(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout


def test_the_alert_rules_load(promtool):
    done = run(promtool, "check", "rules", str(ALERTS_FILE))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_promtool_test_rules_passes(promtool, tmp_path):
    done = run(promtool, "test", "rules", str(ALERTS_TEST), cwd=tmp_path)  # paths relative to the file
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "FAILED" not in done.stdout


def test_every_alert_is_tested_firing_and_silent():
    document = yaml.safe_load(ALERTS_TEST.read_text())
    assert document["rule_files"] == ["alerts.yml"]
    firing, silent = set(), set()
    for case in document["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert firing == names, f"never shown firing: {names - firing}"
    assert silent == names, f"never shown silent: {names - silent}"


@pytest.mark.parametrize(
    ("original", "changed"),
    [
        ("> 26 * 3600", "> 27 * 3600"),  # VQBackupStale: a day and 3 hours instead of 26 hours
        ("vq_backup_storage_capacity_bytes < 10", "vq_backup_storage_capacity_bytes < 5"),
        ('check!="last_backup"} == 0\n        for: 5m', 'check!="last_backup"} == 0\n        for: 1m'),
        ('{check!="last_backup"} == 0', " == 0"),  # a fresh install would page before any backup
        ("vq_backup_expired_backups > 0\n        for: 7h", "vq_backup_expired_backups > 0\n        for: 1h"),
        ("vq_backup_expired_backups > 0\n        for: 7h", "vq_backup_expired_backups > 0\n        for: 25h"),
        ("suspicious == 1\n        for: 5m", "suspicious == 1\n        for: 1m"),  # it would page at once
        ("suspicious == 1\n        for: 5m", "suspicious == 1\n        for: 9m"),
    ],
)
def test_the_rule_tests_fail_when_a_threshold_changes(promtool, tmp_path, original, changed):
    text = ALERTS_FILE.read_text()
    assert original in text
    (tmp_path / "alerts.yml").write_text(text.replace(original, changed))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    done = run(promtool, "test", "rules", str(tmp_path / "alerts_test.yml"))
    assert done.returncode == 1 and "FAILED" in done.stdout + done.stderr


def test_every_dashboard_query_is_valid_promql(promtool, tmp_path):
    """promtool parses every panel's query, as the expression of a recording rule (Grafana's
    $__range and $__interval replaced by a duration, as Grafana does before sending it)."""
    rules = []
    for index, (name, title, expression) in enumerate(dashboard_expressions()):
        promql = expression.replace("$__range", "7d").replace("$__interval", "1m")
        rules.append(
            {"record": f"dashboard:q{index}", "expr": promql, "labels": {"panel": f"{name} {title}"}}
        )
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    done = run(promtool, "check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


# ---- a real Prometheus scraping the real exporter after a real backup and drill ------------------

# Panels that are empty on a healthy system, by design: no failure has been counted (the failure
# series are there, at 0, but the table shows only those that increased), and the store does not
# grow between two scrapes a second apart.
EMPTY_WHEN_HEALTHY = {
    "Failures in range, by component and reason",
    "Days until full at this rate",
}
# Rules with no `for`, which a healthy system must not fire at its first evaluation.
IMMEDIATE = {"VQBackupFailed", "VQBackupStale", "VQBackupPruneFailed", "VQBackupRestoreDrillFailed"}


def wait_until(check, what: str, timeout: float = 60, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not in {timeout} s" + (f":\n{log.read_text()}" if log else ""))
        time.sleep(0.5)


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def query(port: int, promql: str) -> list[dict]:
    answer = http_json(f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@contextlib.contextmanager
def process(command: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        started = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield started
    finally:
        stop_process(started, timeout=20, group=True)


def test_every_panel_and_rule_works_on_a_real_prometheus_scraping_the_real_exporter(
    base_env, start_worker, database, tmp_path
):
    prometheus = shutil.which("prometheus")
    if not prometheus:
        pytest.fail("the prometheus server is missing: Debian's prometheus package installs it (.ci/run)")
    env = {**base_env, "REDIS_SERVER_BIN": redis_server_binary(), "BACKUP_MONITOR_INTERVAL": "1"}
    fill_database(database, customers=20)
    start_worker(env)
    made = run_cli(env, "run", "--wait")
    assert made.returncode == 0, made.stdout + made.stderr
    drill = run_cli(env, "drill")
    assert drill.returncode == 0, drill.stdout + drill.stderr

    exporter_port, prometheus_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS_FILE)],
                "scrape_configs": [
                    {
                        "job_name": "vq-backup-exporter",
                        "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                    }
                ],
            }
        )
    )
    exporter_command = [sys.executable, "-m", "vq_tasks.cli", "exporter", "--port", str(exporter_port)]
    prometheus_command = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
    ]
    exporter_log, prometheus_log = tmp_path / "exporter.log", tmp_path / "prometheus.log"
    with (
        process(exporter_command, exporter_log, env={**os.environ, **env}),
        process(prometheus_command, prometheus_log),
    ):
        base = f"http://127.0.0.1:{prometheus_port}"
        wait_until(lambda: http_json(f"{base}/api/v1/status/buildinfo"), "prometheus", log=prometheus_log)
        scraped = 'count_over_time(vq_backup_status_timestamp_seconds{job="vq-backup-exporter"}[1m])'
        wait_until(
            lambda: [s for s in query(prometheus_port, scraped) if float(s["value"][1]) >= 5],
            "five scrapes of the exporter",
            log=exporter_log,
        )

        empty = set()
        for _file, title, expression in dashboard_expressions():
            promql = expression.replace("$__range", "1h").replace("$__interval", "1m")
            if not query(prometheus_port, promql):  # an invalid or mismatched query raises here
                empty.add(title)
        assert empty <= EMPTY_WHEN_HEALTHY, f"panels without data: {empty - EMPTY_WHEN_HEALTHY}"

        names = set(http_json(f"{base}/api/v1/label/__name__/values")["data"])
        assert referenced_metrics() <= names
        failures = query(prometheus_port, "vq_backup_failures_total")  # each at 0 before any failure
        assert len(failures) == 7 * 3 and all(float(s["value"][1]) == 0 for s in failures), failures

        groups = http_json(f"{base}/api/v1/rules")["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        assert set(rules) == {rule["alert"] for rule in alert_rules()}
        assert all(rule["health"] == "ok" for rule in rules.values()), rules
        assert all(rule["lastEvaluation"] > "2000" for rule in rules.values())  # evaluated, not pending load
        active = {
            a["labels"]["alertname"]: a["state"] for a in http_json(f"{base}/api/v1/alerts")["data"]["alerts"]
        }
        assert not set(active) & IMMEDIATE, active
