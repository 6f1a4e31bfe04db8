"""Apply a Redis restore all at once or not at all: one MULTI ... EXEC transaction of any size,
streamed over a connection of our own.

Why a transaction: Redis runs a transaction's queued commands one after another with no other
client's command between them, and throws the queue away when the connection closes before EXEC.
So a restore that fails or is killed while it queues leaves the target exactly as it was, and once
EXEC has arrived the server applies all of it. Redis rolls nothing back inside EXEC: a command that
fails there (a payload the target cannot read, which the restore checks beforehand) leaves the
target partly restored, and the message says so.

Why not redis-py's pipeline: it holds every command in memory until execute() and every reply
after. Here the commands go out in batches as they are made, each batch's QUEUED answers are read
at once, and EXEC's reply (one element per command) is counted as it arrives: memory does not grow
with the number of keys.

Cost: the target holds the queued commands (the backup's DUMP payloads and about 250 bytes of
bookkeeping each) until EXEC. With maxmemory and the noeviction policy a queue that does not fit
is refused (OOM) and nothing is written. While EXEC runs the target answers no other client.
"""

from __future__ import annotations

from vq_tasks.clients.redis_wire import Connection, command, server_error
from vq_tasks.errors import BackupError, PermanentError, TransientError, redact
from vq_tasks.settings import Settings

BATCH_COMMANDS = 1000
QUEUED = b"+QUEUED\r\n"  # the answer to each command queued in a transaction
BATCH_BYTES = 16 << 20  # the queued commands sent at once, unless a single one is larger
EXEC_RATE = 20_000  # commands a second EXEC is given at the least (a small server does 100,000+)
EXEC_BYTES_RATE = 20 << 20  # and bytes of payloads a second: large values take longer than many keys
UNKNOWN = (
    "the restore was sent as one transaction but its answer did not come: the target is either as it"
    " was or fully restored (INFO keyspace tells); restore again if it is as it was"
)


class Transaction:
    """One MULTI on a connection of its own to the Redis of ``settings``: ``queue`` commands, then
    ``execute``; ``close`` before that discards them. Raises TransientError or PermanentError
    naming the server, never with the password."""

    def __init__(self, settings: Settings, batch: int = BATCH_COMMANDS):
        self._connection = Connection(settings)
        self.where = self._connection.where
        self._secrets = list(self._connection.reader.secrets)
        self._reader = self._connection.reader
        self._batch = batch
        self._timeout = settings.redis_timeout
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._db: str | None = None
        self.queued = 0
        self.queued_bytes = 0
        try:
            self._connection.call("MULTI")
        except BaseException:
            self.close()
            raise

    def use(self, db: str) -> None:
        """Queue a SELECT of database ``db`` unless the commands queued last are for it already."""
        if db != self._db:
            self.queue("SELECT", db)
            self._db = db

    def queue(self, *args: str | bytes | int) -> None:
        """Queue one command; it runs at ``execute``."""
        self.queue_encoded(command(*args))

    def queue_encoded(self, data: bytes) -> None:
        """Queue one command already encoded in RESP (one hot loop encodes its own faster)."""
        self._pending.append(data)
        self._pending_bytes += len(data)
        if len(self._pending) >= self._batch or self._pending_bytes >= BATCH_BYTES:
            self.flush()

    def unlink(self, keys: list[bytes]) -> None:
        """Queue an UNLINK of ``keys``."""
        self.queue("UNLINK", *keys)

    def execute(self) -> int:
        """Send EXEC and count the answers; return how many commands ran. Raise PermanentError,
        nothing written, if the server refused the transaction; PermanentError saying the target is
        partly restored if a command failed inside it; TransientError saying the outcome is unknown
        if the answer does not come in time (REDIS_TIMEOUT, and at least EXEC_RATE commands and
        EXEC_BYTES_RATE bytes a second) or cannot be read."""
        self.flush()
        wait = self._timeout + self.queued / EXEC_RATE + self.queued_bytes / EXEC_BYTES_RATE
        try:
            self._connection.send(command("EXEC"))
            self._connection.link.set_timeout(wait)
            head = self._reader.line()
            if head.startswith(b"-"):  # EXECABORT: a command was refused while queued
                raise self._refused(head)
            if not (head.startswith(b"*") and head[1:].isdigit()):
                raise self._unexpected(head)
            ran, failed, first = int(head[1:]), 0, ""
            for _ in range(ran):
                reply = self._reader.line()
                if reply.startswith(b"-"):
                    failed, first = failed + 1, first or reply[1:].decode(errors="replace")
                elif reply[:1] not in (b"+", b":"):
                    raise PermanentError(
                        f"{self._unexpected(reply)}; the transaction ran, its answer is unreadable"
                    )
        except TransientError as exc:
            raise TransientError(f"{exc}; {UNKNOWN}") from None
        if failed:
            raise PermanentError(
                f"{self.where} ran the restore's transaction, but {failed} of its {ran} commands failed"
                f" (the first: {redact(first, self._secrets)}): the target is partly restored"
            )
        return ran

    def close(self) -> None:
        """Close the connection; a transaction not executed is discarded by the server."""
        self._connection.close()

    def flush(self) -> None:
        """Send the commands not sent yet and read their answers, which must all be QUEUED."""
        if not self._pending:
            return
        self._connection.send(b"".join(self._pending))
        answered = self._reader.skip_repeated(QUEUED, len(self._pending))
        for _ in range(len(self._pending) - answered):  # the first other answer says what went wrong
            reply = self._reader.line()
            if reply + b"\r\n" != QUEUED:
                raise self._refused(reply) if reply.startswith(b"-") else self._unexpected(reply)
        self.queued += len(self._pending)
        self.queued_bytes += self._pending_bytes
        self._pending.clear()
        self._pending_bytes = 0

    def _refused(self, reply: bytes) -> BackupError:
        text = reply[1:].decode(errors="replace")
        if text.startswith("OOM"):
            return PermanentError(
                f"{self.where} has no room for the restore (maxmemory): it holds the restore's commands,"
                " about the backup's size, until it applies them at once; free memory or raise maxmemory"
                f" ({redact(text, self._secrets)})"
            )
        return server_error(text, self.where, self._secrets)

    def _unexpected(self, reply: bytes) -> PermanentError:
        shown = repr(redact(reply.decode(errors="backslashreplace"), self._secrets)[:80])
        return PermanentError(f"{self.where} sent {shown}, which is no answer to a transaction")
