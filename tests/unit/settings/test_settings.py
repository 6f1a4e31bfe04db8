"""Every validation path of the settings, secrets from files, and no secret in any message."""

import pytest

from vq_tasks.settings import ConfigError, load_settings

OK = {"celery_broker_url": "redis://127.0.0.1:6390/0"}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(("BACKUP_", "DB_", "REDIS_", "CELERY_", "SMTP_", "COMPRESSION_", "PG_")):
            monkeypatch.delenv(name)


def problems(monkeypatch, **env) -> list[str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    return caught.value.problems


def test_defaults_are_valid(monkeypatch):
    monkeypatch.setenv("CELERY_BROKER_URL", OK["celery_broker_url"])
    settings = load_settings()
    assert settings.backup_schedule == "0 2 * * *"
    assert settings.backup_storage_provider == "Local"
    assert settings.backup_retention_days == 30 and settings.backup_logs_retention_days == 7
    assert settings.result_backend_url == OK["celery_broker_url"]


def test_every_problem_is_listed_at_once(monkeypatch):
    found = problems(
        monkeypatch,
        BACKUP_STORAGE_PROVIDER="Locl",
        BACKUP_SCHEDULE="0 2 * *",
        BACKUP_RETENTION_DAYS="-1",
        BACKUP_LOGS_RETENTION_DAYS="seven",
        DB_PORT="70000",
        COMPRESSION_ENABLED="perhaps",
        BACKUP_TIMEZONE="Mars/Olympus",
    )
    text = "\n".join(found)
    assert len(found) == 7, text
    assert "did you mean 'Local'" in text
    assert "needs 5 fields" in text
    assert "BACKUP_RETENTION_DAYS=-1" in text or "BACKUP_RETENTION_DAYS='-1'" in text
    assert "unknown time zone" in text


def test_problems_of_several_areas_that_fit_badly_together_are_listed_at_once(monkeypatch, tmp_path):
    """Each area's cross-field check used to stop the ones after it: now start-up lists all."""
    found = problems(
        monkeypatch,
        BACKUP_OFFSITE_PROVIDER="Local",  # without BACKUP_OFFSITE_PATH
        BACKUP_ENCRYPTION_ENABLED="true",  # without recipients
        SMTP_SSL="true",
        SMTP_STARTTLS="true",
        BACKUP_SIGNING_KEY_FILE=str(tmp_path / "missing.pem"),
    )
    text = "\n".join(found)
    assert "go together" in text and "STARTTLS exclude each other" in text, text
    assert "BACKUP_ENCRYPTION_RECIPIENTS" in text and "missing.pem" in text, text


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("BACKUP_SCHEDULE", "61 2 * * *", "invalid"),
        ("BACKUP_SCHEDULE", "* * * * * *", "needs 5 fields"),
        ("BACKUP_STORAGE_PROVIDER", "AWS_S4", "unknown provider"),
        ("BACKUP_LOGS_RETENTION_DAYS", "0", "greater than or equal to 1"),
        ("BACKUP_NAME_PREFIX", "../x", "pattern"),
        ("COMPRESSION_LEVEL", "10", "gzip takes 1 to 9"),
        ("COMPRESSION_LEVEL", "23", "less than or equal to 22"),
        ("COMPRESSION_ALGORITHM", "lz4", "'gzip' or 'zstd'"),
        ("REDIS_PORT", "0", "greater than or equal to 1"),
        ("CELERY_BROKER_URL", "http://x", "must be a redis://"),
    ],
)
def test_single_problems(monkeypatch, name, value, fragment):
    env = {"CELERY_BROKER_URL": OK["celery_broker_url"], name: value}
    found = problems(monkeypatch, **env)
    assert len(found) == 1 and name in found[0] and fragment in found[0]


def test_compression_level_defaults_and_ranges_follow_the_algorithm(monkeypatch):
    monkeypatch.setenv("CELERY_BROKER_URL", OK["celery_broker_url"])
    assert (load_settings().compression, load_settings().effective_compression_level) == ("gzip", 6)
    monkeypatch.setenv("COMPRESSION_ALGORITHM", "ZSTD")
    assert (load_settings().compression, load_settings().effective_compression_level) == ("zstd", 3)
    monkeypatch.setenv("COMPRESSION_LEVEL", "19")
    assert load_settings().effective_compression_level == 19
    monkeypatch.setenv("COMPRESSION_LEVEL", "20")
    assert "zstd takes 1 to 19" in problems(monkeypatch)[0]
    monkeypatch.setenv("COMPRESSION_LEVEL", "")
    monkeypatch.setenv("COMPRESSION_ENABLED", "false")
    assert load_settings().compression == "none"


def test_broker_on_the_backed_up_redis_is_refused(monkeypatch):
    found = problems(monkeypatch, CELERY_BROKER_URL="redis://localhost:6379/1", REDIS_HOST="127.0.0.1")
    assert "the Redis that is backed up" in found[0]


def test_result_backend_must_be_redis(monkeypatch):
    found = problems(monkeypatch, CELERY_BROKER_URL="amqp://guest@localhost//")
    assert "CELERY_RESULT_BACKEND must be a redis" in found[0]


def test_comma_separated_paths(monkeypatch):
    monkeypatch.setenv("CELERY_BROKER_URL", OK["celery_broker_url"])
    monkeypatch.setenv("BACKUP_CONFIG_PATHS", "/etc/vq, /opt/vq/conf ,")
    assert load_settings().backup_config_paths == ["/etc/vq", "/opt/vq/conf"]


def test_secret_from_file(monkeypatch, tmp_path):
    secret = tmp_path / "db_password"
    secret.write_text("s3cret-from-file\n")
    monkeypatch.setenv("CELERY_BROKER_URL", OK["celery_broker_url"])
    monkeypatch.setenv("DB_PASSWORD_FILE", str(secret))
    settings = load_settings()
    assert settings.db_password.get_secret_value() == "s3cret-from-file"
    assert "s3cret" not in repr(settings)


def test_secret_file_problems_never_show_the_secret(monkeypatch, tmp_path):
    found = problems(
        monkeypatch,
        CELERY_BROKER_URL=OK["celery_broker_url"],
        DB_PASSWORD="hunter2-visible",
        DB_PASSWORD_FILE=str(tmp_path / "x"),
        REDIS_PASSWORD_FILE=str(tmp_path / "missing"),
    )
    text = "\n".join(found)
    assert "DB_PASSWORD or DB_PASSWORD_FILE, not both" in text
    assert "REDIS_PASSWORD_FILE" in text and "No such file" in text
    assert "hunter2" not in text


def test_secret_values_include_url_passwords(monkeypatch):
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:brokerpw@127.0.0.1:6390/0")
    monkeypatch.setenv("SMTP_PASSWORD", "smtppw")
    assert set(load_settings().secret_values()) == {"brokerpw", "smtppw"}


def test_problems_across_variables_are_one_line_each(monkeypatch):
    found = problems(
        monkeypatch, CELERY_BROKER_URL="redis://localhost:6379/1", SMTP_SSL="true", SMTP_STARTTLS="true"
    )
    assert len(found) == 2
    assert any("SMTP_SSL and SMTP_STARTTLS" in line for line in found)
    assert any("the Redis that is backed up" in line for line in found)


def test_an_empty_optional_variable_means_unset(monkeypatch):
    for name in ("AWS_REGION", "BACKUP_STORAGE_QUOTA_GB", "BACKUP_AUDIT_LOG", "SMTP_USER"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("CELERY_BROKER_URL", OK["celery_broker_url"])
    settings = load_settings()
    assert settings.aws_region is None and settings.backup_storage_quota_gb is None
    assert settings.backup_audit_log is None and settings.smtp_user is None  # audit: log stream only


def test_an_smtp_login_needs_tls_except_on_this_host(monkeypatch, tmp_path):
    base = {"CELERY_BROKER_URL": OK["celery_broker_url"], "SMTP_USER": "vq", "SMTP_HOST": "mail.example.com"}
    found = problems(monkeypatch, **base)
    assert any("SMTP_USER is set but neither SMTP_SSL nor SMTP_STARTTLS" in p for p in found)
    monkeypatch.setenv("SMTP_STARTTLS", "true")
    assert load_settings().smtp_starttls
    monkeypatch.setenv("SMTP_STARTTLS", "false")
    monkeypatch.setenv("SMTP_HOST", "localhost")
    assert load_settings().smtp_user == "vq"
    missing = problems(monkeypatch, SMTP_CA_FILE=str(tmp_path / "nope.pem"))
    assert any(p.startswith("SMTP_CA_FILE=") and "no such file" in p for p in missing)
