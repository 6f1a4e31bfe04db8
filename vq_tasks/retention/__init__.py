"""What to keep: the pure policy (policy), its plan for one storage (plan), and the prune of every
destination (prune)."""
