"""Restoring backups: database, Redis, config and logs, each without leaving a half-restored target."""
