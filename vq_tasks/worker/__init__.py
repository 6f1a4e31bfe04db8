"""The Celery side: the app (app), the broker transport (broker), the beat schedule (schedule) and
the thin tasks (tasks)."""
