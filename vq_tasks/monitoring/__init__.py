"""Watching the backups: the state snapshot (status), the checks no task makes (monitor), the
Prometheus exporter (exporter) and alert mails (alerts)."""
