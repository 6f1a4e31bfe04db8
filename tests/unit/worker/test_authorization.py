"""Authorized destructive tasks (vq_tasks.worker.authorization): the signed canonical call, each
reason a message is refused, the header a sender adds, the worker's refusal (audit line, alert,
permanent error, replays) and the start-up checks of the keys."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vq_tasks.crypto.signing import key_id, public_key_text
from vq_tasks.monitoring.alerts import AlertEvent
from vq_tasks.settings import ConfigError, get_settings, load_settings
from vq_tasks.worker import authorization
from vq_tasks.worker.authorization import HEADER, Call, authorization_header, verify

NOW = 1_800_000_000
MAX_AGE = 3600
CALL = Call("vq_tasks.restore", "4f1c-task-id", [], {"backup_id": "latest", "force": True})


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("BACKUP_", "CELERY_", "REDIS_", "SMTP_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:6390/0")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def keys_of(*private: Ed25519PrivateKey) -> dict:
    return {key_id(k.public_key()): k.public_key() for k in private}


def write_key(path: Path, key: Ed25519PrivateKey, mode: int = 0o600) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(mode)
    return path


def over_the_wire(header: dict) -> dict:
    """The header as a worker reads it: through JSON, as the broker carries it."""
    return json.loads(json.dumps(header))


# ---- the canonical signature and each reason for a refusal ------------------------------------


def test_a_call_signed_by_a_trusted_key_is_authorized(key):
    header = over_the_wire(authorization_header(key, CALL, NOW))
    assert verify(header, keys_of(key), CALL, NOW + 5, MAX_AGE) is None
    assert set(header) == {"version", "key_id", "issued_at", "signature"}


@pytest.mark.parametrize(
    "changed",
    [
        Call(
            CALL.task, CALL.task_id, [], {**CALL.kwargs, "backup_id": "virtualqueue_backup_20240101_020000"}
        ),
        Call(CALL.task, CALL.task_id, [], {**CALL.kwargs, "components": ["database"]}),
        Call(CALL.task, CALL.task_id, ["latest"], CALL.kwargs),
        Call(CALL.task, "another-task-id", [], CALL.kwargs),
        Call("vq_tasks.prune", CALL.task_id, [], CALL.kwargs),
    ],
    ids=["argument", "added-argument", "positional", "task-id", "task-name"],
)
def test_a_signature_binds_the_task_its_id_and_its_arguments(key, changed):
    header = authorization_header(key, CALL, NOW)
    refusal = verify(header, keys_of(key), changed, NOW, MAX_AGE)
    assert refusal is not None and refusal.kind == "mismatch"
    assert "does not match the task, its id or its arguments" in refusal.reason


def test_a_changed_time_of_issue_or_key_id_breaks_the_signature(key):
    header = authorization_header(key, CALL, NOW - 10 * MAX_AGE)
    refreshed = {**header, "issued_at": NOW}
    refusal = verify(refreshed, keys_of(key), CALL, NOW, MAX_AGE)
    assert refusal is not None and refusal.kind == "mismatch"


def test_an_authorization_older_than_the_maximum_age_is_refused(key):
    header = authorization_header(key, CALL, NOW)
    assert verify(header, keys_of(key), CALL, NOW + MAX_AGE, MAX_AGE) is None
    refusal = verify(header, keys_of(key), CALL, NOW + MAX_AGE + 1, MAX_AGE)
    assert refusal is not None and refusal.kind == "expired"
    assert "3601 s ago, more than BACKUP_TASK_AUTHORIZATION_MAX_AGE=3600" in refusal.reason


def test_an_authorization_from_the_future_beyond_the_clock_skew_is_refused(key):
    header = authorization_header(key, CALL, NOW + authorization.CLOCK_SKEW)
    assert verify(header, keys_of(key), CALL, NOW, MAX_AGE) is None  # a sender's clock a little ahead
    ahead = authorization_header(key, CALL, NOW + authorization.CLOCK_SKEW + 30)
    refusal = verify(ahead, keys_of(key), CALL, NOW, MAX_AGE)
    assert refusal is not None and refusal.kind == "future" and "in the future" in refusal.reason


def test_a_key_not_in_the_trusted_list_is_refused(key):
    stranger = Ed25519PrivateKey.generate()
    header = authorization_header(stranger, CALL, NOW)
    refusal = verify(header, keys_of(key), CALL, NOW, MAX_AGE)
    assert refusal is not None and refusal.kind == "unknown key"
    assert key_id(stranger.public_key()) in refusal.reason and "BACKUP_TASK_PUBLIC_KEYS" in refusal.reason


def test_a_forged_signature_under_a_trusted_key_id_is_refused(key):
    stranger = Ed25519PrivateKey.generate()
    forged = {**authorization_header(stranger, CALL, NOW), "key_id": key_id(key.public_key())}
    refusal = verify(forged, keys_of(key), CALL, NOW, MAX_AGE)
    assert refusal is not None and refusal.kind == "mismatch"


def test_a_missing_header_is_refused(key):
    refusal = verify(None, keys_of(key), CALL, NOW, MAX_AGE)
    assert refusal is not None and refusal.kind == "missing" and "without an authorization" in refusal.reason


@pytest.mark.parametrize(
    "damage",
    [
        lambda h: "a string",
        lambda h: {**h, "version": 2},
        lambda h: {**h, "issued_at": str(h["issued_at"])},
        lambda h: {**h, "issued_at": True},
        lambda h: {k: v for k, v in h.items() if k != "signature"},
        lambda h: {**h, "key_id": None},
    ],
    ids=["not-a-dict", "version", "time-as-text", "time-as-bool", "no-signature", "no-key-id"],
)
def test_a_malformed_header_is_refused(key, damage):
    header = damage(authorization_header(key, CALL, NOW))
    refusal = verify(header, keys_of(key), CALL, NOW, MAX_AGE)
    assert refusal is not None and refusal.kind == "malformed"


def test_a_signature_that_is_not_base64_is_a_mismatch_not_a_crash(key):
    header = {**authorization_header(key, CALL, NOW), "signature": "not base64 !"}
    refusal = verify(header, keys_of(key), CALL, NOW, MAX_AGE)
    assert refusal is not None and refusal.kind == "mismatch"


def test_the_canonical_form_is_sorted_compact_and_says_what_it_is_for():
    signed = authorization.canonical(Call("t", "i", [1], {"b": "é", "a": None}), 5, "k")
    assert signed == (
        b'{"args":[1],"id":"i","issued_at":5,"key_id":"k","kwargs":{"a":null,"b":"\\u00e9"},'
        b'"purpose":"vq-backup task authorization","task":"t","version":1}'
    )


# ---- the sender: before_task_publish -----------------------------------------------------------


def publish(name: str, args=(), kwargs=None, task_id: str = "task-1") -> dict[str, Any]:
    """Run the handler as Celery does for a message of protocol 2; return its headers."""
    headers = {"task": name, "id": task_id}
    authorization.sign_outgoing(sender=name, body=(args, kwargs or {}, {}), headers=headers)
    return headers


def test_a_sender_with_the_key_signs_prune_and_restore_and_nothing_else(key, tmp_path, monkeypatch):
    monkeypatch.setenv("BACKUP_TASK_KEY_FILE", str(write_key(tmp_path / "task.pem", key)))
    get_settings.cache_clear()
    headers = publish("vq_tasks.restore", kwargs={"force": True, "backup_id": "latest"}, task_id="r-1")
    worker_sees = Call("vq_tasks.restore", "r-1", [], {"backup_id": "latest", "force": True})
    assert (
        verify(over_the_wire(headers[HEADER]), keys_of(key), worker_sees, headers[HEADER]["issued_at"], 60)
        is None
    )
    pruned = publish("vq_tasks.prune", args=(False,), task_id="p-1")
    assert (
        verify(
            pruned[HEADER],
            keys_of(key),
            Call("vq_tasks.prune", "p-1", [False], {}),
            pruned[HEADER]["issued_at"],
            60,
        )
        is None
    )
    assert HEADER not in publish("vq_tasks.backup") and HEADER not in publish("vq_tasks.alert")


def test_a_sender_without_the_key_adds_nothing(monkeypatch):
    get_settings.cache_clear()
    assert HEADER not in publish("vq_tasks.prune")


# ---- the worker: require -------------------------------------------------------------------------


class FakeRedis:
    """The few commands the replay record uses, with their NX and XX semantics."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def set(self, key: str, value: str, nx: bool = False, xx: bool = False, ex: int | None = None) -> bool:
        assert ex is not None and ex > 0
        if (nx and key in self.values) or (xx and key not in self.values):
            return False
        self.values[key] = value
        return True

    def get(self, key: str) -> str | None:
        return self.values.get(key)


@pytest.fixture
def worker(key, tmp_path, monkeypatch):
    """A worker's settings trusting ``key``, its Celery Redis (a fake) and the alerts it sends."""
    audit_log = tmp_path / "audit.jsonl"
    listed = [public_key_text(key.public_key())]
    settings = load_settings(backup_task_public_keys=listed, backup_audit_log=audit_log)
    monkeypatch.setattr(authorization, "get_settings", lambda: settings)
    redis = FakeRedis()
    monkeypatch.setattr(authorization.coordination, "client", lambda settings: redis)
    alerts: list[AlertEvent] = []
    return SimpleNamespace(settings=settings, redis=redis, alerts=alerts, audit=audit_log)


def task_for(call: Call, header: object = None, acks_late: bool = False) -> SimpleNamespace:
    request = SimpleNamespace(id=call.task_id, args=call.args, kwargs=call.kwargs, headers=None)
    if header is not None:
        setattr(request, HEADER, header)
    return SimpleNamespace(name=call.task, request=request, acks_late=acks_late)


def signed_task(key, call: Call = CALL, acks_late: bool = False) -> SimpleNamespace:
    import time

    return task_for(call, over_the_wire(authorization_header(key, call, int(time.time()))), acks_late)


def test_an_authorized_task_runs_and_resolves_the_incident(key, worker):
    authorization.require(signed_task(key), worker.settings, worker.alerts.append)
    assert [(e.condition, e.problem) for e in worker.alerts] == [("authorization", False)]
    assert worker.redis.values == {f"vq:authorized:{CALL.task_id}": "running"}


def test_a_refused_task_fails_for_good_audits_and_alerts_without_the_signature(key, worker):
    stranger = Ed25519PrivateKey.generate()
    header = authorization_header(stranger, CALL, NOW)
    with pytest.raises(authorization.TaskRefused) as refused:
        authorization.require(task_for(CALL, header), worker.settings, worker.alerts.append)
    assert not refused.value.transient and "vq_tasks.restore refused: signed by key" in str(refused.value)
    line = json.loads(worker.audit.read_text())
    assert (line["operation"], line["outcome"], line["task"], line["task_id"]) == (
        "restore",
        "refused",
        "vq_tasks.restore",
        CALL.task_id,
    )
    assert "not in BACKUP_TASK_PUBLIC_KEYS" in line["reason"]
    assert header["signature"] not in worker.audit.read_text() + str(refused.value)
    (event,) = worker.alerts
    assert event.condition == "authorization"
    assert event.failures == {"vq_tasks.restore": authorization.REASONS["unknown key"]}
    assert worker.redis.values == {}  # a refused message uses up no task id


def test_a_task_without_the_header_is_refused(worker):
    with pytest.raises(authorization.TaskRefused, match="sent without an authorization"):
        authorization.require(task_for(CALL), worker.settings, worker.alerts.append)
    assert worker.alerts[0].failures == {"vq_tasks.restore": authorization.REASONS["missing"]}


def test_a_message_sent_again_is_refused(key, worker):
    task = signed_task(key)
    authorization.require(task, worker.settings, worker.alerts.append)
    with pytest.raises(authorization.TaskRefused, match="was authorized and run before"):
        authorization.require(task, worker.settings, worker.alerts.append)
    assert json.loads(worker.audit.read_text())["outcome"] == "refused"


def test_a_redelivered_prune_runs_until_its_first_execution_finished(key, worker):
    call = Call("vq_tasks.prune", "prune-1", [], {})
    task = signed_task(key, call, acks_late=True)
    authorization.require(task, worker.settings, worker.alerts.append)
    authorization.require(task, worker.settings, worker.alerts.append)  # its worker died: redelivered
    authorization.mark_finished(task_id="prune-1", task=task, state="REJECTED")  # handed back: not done
    authorization.require(task, worker.settings, worker.alerts.append)
    authorization.mark_finished(task_id="prune-1", task=task, state="SUCCESS")
    with pytest.raises(authorization.TaskRefused, match="run before"):
        authorization.require(task, worker.settings, worker.alerts.append)


def test_a_refused_message_with_a_running_prunes_id_does_not_end_its_redeliveries(key, worker):
    call = Call("vq_tasks.prune", "prune-2", [], {})
    running = signed_task(key, call, acks_late=True)
    authorization.require(running, worker.settings, worker.alerts.append)
    forged = task_for(call, {**authorization_header(key, call, NOW), "signature": "AAAA"}, acks_late=True)
    forged.request._vq_authorized = True  # as a custom header would set it
    with pytest.raises(authorization.TaskRefused, match="does not match"):
        authorization.require(forged, worker.settings, worker.alerts.append)
    authorization.mark_finished(task_id="prune-2", task=forged, state="FAILURE")
    assert worker.redis.values["vq:authorized:prune-2"] == "running"
    authorization.require(running, worker.settings, worker.alerts.append)  # still its redelivery


def test_without_trusted_keys_nothing_is_checked(monkeypatch):
    get_settings.cache_clear()
    monkeypatch.setattr(authorization.coordination, "client", lambda settings: pytest.fail("no Redis"))
    alerts: list[AlertEvent] = []
    authorization.require(task_for(CALL), get_settings(), alerts.append)
    assert alerts == []


# ---- start-up: the settings check and the worker's warnings ---------------------------------------


def test_the_public_keys_come_from_the_environment_comma_separated(key, monkeypatch):
    other = Ed25519PrivateKey.generate()
    texts = [public_key_text(k.public_key()) for k in (key, other)]
    monkeypatch.setenv("BACKUP_TASK_PUBLIC_KEYS", f"{texts[0]}, {texts[1]}")
    settings = load_settings()
    assert settings.backup_task_public_keys == texts
    assert authorization.trusted_keys(settings).keys() == keys_of(key, other).keys()


def test_the_key_file_and_the_public_keys_are_checked_at_start_up(key, tmp_path, monkeypatch):
    path = write_key(tmp_path / "task.pem", key)
    listed = public_key_text(key.public_key())
    assert (
        load_settings(backup_task_key_file=path, backup_task_public_keys=[listed]).backup_task_key_file
        == path
    )
    with pytest.raises(ConfigError) as bad:
        load_settings(backup_task_key_file=tmp_path / "none.pem", backup_task_public_keys=["nokey"])
    assert any(p.startswith(f"BACKUP_TASK_KEY_FILE {tmp_path / 'none.pem'}:") for p in bad.value.problems)
    assert "BACKUP_TASK_PUBLIC_KEYS: entry 1 is not the base64 of a 32-byte Ed25519 public key" in (
        bad.value.problems
    )
    write_key(tmp_path / "open.pem", key, mode=0o644)
    with pytest.raises(ConfigError) as readable:
        load_settings(backup_task_key_file=tmp_path / "open.pem")
    assert "BACKUP_TASK_KEY_FILE" in readable.value.problems[0] and "chmod 600" in readable.value.problems[0]


def test_a_key_file_whose_key_the_same_process_does_not_trust_is_refused(key, tmp_path):
    other = public_key_text(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(ConfigError) as caught:
        load_settings(
            backup_task_key_file=write_key(tmp_path / "task.pem", key), backup_task_public_keys=[other]
        )
    assert caught.value.problems == [
        f"BACKUP_TASK_KEY_FILE holds key {key_id(key.public_key())}, which is not in "
        "BACKUP_TASK_PUBLIC_KEYS: the prunes and restores this process sends would be refused"
    ]


def test_a_worker_warns_when_anyone_with_broker_access_can_destroy(key, tmp_path):
    (open_door,) = authorization.startup_warnings(load_settings())
    assert "whoever can reach the broker can run vq_tasks.prune" in open_door
    listed = public_key_text(key.public_key())
    (no_key,) = authorization.startup_warnings(load_settings(backup_task_public_keys=[listed]))
    assert "BACKUP_TASK_KEY_FILE is not set" in no_key
    path = write_key(tmp_path / "task.pem", key)
    assert (
        authorization.startup_warnings(
            load_settings(backup_task_public_keys=[listed], backup_task_key_file=path)
        )
        == []
    )
