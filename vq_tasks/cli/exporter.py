"""``vq-backup exporter``: serve Prometheus /metrics and /healthz (vq_tasks.monitoring.exporter).

vq-backup exporter [--host H] [--port P]  serve on BACKUP_EXPORTER_HOST:BACKUP_EXPORTER_PORT
                                          (0.0.0.0:8080) until SIGTERM or SIGINT; after each
                                          reading it mails stale-backup and storage alerts
vq-backup exporter --once                 read the state once, print the metrics, and exit 0 if
                                          every health check passes, else 1 (each failure on stderr)
"""

from __future__ import annotations

import argparse
import logging
import sys

from vq_tasks.cli.common import EXIT_FAILED
from vq_tasks.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_exporter_command(commands: argparse._SubParsersAction) -> None:
    """Add the ``exporter`` subcommand."""
    exporter = commands.add_parser("exporter", help="serve Prometheus /metrics and /healthz")
    exporter.add_argument("--host", help="address to listen on (default: BACKUP_EXPORTER_HOST)")
    exporter.add_argument("--port", type=int, help="port to listen on (default: BACKUP_EXPORTER_PORT)")
    exporter.add_argument(
        "--once", action="store_true", help="print the metrics once; exit 1 if a health check fails"
    )
    exporter.set_defaults(handler=cmd_exporter)


def cmd_exporter(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until stopped (exit 0), or with --once print the metrics and exit by health."""
    from vq_tasks.logs import redact_handlers

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    redact_handlers(logging.getLogger(), settings.secret_values())
    if args.once:
        return print_once(settings)
    from vq_tasks.monitoring.exporter import serve
    from vq_tasks.monitoring.monitor import alert_on

    serve(settings, after_refresh=[alert_on(settings)], host=args.host, port=args.port)
    return 0


def print_once(settings: Settings) -> int:
    """Read the state, print the metrics text, and each failing check on stderr; return the exit code."""
    from vq_tasks.monitoring.exporter import render
    from vq_tasks.monitoring.status import StatusReader

    status = StatusReader(settings).read()
    sys.stdout.write(render(status, settings).decode())
    problems = {check: why for check, why in status.health(settings).items() if why}
    for check, why in problems.items():
        print(f"unhealthy: {check}: {why}", file=sys.stderr)
    return EXIT_FAILED if problems else 0
