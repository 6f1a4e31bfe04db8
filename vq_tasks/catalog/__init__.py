"""What storage holds: backups grouped by id (backup_set, listing), which manifests to trust
(trust), and which backup ``latest`` names (latest)."""
