"""``vq-backup``, the operators' command line: one module per command group, shared helpers in
common."""
