"""``vq-backup exporter``: Prometheus ``/metrics`` and ``/healthz`` over HTTP.

A background thread reads the state (vq_tasks.monitoring.status) every BACKUP_MONITOR_INTERVAL seconds, the
first time at start, then hands the snapshot to each ``after_refresh`` callback (alerting plugs in
there). Requests are answered from the latest snapshot only, so a scrape never waits for storage.
Every value comes from the manifests in storage and the records in Celery's Redis: the metrics are
the same after a restart and whatever the number of workers or exporters.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vq_tasks.monitoring.status import Status, StatusReader, parse_time
from vq_tasks.settings import Settings
from vq_tasks.verify.protection import INTEGRITY_KINDS

STALLED_INTERVALS = 3  # /healthz fails when the snapshot is older than this many intervals
REQUEST_TIMEOUT = 30.0
logger = logging.getLogger(__name__)

# name -> (type, label names, help); counters are named as exposed (with _total)
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "vq_backup_last_success_timestamp_seconds": (
        "gauge", (), "When the newest complete backup in the primary storage finished (its manifest)."),
    "vq_backup_last_run_timestamp_seconds": (
        "gauge", (), "When the most recent backup run started, whatever its outcome."),
    "vq_backup_last_run_success": (
        "gauge", (), "1 if the most recent finished backup run succeeded, 0 if it failed."),
    "vq_backup_run_in_progress": ("gauge", (), "1 while a backup runs (its run lock is held), else 0."),
    "vq_backup_last_duration_seconds": ("gauge", (), "How long the newest complete backup took."),
    "vq_backup_last_size_bytes": ("gauge", (), "Bytes stored by the newest complete backup (all its files)."),
    "vq_backup_last_backup_suspicious": (
        "gauge", (), "1 if the newest complete backup is suspicious (much smaller than the good backups "
        "before it) and not accepted, else 0: `vq-backup show ID` says why."),
    "vq_backup_last_backup_anomalies": (
        "gauge", (), "How many anomalies (drops from the good backups before it) the newest complete "
        "backup has, accepted or not."),
    "vq_backup_component_duration_seconds": (
        "gauge", ("component",), "How long each component's dump took in the newest complete backup."),
    "vq_backup_component_size_bytes": (
        "gauge", ("component",), "Stored (compressed) bytes per component of the newest complete backup."),
    "vq_backup_runs_total": (
        "counter", ("status",), "Backup runs that ended, by outcome (succeeded or failed)."),
    "vq_backup_failures_total": (
        "counter", ("component", "reason"), "Failed steps of backup runs, by component and reason."),
    "vq_backup_integrity_failures_total": (
        "counter", ("kind",), "Backups verify found forged, tampered, erased or underlocked (once each)."),
    "vq_backup_backups": ("gauge", ("destination", "kind"), "Complete backups kept, by destination, kind."),
    "vq_backup_incomplete_backups": (
        "gauge", ("destination",), "Backup ids with stored files but no manifest (running, or debris)."),
    "vq_backup_expired_backups": (
        "gauge", ("destination",), "Complete backups past their retention that are still stored."),
    "vq_backup_last_prune_success": ("gauge", ("destination",), "1 if the last prune succeeded, 0 if not."),
    "vq_backup_last_prune_timestamp_seconds": ("gauge", ("destination",), "When the last prune ran."),
    "vq_backup_storage_used_bytes": ("gauge", ("destination",), "Bytes of all objects in the destination."),
    "vq_backup_storage_free_bytes": (
        "gauge", ("destination",), "Free bytes: the file system's (Local), else the quota minus the used."),
    "vq_backup_storage_capacity_bytes": (
        "gauge", ("destination",), "Capacity in bytes: the file system's size (Local), else the quota."),
    "vq_backup_last_drill_success": ("gauge", (), "1 if the last restore drill passed, 0 if it failed."),
    "vq_backup_last_drill_timestamp_seconds": ("gauge", (), "When the last restore drill started."),
    "vq_backup_last_drill_duration_seconds": ("gauge", (), "How long the last restore drill's restore took."),
    "vq_backup_health_check": (
        "gauge", ("check",), "1 if a health check passes, 0 if it fails (the reasons are in /healthz)."),
    "vq_backup_status_timestamp_seconds": ("gauge", (), "When the exporter last read the state."),
}  # fmt: skip
METRIC_NAMES: frozenset[str] = frozenset(METRICS)
# The labels of vq_backup_failures_total, each combination always served (0 until counted): the
# steps of a run, ``start`` (a backup that failed before its chord started) and ``unknown`` (no
# step recorded one); ``reason`` as the step classified its error, ``unknown`` when it did not.
FAILURE_COMPONENTS = ("database", "redis", "config", "logs", "finalize", "start", "unknown")
FAILURE_REASONS = ("permanent", "transient", "unknown")


class _Families:
    """The metric families of one scrape, created on first use, in the order of METRICS."""

    def __init__(self) -> None:
        self._found: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}

    def add(self, name: str, value: float | bool | None, **labels: str) -> None:
        """Add a sample; a value of None (unknown) is left out."""
        kind, label_names, text = METRICS[name]
        family = self._found.get(name)
        if family is None:
            factory = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = self._found[name] = factory(name, text, labels=label_names)
        if value is not None:
            family.add_metric([labels[label] for label in label_names], float(value))

    def all(self) -> list[Metric]:
        for name in METRICS:  # every family is announced, even one with no sample yet
            self.add(name, None)
        return [self._found[name] for name in METRICS]


def families(status: Status, settings: Settings) -> list[Metric]:
    """Return the metrics of ``status``; what is unknown (a source that failed) has no sample."""
    out = _Families()
    _add_last_backup(out, status)
    if status.coordination_error is None:
        _add_records(out, status)
    for role, found in status.destinations.items():
        if found.error is None:
            for kind, count in found.backups.items():
                out.add("vq_backup_backups", count, destination=role, kind=kind)
            out.add("vq_backup_incomplete_backups", found.incomplete, destination=role)
            out.add("vq_backup_expired_backups", found.expired, destination=role)
            out.add("vq_backup_storage_used_bytes", found.used_bytes, destination=role)
            out.add("vq_backup_storage_free_bytes", found.free_bytes, destination=role)
            out.add("vq_backup_storage_capacity_bytes", found.capacity_bytes, destination=role)
    for check, problem in status.health(settings).items():
        out.add("vq_backup_health_check", problem is None, check=check)
    out.add("vq_backup_status_timestamp_seconds", status.taken_at.timestamp())
    return out.all()


def _add_last_backup(out: _Families, status: Status) -> None:
    manifest = status.last_manifest
    if manifest is None:
        return
    out.add("vq_backup_last_success_timestamp_seconds", manifest.finished_at.timestamp())
    out.add("vq_backup_last_duration_seconds", manifest.duration_seconds)
    out.add("vq_backup_last_size_bytes", sum(f.size for f in manifest.files))
    out.add("vq_backup_last_backup_suspicious", status.last_suspicious)
    out.add("vq_backup_last_backup_anomalies", len(manifest.anomalies))
    for component, entry in manifest.components.items():
        out.add("vq_backup_component_duration_seconds", entry.duration_seconds, component=component)
        out.add("vq_backup_component_size_bytes", entry.stored_size, component=component)


def _add_records(out: _Families, status: Status) -> None:
    """Add what Celery's Redis records: runs, counters, prunes and the drill."""
    if status.last_run is not None and status.last_run.started_at is not None:
        out.add("vq_backup_last_run_timestamp_seconds", status.last_run.started_at.timestamp())
    if status.last_finished is not None:
        out.add("vq_backup_last_run_success", status.last_finished.status == "succeeded")
    out.add("vq_backup_run_in_progress", status.running)
    for outcome in ("succeeded", "failed"):
        out.add("vq_backup_runs_total", status.counters.get(f"runs:{outcome}", 0), status=outcome)
    for (component, reason), count in failure_counts(status.counters).items():
        out.add("vq_backup_failures_total", count, component=component, reason=reason)
    for kind in INTEGRITY_KINDS:  # each served from 0: see failure_counts
        out.add("vq_backup_integrity_failures_total", status.counters.get(f"integrity:{kind}", 0), kind=kind)
    for role, record in status.prunes.items():
        if "ok" in record:
            out.add("vq_backup_last_prune_success", bool(record["ok"]), destination=role)
        at = parse_time(record.get("at"))
        out.add(
            "vq_backup_last_prune_timestamp_seconds", None if at is None else at.timestamp(), destination=role
        )
    drill = status.drill
    if "last_drill_ok" in drill:
        out.add("vq_backup_last_drill_success", bool(drill["last_drill_ok"]))
    at = parse_time(drill.get("last_drill_at"))
    out.add("vq_backup_last_drill_timestamp_seconds", None if at is None else at.timestamp())
    seconds = drill.get("last_drill_seconds")
    out.add("vq_backup_last_drill_duration_seconds", seconds if isinstance(seconds, int | float) else None)


def failure_counts(counters: dict[str, int]) -> dict[tuple[str, str], int]:
    """Given the lifetime counters, return (component, reason) -> failures: every combination of
    FAILURE_COMPONENTS and FAILURE_REASONS (0 when never counted), then any other one recorded.
    A counter series must exist at 0 before its first failure: one that first appears at 1 has
    no earlier sample, so ``increase()`` sees no increase and the first failure goes unnoticed."""
    found = {(component, reason): 0 for component in FAILURE_COMPONENTS for reason in FAILURE_REASONS}
    for name, count in sorted(counters.items()):
        parts = name.split(":")
        if parts[0] == "failures" and len(parts) == 3:
            found[(parts[1], parts[2])] = count
    return found


class StatusCollector(Collector):
    """A prometheus_client collector serving the snapshot that ``current`` returns (none: nothing)."""

    def __init__(self, current: Callable[[], Status | None], settings: Settings):
        self._current = current
        self._settings = settings

    def collect(self) -> Iterator[Metric]:
        status = self._current()
        if status is not None:
            yield from families(status, self._settings)


def render(status: Status, settings: Settings) -> bytes:
    """Return the text exposition of ``status``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(lambda: status, settings))
    return generate_latest(registry)


class Exporter:
    """The refresh thread and the HTTP server. ``start`` returns at once; ``stop`` ends both."""

    def __init__(
        self,
        settings: Settings,
        after_refresh: Iterable[Callable[[Status], None]] = (),
        host: str | None = None,
        port: int | None = None,
    ):
        self.settings = settings
        self.after_refresh = list(after_refresh)
        self.reader = StatusReader(settings)
        self.status: Status | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(lambda: self.status, settings))
        port = settings.backup_exporter_port if port is None else port
        self.server = _Server((host or settings.backup_exporter_host, port), _Handler)
        self.server.exporter = self
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._problems: dict[str, str] = {}

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on (the real port when 0 was asked for)."""
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Start refreshing (the first reading at once) and serving, each in a thread."""
        for target, name in ((self._refresh_loop, "refresh"), (self.server.serve_forever, "http")):
            thread = threading.Thread(target=target, name=f"exporter-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop serving and refreshing; wait for a reading under way to end."""
        self._stop.set()
        if self._threads:  # shutdown() waits for serve_forever(), which only start() runs
            self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join()

    def _refresh_loop(self) -> None:
        interval = self.settings.backup_monitor_interval
        while not self._stop.is_set():
            started = time.monotonic()
            self.refresh()
            self._stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def refresh(self) -> Status | None:
        """Read the state once, keep it, and hand it to each callback; return it (None if the
        reading itself failed, which is logged; the previous snapshot stays and ages)."""
        started = time.monotonic()
        try:
            status = self.reader.read()
        except Exception:
            logger.exception("reading the state of the backups failed")
            return None
        first = self.status is None
        self.status = status
        self._log_reading(status, time.monotonic() - started, first)
        for callback in self.after_refresh:
            try:
                callback(status)
            except Exception:  # alerting must never stop the metrics
                logger.exception("after_refresh callback %r failed", callback)
        return status

    def _log_reading(self, status: Status, seconds: float, first: bool) -> None:
        """Log the first reading, and each change of health (what fails and why)."""
        problems = {check: why for check, why in status.health(self.settings).items() if why}
        (logger.info if first else logger.debug)("read the state in %.3f s", seconds)
        if problems != self._problems or first:
            for check, why in problems.items():
                logger.warning("unhealthy: %s: %s", check, why)
            if not problems:
                logger.info("healthy: %s", ", ".join(status.health(self.settings)))
        self._problems = problems

    def health(self, now: datetime | None = None) -> tuple[bool, dict[str, str]]:
        """Return whether all is well and each check -> "ok" or why not, the exporter's own
        (a snapshot at most STALLED_INTERVALS intervals old) included."""
        status, now = self.status, now or datetime.now(UTC)
        interval = self.settings.backup_monitor_interval
        if status is None:
            return False, {"exporter": "no reading of the state yet: the first one is under way"}
        checks = {name: problem or "ok" for name, problem in status.health(self.settings).items()}
        age = (now - status.taken_at).total_seconds()
        checks["exporter"] = "ok"
        if age > STALLED_INTERVALS * interval:
            checks["exporter"] = (
                f"exporter stalled: the last reading is {age:.0f} s old "
                f"(BACKUP_MONITOR_INTERVAL={interval:g})"
            )
        return all(value == "ok" for value in checks.values()), checks


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    exporter: Exporter


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        exporter = self.server.exporter
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(exporter.registry))
        elif path == "/healthz":
            ok, checks = exporter.health()
            body = {"status": "ok" if ok else "unhealthy", "checks": checks}
            self._send(200 if ok else 503, "application/json", json.dumps(body).encode() + b"\n")
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: /metrics or /healthz\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


def serve(
    settings: Settings,
    after_refresh: Iterable[Callable[[Status], None]] = (),
    host: str | None = None,
    port: int | None = None,
) -> None:
    """Serve /metrics and /healthz until SIGTERM or SIGINT, then stop cleanly."""
    exporter = Exporter(settings, after_refresh, host, port)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    exporter.start()
    host_shown, port_shown = exporter.address
    logger.info("serving http://%s:%d/metrics and /healthz", host_shown, port_shown)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        exporter.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopped")
