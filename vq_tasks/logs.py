"""Log redaction: every line a process writes passes through, with secret values replaced."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from vq_tasks.errors import redact

# shows one line of progress to whoever waits: print in the CLI, a logger in a task
Say = Callable[[str], object]


def human_size(size: float) -> str:
    """Return a size readable: 512 B, 1.5 KiB, 3.2 MiB, 1.1 GiB, 2.0 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class RedactingFormatter(logging.Formatter):
    """Wrap another formatter and redact what it produces (messages and tracebacks alike)."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]):
        super().__init__()
        self._inner = inner
        self._secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._inner.format(record), self._secrets)


def redact_handlers(logger: logging.Logger, secrets: Iterable[str]) -> None:
    """Make every handler of ``logger`` redact ``secrets``."""
    secrets = list(secrets)
    for handler in logger.handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter or logging.Formatter(), secrets))
