"""Alerts through a real SMTP server (aiosmtpd) and the incident records in a real Redis: one mail
per incident, another only when it changes or is resolved; each condition (backup failure,
storage nearly full, retention problem, stale backups; the drill's in test_drill.py); TLS and
authentication."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.integration.conftest import BROKER_PASSWORD, Mailbox, run_cli
from tests.servers import free_port, tmpfs
from tests.unit.retention.test_pruning import plant as plant_backup
from vq_tasks.errors import BackupError, TransientError
from vq_tasks.monitoring.alerts import AlertEvent, deliver, retention_event
from vq_tasks.monitoring.monitor import alert_on
from vq_tasks.monitoring.status import StatusReader
from vq_tasks.retention.prune import prune_all
from vq_tasks.settings import load_settings

pytestmark = pytest.mark.integration
PREFIX = "virtualqueue_backup"


@pytest.fixture
def alert_settings(broker, smtp, tmp_path):
    """Settings that mail BACKUP_ALERT_EMAIL through the test's SMTP server, with the incidents in
    the test's own Redis, over a Local storage folder."""

    def make(**values):
        port, _ = smtp
        defaults = {
            "celery_broker_url": f"redis://:{BROKER_PASSWORD}@127.0.0.1:{broker.port}/0",
            "smtp_host": "127.0.0.1",
            "smtp_port": port,
            "backup_alert_email": "oncall@example.com",
            "notification_email": "team@example.com",
            "backup_storage_path": str(tmp_path / "backups"),
            "backup_staging_dir": tmp_path / "staging",
            "backup_audit_log": tmp_path / "audit.jsonl",
        }
        return load_settings(**{**defaults, **values})

    return make


def text(message) -> str:
    """The body of a received mail, with the line ends it had when sent."""
    return message.get_content().replace("\r\n", "\n")


def subjects(mailbox: Mailbox) -> list[str]:
    return [str(m["Subject"]).strip() for m in mailbox.messages]


def test_an_incident_mails_once_then_when_it_changes_and_when_it_is_resolved(alert_settings, smtp):
    _, mailbox = smtp
    settings = alert_settings()
    first = AlertEvent(
        condition="backup",
        backup_id=f"{PREFIX}_20261101_020000",
        failures={"database": f"pg_dump: {PREFIX}_20261101_020000 connection refused"},
    )
    redelivered = AlertEvent.model_validate(first.model_dump(mode="json"))
    next_night = AlertEvent(
        condition="backup",
        backup_id=f"{PREFIX}_20261102_020000",
        failures={"database": f"pg_dump: {PREFIX}_20261102_020000 connection refused"},
    )
    assert "opened mail sent" in deliver(settings, first)
    assert deliver(settings, redelivered).startswith("no alert sent: nothing new")
    assert deliver(settings, next_night).startswith("no alert sent: nothing new")  # the same incident
    assert subjects(mailbox) == [f"[VQ Backup] FAILED: {PREFIX}_20261101_020000 (database)"]
    body = text(mailbox.messages[0])
    assert "Failed: database\nError: pg_dump:" in body and "One mail per incident" in body

    changed = AlertEvent(
        condition="backup", backup_id=f"{PREFIX}_20261103_020000", failures={"redis": "authentication failed"}
    )
    assert "changed mail sent" in deliver(settings, changed)
    healthy = AlertEvent(condition="backup", backup_id=f"{PREFIX}_20261104_020000")
    assert "resolved mail sent" in deliver(settings, healthy)
    assert deliver(settings, healthy).startswith("no alert sent: nothing new")
    assert subjects(mailbox)[1:] == [
        f"[VQ Backup] CHANGED: FAILED: {PREFIX}_20261103_020000 (redis)",
        f"[VQ Backup] RESOLVED: backups succeed again: {PREFIX}_20261104_020000",
    ]
    assert all(m["To"] == "oncall@example.com" for m in mailbox.messages)
    summary = AlertEvent(
        condition="success", backup_id=f"{PREFIX}_20261104_020000", summary={"kind": "daily"}
    )
    assert "summary mail sent to team@example.com" in deliver(settings, summary)
    assert deliver(settings, summary) == "no summary sent: sent already"  # once per backup
    assert mailbox.messages[-1]["Subject"] == f"[VQ Backup] OK: {PREFIX}_20261104_020000"
    assert mailbox.messages[-1]["To"] == "team@example.com"
    audited = (settings.backup_audit_log).read_text().splitlines()
    assert sum('"operation": "alert"' in line for line in audited) == 4


def test_an_older_observation_never_reopens_what_a_newer_one_resolved(alert_settings, smtp):
    _, mailbox = smtp
    settings = alert_settings()
    now = datetime.now(UTC)
    late_failure = AlertEvent(
        condition="offsite", failures={"offsite": "timeout"}, observed_at=now - timedelta(hours=1)
    )
    assert "opened" in deliver(
        settings,
        AlertEvent(condition="offsite", failures={"offsite": "x"}, observed_at=now - timedelta(hours=2)),
    )
    assert "resolved" in deliver(settings, AlertEvent(condition="offsite", observed_at=now))
    assert deliver(settings, late_failure).startswith("no alert sent")  # a retry that came late
    assert len(mailbox.messages) == 2


def test_a_resolution_is_mailed_only_for_an_incident_that_was_announced(alert_settings, smtp, broker):
    _, mailbox = smtp
    down = alert_settings(smtp_port=free_port())  # nothing listens there
    problem = AlertEvent(condition="stale", failures={"primary": "no backup for 30 h"})
    with pytest.raises(TransientError, match=r"SMTP 127\.0\.0\.1"):
        deliver(down, problem)
    settings = alert_settings()
    assert deliver(settings, AlertEvent(condition="stale")).startswith("no alert sent")
    assert mailbox.messages == []


def test_a_mail_that_could_not_be_sent_is_still_owed_and_sent_by_the_retry(alert_settings, smtp):
    _, mailbox = smtp
    problem = AlertEvent(condition="retention", failures={"primary": "prune failed: disk error"})
    with pytest.raises(TransientError):
        deliver(alert_settings(smtp_port=free_port()), problem)
    assert "opened mail sent" in deliver(alert_settings(), problem)  # the task's retry
    assert subjects(mailbox) == ["[VQ Backup] RETENTION PROBLEM (primary)"]


def test_a_failing_backup_mails_once_until_a_backup_succeeds_through_real_workers(
    base_env, start_worker, smtp
):
    port, mailbox = smtp
    env = {
        **base_env,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "BACKUP_ALERT_EMAIL": "oncall@example.com",
        "NOTIFICATION_EMAIL": "team@example.com",
    }
    broken = {**env, "DB_NAME": "vq_no_such_database"}
    worker = start_worker(broken)
    for _ in range(2):
        assert run_cli(broken, "run", "--wait").returncode == 1
        time.sleep(1.1)  # backup ids name the second: the next run must not start in this one
    _wait(lambda: worker.log_text().count("'condition': 'backup'") >= 2, worker.log_text)
    assert len(mailbox.messages) == 1 and "FAILED" in mailbox.messages[0]["Subject"]
    assert "vq_no_such_database" in text(mailbox.messages[0])
    worker.stop()
    start_worker(env)
    done = run_cli(env, "run", "--wait")
    assert done.returncode == 0, done.stderr
    backup_id = done.stdout.strip().splitlines()[-1]
    found = {m["Subject"] for m in mailbox.wait_for(3)}
    assert found >= {
        f"[VQ Backup] RESOLVED: backups succeed again: {backup_id}",
        f"[VQ Backup] OK: {backup_id}",
    }
    audit = run_cli(env, "audit", "--operation", "backup", "--json")
    outcomes = [line for line in audit.stdout.splitlines() if line]
    assert (
        len(outcomes) == 3 and '"outcome": "succeeded"' in outcomes[-1] and '"origin": "cli:' in outcomes[-1]
    )
    for secret in ("db-secret-pw", "redis-secret-pw", BROKER_PASSWORD):
        assert all(secret not in m.as_string() for m in mailbox.messages)


def _wait(condition, describe, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, describe()[-3000:]
        time.sleep(0.2)


def plant(folder: Path, finished: datetime) -> str:
    """Store a complete daily backup (its files, then its manifest) that finished at ``finished``."""
    return plant_backup(folder, finished - timedelta(minutes=5), "daily")


def test_no_complete_backup_within_the_window_is_stale_until_one_completes(alert_settings, smtp, tmp_path):
    _, mailbox = smtp
    settings = alert_settings(backup_stale_after_hours=26)
    now = datetime.now(UTC)
    plant(tmp_path / "backups", now - timedelta(hours=30))
    reader, check = StatusReader(settings), alert_on(settings)
    check(reader.read())
    check(reader.read())  # the exporter reads every minute: still one mail
    assert subjects(mailbox) == ["[VQ Backup] NO RECENT BACKUP (primary)"]
    assert "over 26 h ago" in text(mailbox.messages[0])
    fresh = plant(tmp_path / "backups", datetime.now(UTC))
    check(reader.read())
    assert (
        subjects(mailbox)[1]
        == "[VQ Backup] RESOLVED: a backup completed within BACKUP_STALE_AFTER_HOURS again"
    )
    assert fresh


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB tmpfs for the backups folder."""
    with tmpfs(tmp_path / "small", "8m") as mount:
        yield mount


def test_a_nearly_full_local_disk_alerts_once_and_resolves_when_space_is_freed(
    alert_settings, smtp, small_disk
):
    _, mailbox = smtp
    folder = small_disk / "backups"
    settings = alert_settings(backup_storage_path=str(folder), backup_storage_min_free_percent=20)
    plant(folder, datetime.now(UTC))
    filler = small_disk / "filler"
    filler.write_bytes(b"\1" * (7 << 20))  # 7 of 8 MiB: under 20 % free
    reader, check = StatusReader(settings), alert_on(settings)
    check(reader.read())
    check(reader.read())
    assert subjects(mailbox) == ["[VQ Backup] STORAGE NEARLY FULL (primary)"]
    body = text(mailbox.messages[0])
    assert "free space under BACKUP_STORAGE_MIN_FREE_PERCENT=20%" in body and "primary free: " in body
    filler.unlink()
    check(reader.read())
    assert subjects(mailbox)[1] == "[VQ Backup] RESOLVED: every destination has enough free space again"


def test_a_cloud_quota_nearly_used_up_alerts(alert_settings, smtp, s3):
    from tests.emulators import create_bucket, s3_client, storage_env

    _, mailbox = smtp
    bucket = f"quota-{uuid.uuid4().hex[:8]}"
    create_bucket("AWS_S3", s3, bucket)
    env = storage_env("AWS_S3", s3, bucket, "vq")
    s3_client(s3).put_object(Bucket=bucket, Key="vq/other-file", Body=b"\0" * 100_000)
    quota_gib = 110_000 / (1 << 30)  # 110 kB granted, 100 kB used: 9 % free
    settings = alert_settings(**{k.lower(): v for k, v in env.items()}, backup_storage_quota_gb=quota_gib)
    alert_on(settings)(StatusReader(settings).read())
    assert subjects(mailbox) == ["[VQ Backup] STORAGE NEARLY FULL (primary)"]
    assert f"s3://{bucket}/vq" in text(mailbox.messages[0])


def test_prune_failing_is_a_retention_incident_resolved_by_a_clean_prune(alert_settings, smtp, s3, tmp_path):
    from tests.emulators import create_bucket, storage_env

    _, mailbox = smtp
    bucket = f"retention-{uuid.uuid4().hex[:8]}"
    env = {k.lower(): v for k, v in storage_env("AWS_S3", s3, bucket, "vq").items()}
    broken = alert_settings(**env)  # the bucket does not exist yet: listing it fails
    report = prune_all(broken, say=lambda line: None)
    assert not report.ok
    assert "opened mail sent" in deliver(broken, retention_event(report))
    assert subjects(mailbox) == ["[VQ Backup] RETENTION PROBLEM (primary)"]
    assert f"prune failed: AWS_S3:s3://{bucket}/vq: bucket {bucket} does not exist" in text(
        mailbox.messages[0]
    )
    create_bucket("AWS_S3", s3, bucket)
    report = prune_all(broken, say=lambda line: None)
    assert report.ok
    assert "resolved mail sent" in deliver(broken, retention_event(report))
    assert subjects(mailbox)[1] == "[VQ Backup] RESOLVED: prune ran and left nothing past its retention"


def _certificate(folder: Path) -> tuple[Path, Path]:
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.mark.parametrize("mode", ["starttls", "ssl"])
def test_mail_goes_over_tls_with_a_login(alert_settings, tmp_path, mode):
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test's certificate")
    key, cert = _certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    logins = []

    def authenticate(server, session, envelope, mechanism, data):
        logins.append((data.login, data.password))
        return AuthResult(success=(data.login, data.password) == (b"vq", b"smtp-secret-pw"))

    mailbox, port = Mailbox(), free_port()
    tls = {"tls_context": context} if mode == "starttls" else {"ssl_context": context}
    # aiosmtpd offers AUTH only on a connection it knows is encrypted: after STARTTLS; its check
    # does not see implicit TLS, so on the SSL listener it is turned off (the socket is TLS anyway)
    controller = Controller(
        mailbox, hostname="127.0.0.1", port=port, authenticator=authenticate,
        auth_require_tls=mode == "starttls", **tls,
    )  # fmt: skip
    controller.start()
    try:
        common = {"smtp_port": port, "smtp_ca_file": cert, "smtp_user": "vq", f"smtp_{mode}": True}
        settings = alert_settings(**common, smtp_password="smtp-secret-pw")
        assert "opened mail sent" in deliver(
            settings, AlertEvent(condition="drill", backup_id="b", failures={"verify": "x"})
        )
        # after refusing PLAIN, aiosmtpd leaves smtplib's LOGIN attempt unanswered: a short timeout
        wrong = alert_settings(**common, smtp_password="wrong-pw", smtp_timeout=2)
        with pytest.raises(BackupError) as failure:
            deliver(wrong, AlertEvent(condition="storage", failures={"primary": "full"}))
        assert "wrong-pw" not in str(failure.value)
    finally:
        controller.stop()
    assert [m["Subject"] for m in mailbox.messages] == ["[VQ Backup] RESTORE DRILL FAILED: b (verify)"]
    assert (b"vq", b"smtp-secret-pw") in logins


def test_the_exporter_process_mails_a_stale_backup_by_itself(broker, smtp, tmp_path, start_exporter):
    port, mailbox = smtp
    plant(tmp_path / "backups", datetime.now(UTC) - timedelta(hours=40))
    exporter = start_exporter(
        {
            "CELERY_BROKER_URL": f"redis://:{BROKER_PASSWORD}@127.0.0.1:{broker.port}/0",
            "BACKUP_STORAGE_PATH": str(tmp_path / "backups"),
            "BACKUP_STAGING_DIR": str(tmp_path / "staging"),
            "BACKUP_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
            "BACKUP_MONITOR_INTERVAL": "1",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(port),
            "BACKUP_ALERT_EMAIL": "oncall@example.com",
        }
    )
    mailbox.wait_for(1, timeout=30)
    time.sleep(2.5)  # two more readings: no second mail
    exporter.stop()
    assert subjects(mailbox) == ["[VQ Backup] NO RECENT BACKUP (primary)"]
    assert "stale: opened mail sent to oncall@example.com" in exporter.log.read_text()
    assert '"origin": "exporter"' in (tmp_path / "audit.jsonl").read_text()


def test_incident_records_survive_redelivery_and_races_between_senders(alert_settings, smtp):
    from vq_tasks import coordination

    settings = alert_settings()
    r = coordination.client(settings)

    def observe(condition: str, fingerprint: str, holder: str, at: float = 100.0) -> str:
        return coordination.observe_incident(r, condition, fingerprint, at, holder, event="{}")

    # a worker dies while sending: its redelivered task (same id) sends; another sender waits
    assert observe("backup", "X", "task-1") == "opened"
    assert observe("backup", "X", "task-2") == "busy"
    assert observe("backup", "X", "task-1") == "opened"
    coordination.incident_sent(r, "backup", "X", "task-1")
    assert observe("backup", "X", "task-2") == "none"

    # resolved while the opening is being sent: the resolution waits, then is owed once told
    assert observe("drill", "X", "a") == "opened"
    assert observe("drill", "", "b", at=101) == "busy"
    coordination.incident_sent(r, "drill", "X", "a")
    assert observe("drill", "", "b", at=101) == "resolved"

    # ... but not when the opening could not be sent: nobody heard of the incident
    assert observe("offsite", "X", "a") == "opened"
    assert observe("offsite", "", "b", at=101) == "busy"
    coordination.incident_sent(r, "offsite", "X", "a", sent=False)
    assert observe("offsite", "", "b", at=101) == "none"

    # a problem that changes before its opening went out is still an opening
    assert observe("storage", "X", "a") == "opened"
    coordination.incident_sent(r, "storage", "X", "a", sent=False)
    assert observe("storage", "Y", "b", at=101) == "opened"
    assert observe("storage", "Y", "c", at=50) == "stale"


def test_a_notice_left_owed_by_a_task_that_gave_up_is_sent_by_the_exporter(alert_settings, smtp):
    from vq_tasks.monitoring.alerts import send_owed

    _, mailbox = smtp
    problem = AlertEvent(condition="drill", backup_id="b1", failures={"verify": "sha256 mismatch"})
    with pytest.raises(TransientError):
        deliver(alert_settings(smtp_port=free_port()), problem, task_id="alert-task-1")  # its last retry
    outcomes = send_owed(alert_settings(), origin="exporter")
    assert outcomes == ["drill: opened mail sent to oncall@example.com"]
    assert send_owed(alert_settings(), origin="exporter") == []
    assert subjects(mailbox) == ["[VQ Backup] RESTORE DRILL FAILED: b1 (verify)"]
    assert "sha256 mismatch" in text(mailbox.messages[0])
