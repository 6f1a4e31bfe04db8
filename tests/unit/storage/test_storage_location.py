"""Storage paths in the guide's forms, per provider, and the destinations the settings build."""

from __future__ import annotations

import pytest

from vq_tasks.settings import ConfigError, load_settings
from vq_tasks.storage.location import parse_location

BROKER = {"celery_broker_url": "redis://127.0.0.1:1/0"}


@pytest.mark.parametrize(
    ("provider", "path", "container", "prefix"),
    [
        ("Local", "/var/backups/virtualqueue", "/var/backups/virtualqueue", ""),
        ("AWS_S3", "s3://vq-backups", "vq-backups", ""),
        ("AWS_S3", "s3://vq-backups/prod/daily/", "vq-backups", "prod/daily"),
        ("Google_Cloud", "gs://vq_backups.example.com/prod", "vq_backups.example.com", "prod"),
        ("Azure_Blob", "https://vqacct.blob.core.windows.net/backups/prod", "backups", "prod"),
        ("Azure_Blob", "https://vqacct.blob.core.chinacloudapi.cn/backups", "backups", ""),
    ],
)
def test_paths_in_the_guides_forms(provider, path, container, prefix):
    location = parse_location(provider, path)
    assert (location.container, location.prefix, str(location)) == (container, prefix, path)
    assert location.key("x_manifest.json") == (f"{prefix}/x_manifest.json" if prefix else "x_manifest.json")


def test_azure_account_and_endpoint_come_from_the_url():
    location = parse_location("Azure_Blob", "https://vqacct.blob.core.windows.net/backups/a/b")
    assert (location.account, location.endpoint_suffix, location.prefix) == (
        "vqacct",
        "core.windows.net",
        "a/b",
    )


@pytest.mark.parametrize(
    ("provider", "path", "message"),
    [
        ("AWS_S3", "/var/backups", "s3://bucket/prefix"),
        ("AWS_S3", "gs://bucket/x", "s3://bucket/prefix"),
        ("AWS_S3", "s3://UPPER/x", "not a valid bucket name"),
        ("AWS_S3", "s3://bucket/../x", "must not contain"),
        ("Google_Cloud", "s3://bucket", "gs://bucket/prefix"),
        ("Azure_Blob", "https://example.com/container", "account.blob.core.windows.net"),
        ("Azure_Blob", "http://vqacct.blob.core.windows.net/backups", "account.blob.core.windows.net"),
        ("Azure_Blob", "https://vqacct.blob.core.windows.net/", "account.blob.core.windows.net"),
        ("Azure_Blob", "https://vqacct.blob.core.windows.net/Bad_Name", "not a valid container name"),
        ("Local", "s3://bucket", "a folder"),
    ],
)
def test_wrong_forms_name_the_expected_one(provider, path, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_location(provider, path)


def test_settings_list_every_storage_problem_at_once():
    with pytest.raises(ConfigError) as failure:
        load_settings(
            backup_storage_provider="AWS_S3",
            backup_storage_path="/var/backups",
            backup_offsite_provider="Azure_Blobs",
            backup_offsite_path="https://x",
            **BROKER,
        )
    text = str(failure.value)
    assert "BACKUP_STORAGE_PATH='/var/backups': AWS_S3 needs s3://bucket/prefix" in text, text
    assert "did you mean 'Azure_Blob'" in text


def test_offsite_needs_both_variables_and_another_place():
    with pytest.raises(ConfigError, match="go together"):
        load_settings(backup_offsite_provider="Local", **BROKER)
    with pytest.raises(ConfigError, match="the copy must go elsewhere"):
        load_settings(
            backup_storage_provider="AWS_S3",
            backup_storage_path="s3://vq-backups/prod",
            backup_offsite_provider="AWS_S3",
            backup_offsite_path="s3://vq-backups/prod/",
            **BROKER,
        )


def test_offsite_credentials_fall_back_to_the_primary_ones():
    settings = load_settings(
        backup_storage_provider="AWS_S3",
        backup_storage_path="s3://vq-backups/prod",
        aws_access_key_id="AKIAPRIMARY",
        aws_secret_access_key="primary-secret",
        aws_region="eu-west-1",
        backup_offsite_provider="AWS_S3",
        backup_offsite_path="s3://vq-dr/prod",
        backup_offsite_aws_access_key_id="AKIAOFFSITE",
        backup_offsite_aws_secret_access_key="offsite-secret",
        **BROKER,
    )
    primary, offsite = settings.destination(), settings.destination("offsite")
    assert primary.credentials.aws_access_key_id == "AKIAPRIMARY"
    assert offsite.credentials.aws_access_key_id == "AKIAOFFSITE"
    assert offsite.credentials.aws_secret_access_key.get_secret_value() == "offsite-secret"
    assert offsite.credentials.aws_region == "eu-west-1"  # not given for the off-site copy: inherited
    assert offsite.location.container == "vq-dr"
    assert "primary-secret" not in repr(primary) and "offsite-secret" not in repr(offsite)
    assert {"primary-secret", "offsite-secret"} <= set(settings.secret_values())
    assert load_settings(**BROKER).destination("offsite") is None


def test_keys_inside_a_connection_string_are_secrets(tmp_path):
    secret_file = tmp_path / "conn"
    secret_file.write_text("DefaultEndpointsProtocol=https;AccountName=vqacct;AccountKey=c2VjcmV0a2V5PT0=;\n")
    import os

    os.environ["AZURE_STORAGE_CONNECTION_STRING_FILE"] = str(secret_file)
    try:
        settings = load_settings(**BROKER)
    finally:
        del os.environ["AZURE_STORAGE_CONNECTION_STRING_FILE"]
    assert "c2VjcmV0a2V5PT0=" in settings.secret_values()
    assert settings.azure_storage_connection_string.get_secret_value().startswith("DefaultEndpointsProtocol")


@pytest.mark.parametrize(
    "path",
    [
        "https://vqacct.blob.core.windows.net/backups/prod?sv=2024&sig=SECRETSIG",
        "s3://AKIAKEY:SECRETSIG@vq-backups/prod",
        "gs://vq-backups/prod#SECRETSIG",
    ],
)
def test_credentials_in_a_path_are_refused_and_never_echoed(path):
    provider = {"h": "Azure_Blob", "s": "AWS_S3", "g": "Google_Cloud"}[path[0]]
    with pytest.raises(ConfigError) as failure:
        load_settings(backup_storage_provider=provider, backup_storage_path=path, **BROKER)
    assert "SECRETSIG" not in str(failure.value) and "no query" in str(failure.value)


def test_offsite_does_not_take_over_the_primary_endpoint():
    settings = load_settings(
        backup_storage_provider="AWS_S3",
        backup_storage_path="s3://vq-backups/prod",
        aws_endpoint_url="http://minio.local:9000",
        aws_access_key_id="AKIASHARED",
        backup_offsite_provider="AWS_S3",
        backup_offsite_path="s3://vq-backups/prod",  # the same bucket name, but on AWS: another place
        **BROKER,
    )
    offsite = settings.destination("offsite")
    assert offsite.credentials.aws_endpoint_url is None  # the SDK's default: AWS itself
    assert offsite.credentials.aws_access_key_id == "AKIASHARED"
