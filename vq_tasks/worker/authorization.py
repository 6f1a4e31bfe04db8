"""Authorized destructive tasks: a prune, or a forced restore, runs only when its message carries
a signature by a key in BACKUP_TASK_PUBLIC_KEYS (README, "Authorized destructive tasks").

Whoever can reach the broker could otherwise send ``vq_tasks.prune`` or ``vq_tasks.restore`` with
``force`` and have a worker delete backups or overwrite the live database. A process with
BACKUP_TASK_KEY_FILE (an Ed25519 key, the format of BACKUP_SIGNING_KEY_FILE) adds the header
``vq_authorization`` to each such message it publishes (``before_task_publish``): its key id, the
time of issue and the signature over the canonical JSON of the task's name, id, arguments, that
time and key id. A worker with BACKUP_TASK_PUBLIC_KEYS runs the destructive work only when the
signature verifies, binds exactly the call it runs, is at most BACKUP_TASK_AUTHORIZATION_MAX_AGE
old, and its task id was not used before (recorded in Celery's Redis), so a captured message
re-sent is refused. A refusal is a permanent failure, an audit line and an alert. Without
BACKUP_TASK_PUBLIC_KEYS nothing is checked (the worker warns at start-up).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vq_tasks import coordination
from vq_tasks.audit import audit
from vq_tasks.crypto import signing
from vq_tasks.errors import PermanentError
from vq_tasks.monitoring.alerts import AlertEvent
from vq_tasks.settings import Settings, get_settings
from vq_tasks.settings.checks import load_task_key

HEADER = "vq_authorization"
PURPOSE = "vq-backup task authorization"  # never mistaken for another signed document
VERSION = 1
GUARDED = frozenset({"vq_tasks.prune", "vq_tasks.restore"})  # signed when sent; checked when destructive
CLOCK_SKEW = 60  # seconds a sender's clock may be ahead of the worker's
USED_KEY = "vq:authorized:{}"
FINISHED_STATES = frozenset({"SUCCESS", "FAILURE"})
REASONS = {  # one alert incident per kind: the text is the same every time
    "missing": "sent without an authorization (no BACKUP_TASK_KEY_FILE where it was sent)",
    "malformed": f"its {HEADER} header is malformed",
    "unknown key": "signed by a key not in BACKUP_TASK_PUBLIC_KEYS",
    "mismatch": "its signature does not match the task, its id or its arguments (changed or forged)",
    "expired": "its authorization is older than BACKUP_TASK_AUTHORIZATION_MAX_AGE",
    "future": "its authorization is dated in the future (the sender's clock is ahead?)",
    "replayed": "its task id was authorized and run before: a message sent again",
}
logger = logging.getLogger(__name__)
Alert = Callable[[AlertEvent], None]
_AUTHORIZED = object()  # set on a request this worker authorized: no header can forge it
_MARK = "_vq_authorized"


class TaskRefused(PermanentError):
    """A destructive task whose message carries no valid authorization: never retried."""


@dataclass(frozen=True)
class Call:
    """What a message asks for: the task, its id and its arguments (as JSON sees them)."""

    task: str
    task_id: str
    args: list[Any]
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Refusal:
    """Why a message is refused: ``kind`` (a key of REASONS) and the detailed ``reason``."""

    kind: str
    reason: str


def canonical(call: Call, issued_at: int, key_id: str) -> bytes:
    """Return the bytes signed for ``call``: canonical JSON (sorted keys, no spaces, ASCII)."""
    document = {
        "purpose": PURPOSE,
        "version": VERSION,
        "task": call.task,
        "id": call.task_id,
        "args": list(call.args),
        "kwargs": call.kwargs,
        "issued_at": issued_at,
        "key_id": key_id,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def authorization_header(key: Ed25519PrivateKey, call: Call, issued_at: int) -> dict[str, Any]:
    """Return the value of the ``vq_authorization`` header that authorizes ``call``."""
    kid = signing.key_id(key.public_key())
    signature = key.sign(canonical(call, issued_at, kid))
    return {
        "version": VERSION,
        "key_id": kid,
        "issued_at": issued_at,
        "signature": base64.b64encode(signature).decode(),
    }


def verify(header: object, keys: signing.PublicKeys, call: Call, now: float, max_age: int) -> Refusal | None:
    """Return why ``header`` does not authorize ``call`` at ``now`` under ``keys``, or None."""
    if header is None:
        return Refusal("missing", REASONS["missing"])
    fields = _fields(header)
    if fields is None:
        return Refusal("malformed", REASONS["malformed"])
    kid, issued_at, signature = fields
    key = keys.get(kid)
    if key is None:
        return Refusal("unknown key", f"signed by key {kid}, which is not in BACKUP_TASK_PUBLIC_KEYS")
    try:
        data = canonical(call, issued_at, kid)
    except ValueError:  # NaN or infinity among the arguments: nothing signs those
        return Refusal("mismatch", REASONS["mismatch"])
    if not _signature_holds(key, signature, data):
        return Refusal("mismatch", REASONS["mismatch"])
    return _too_old_or_new(issued_at, now, max_age)


def _signature_holds(key: Ed25519PublicKey, signature: str, data: bytes) -> bool:
    try:
        key.verify(base64.b64decode(signature, validate=True), data)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def _fields(header: object) -> tuple[str, int, str] | None:
    """Return the key id, time of issue and signature of a well-formed header, else None."""
    if not isinstance(header, dict) or header.get("version") != VERSION:
        return None
    kid, issued_at, signature = header.get("key_id"), header.get("issued_at"), header.get("signature")
    if not isinstance(kid, str) or not isinstance(signature, str):
        return None
    if not isinstance(issued_at, int) or isinstance(issued_at, bool):
        return None
    return kid, issued_at, signature


def _too_old_or_new(issued_at: int, now: float, max_age: int) -> Refusal | None:
    age = now - issued_at
    if age > max_age:
        return Refusal(
            "expired", f"issued {age:.0f} s ago, more than BACKUP_TASK_AUTHORIZATION_MAX_AGE={max_age}"
        )
    if age < -CLOCK_SKEW:
        return Refusal("future", f"issued {-age:.0f} s in the future (more than {CLOCK_SKEW} s)")
    return None


# ---- the sender's side ---------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _sending_key(path: Path) -> Ed25519PrivateKey:
    return load_task_key(path)


def sign_outgoing(sender: str | None = None, body: Any = None, headers: dict | None = None, **_: Any) -> None:
    """``before_task_publish``: add the authorization header to a prune or restore this process
    sends, when it has BACKUP_TASK_KEY_FILE (message protocol 2: the body is args, kwargs, embed).
    A message left unsigned is refused by a worker that checks, never run unchecked."""
    if sender not in GUARDED or headers is None:
        return
    path = get_settings().backup_task_key_file
    if path is None:
        return
    if not (isinstance(body, list | tuple) and len(body) == 3):
        logger.error("%s %s not signed: not a message of Celery's protocol 2", sender, headers.get("id"))
        return
    call = Call(sender, str(headers.get("id")), list(body[0] or ()), dict(body[1] or {}))
    try:
        headers[HEADER] = authorization_header(_sending_key(path), call, int(time.time()))
    except (PermanentError, TypeError, ValueError) as exc:
        logger.error("%s %s not signed: %s", sender, call.task_id, exc)


# ---- the worker's side ---------------------------------------------------------------------------


def trusted_keys(settings: Settings) -> signing.PublicKeys:
    """Return the keys of BACKUP_TASK_PUBLIC_KEYS, by key id (none: nothing is checked)."""
    return signing.parse_public_keys(settings.backup_task_public_keys)


def require(task: Any, settings: Settings, alert: Alert) -> None:
    """Return when the bound ``task``'s message may do its destructive work: BACKUP_TASK_PUBLIC_KEYS
    is empty, or its authorization holds and its task id is new. Otherwise audit and alert the
    refusal and raise TaskRefused. A redelivery of an acks-late task (prune) whose execution did
    not finish is no replay: steps.run_once keeps it from doing the work twice."""
    keys = trusted_keys(settings)
    if not keys:
        return
    request = task.request
    call = Call(task.name, str(request.id), list(request.args or ()), dict(request.kwargs or {}))
    max_age = settings.backup_task_authorization_max_age
    refusal = verify(header_of(request), keys, call, time.time(), max_age)
    if refusal is None:
        refusal = _claim(settings, call.task_id, redeliverable=bool(task.acks_late))
    if refusal is not None:
        _refuse(settings, call, refusal, alert)
    setattr(request, _MARK, _AUTHORIZED)
    alert(AlertEvent(condition="authorization"))  # resolves an open incident: one mail per new one


def header_of(request: Any) -> object:
    """Return the authorization header of a task's request (custom headers are attributes)."""
    found = getattr(request, HEADER, None)
    custom = getattr(request, "headers", None)
    if found is None and isinstance(custom, dict):
        found = custom.get(HEADER)
    return found


def _used_ttl(settings: Settings) -> int:
    """How long a task id is remembered: as long as its authorization could still be accepted."""
    return settings.backup_task_authorization_max_age + 2 * CLOCK_SKEW


def _claim(settings: Settings, task_id: str, redeliverable: bool) -> Refusal | None:
    """Record ``task_id`` as used; return a Refusal when it was used before, unless it is a
    redelivery of a ``redeliverable`` task whose earlier execution did not finish."""
    r = coordination.client(settings)
    if r.set(USED_KEY.format(task_id), "running", nx=True, ex=_used_ttl(settings)):
        return None
    if redeliverable and r.get(USED_KEY.format(task_id)) == "running":
        return None
    return Refusal("replayed", f"task id {task_id} was authorized and run before: a message sent again")


def _refuse(settings: Settings, call: Call, refusal: Refusal, alert: Alert) -> NoReturn:
    """Audit and alert the refusal; raise TaskRefused. The signature is never written anywhere."""
    logger.error("%s %s refused: %s", call.task, call.task_id, refusal.reason)
    operation = call.task.removeprefix("vq_tasks.")
    audit(settings, operation, "refused", task=call.task, task_id=call.task_id, reason=refusal.reason)
    alert(
        AlertEvent(
            condition="authorization",
            failures={call.task: REASONS[refusal.kind]},
            summary={"task id": call.task_id, "reason": refusal.reason},
        )
    )
    raise TaskRefused(
        f"{call.task} refused: {refusal.reason}; destructive tasks need an authorization by a key "
        "in BACKUP_TASK_PUBLIC_KEYS (send them where BACKUP_TASK_KEY_FILE is set)"
    )


def mark_finished(task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any) -> None:
    """``task_postrun``: an authorized execution that succeeded or failed is done: a later delivery
    of its id is a replay (a rejected or requeued one is not done: its message comes back; a
    refused one marks nothing, or a forged message could end a real one's redeliveries)."""
    if task is None or task_id is None or state not in FINISHED_STATES:
        return
    if getattr(task.request, _MARK, None) is not _AUTHORIZED:
        return
    settings = get_settings()
    coordination.client(settings).set(USED_KEY.format(task_id), "done", xx=True, ex=_used_ttl(settings))


def startup_warnings(settings: Settings) -> list[str]:
    """Return what a worker says at start-up about who may run destructive tasks."""
    if not settings.backup_task_public_keys:
        return [
            "BACKUP_TASK_PUBLIC_KEYS is not set: whoever can reach the broker can run vq_tasks.prune "
            'and a forced vq_tasks.restore (README, "Authorized destructive tasks")'
        ]
    if settings.backup_task_key_file is None:
        return [
            "BACKUP_TASK_KEY_FILE is not set: the prunes this worker enqueues after each backup "
            "and off-site copy will be refused as unauthorized"
        ]
    return []
