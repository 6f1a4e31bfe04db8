"""The way out of each system: PostgreSQL (postgres), Redis (redis), config and log files (files)."""
