"""compose/docker-compose.yml and the Dockerfile, checked without Docker: the Compose schema, every
reference resolved, every mounted file present, the secrets the operator makes by the README's
commands, scaling, one beat, a broker that is not the application's Redis, and the Dockerfile's
claims (non-root, the wrappers, tool versions matching the compose servers)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from vq_tasks.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
APP_SERVICES = ("worker", "beat", "exporter", "flower")
HEALTH_CHECKED = ("postgres", "app-redis", "broker", "worker", "exporter", "flower", "prometheus", "grafana")
SECRETS_DIR = "/run/secrets/"
INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}")


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # resolves the anchors and `<<` merges


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def env_example() -> dict[str, str]:
    values = {}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value
    return values


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Resolve ``${VAR}``, ``${VAR:-default}`` and ``$$`` as Docker Compose does."""

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        return variables.get(name) or (default or "")

    return INTERPOLATION.sub(one, value)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: "" if value is None else str(value) for name, value in env.items()}


def secret_names(service: dict) -> list[str]:
    return [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]


def volume_entries(service: dict) -> list[tuple[str, str]]:
    """Return (source, target) for every volume of ``service`` (short and long syntax)."""
    found = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
        else:
            source, target = entry.get("source", ""), entry["target"]
        found.append((source, target))
    return found


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def depends(service: dict) -> list[str]:
    deps = service.get("depends_on", [])
    return list(deps) if isinstance(deps, list | dict) else []


def readme_secret_commands() -> str:
    text = (COMPOSE_DIR / "README.md").read_text()
    block = text.split("<!-- secrets:begin -->")[1].split("<!-- secrets:end -->")[0]
    return block.split("```sh\n")[1].split("```")[0]


@pytest.fixture(scope="module")
def made_secrets(tmp_path_factory) -> Path:
    """Run the README's commands that create the secrets, in an empty folder; return it."""
    folder = tmp_path_factory.mktemp("compose")
    subprocess.run(["sh", "-eu", "-c", readme_secret_commands()], cwd=folder, check=True, timeout=30)
    return folder


def test_the_compose_file_passes_the_compose_specification_schema(tmp_path):
    checker = str(Path(sys.executable).parent / "check-jsonschema")
    command = [checker, "--builtin-schema", "vendor.compose-spec"]
    done = subprocess.run([*command, str(COMPOSE_FILE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    broken = tmp_path / "docker-compose.yml"  # the check can fail: a misspelt key is refused
    broken.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period:", "stop_grace_periode:"))
    refused = subprocess.run([*command, str(broken)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "stop_grace_periode" in refused.stdout


def test_the_required_services_exist(services):
    expected = {"postgres", "app-redis", "broker", "worker", "beat", "flower", "exporter", "prometheus"}
    assert expected | {"grafana", "mailcatcher"} <= set(services)


def test_every_referenced_service_volume_and_secret_is_defined_and_every_definition_used(compose, services):
    volumes, secrets = set(compose.get("volumes", {})), set(compose.get("secrets", {}))
    used_volumes, used_secrets = set(), set()
    for name, service in services.items():
        for dependency in depends(service):
            assert dependency in services, f"{name} depends on undefined service {dependency}"
            assert dependency != name
        for source, _target in volume_entries(service):
            if source and not is_bind(source):
                assert source in volumes, f"{name} mounts undefined volume {source}"
                used_volumes.add(source)
        for secret in secret_names(service):
            assert secret in secrets, f"{name} uses undefined secret {secret}"
            used_secrets.add(secret)
        for variable, value in environment(service).items():
            if value.startswith(SECRETS_DIR):  # a *_FILE variable names a secret the service has
                assert value.removeprefix(SECRETS_DIR) in secret_names(service), f"{name}: {variable}"
    assert used_volumes == volumes, f"volumes defined but never mounted: {volumes - used_volumes}"
    assert used_secrets == secrets, f"secrets defined but never used: {secrets - used_secrets}"


def test_every_mounted_file_and_build_context_exists_in_the_repository(services):
    for name, service in services.items():
        for source, _target in volume_entries(service):
            if is_bind(source):
                assert (COMPOSE_DIR / source).exists(), f"{name} mounts {source}, which does not exist"
        if "build" in service:
            build = service["build"]
            context = COMPOSE_DIR / (build if isinstance(build, str) else build["context"])
            dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
            assert (context / dockerfile).resolve() == DOCKERFILE, name


def test_every_secret_file_is_made_by_the_readme_commands_and_none_is_committed(compose, made_secrets):
    files = {name: secret["file"] for name, secret in compose["secrets"].items()}
    assert all(path.startswith("./secrets/") for path in files.values()), files
    for name, path in files.items():
        assert (made_secrets / path).is_file(), f"secret {name}: the README's commands do not make {path}"
        assert not (COMPOSE_DIR / path).exists(), f"{path} is in the repository: secrets are the operator's"
    made = {f"./{p.relative_to(made_secrets)}" for p in (made_secrets / "secrets").iterdir()}
    assert made == set(files.values())
    assert "secrets/" in (COMPOSE_DIR / ".gitignore").read_text().split()
    assert (made_secrets / "secrets").stat().st_mode & 0o777 == 0o700
    for path in files.values():
        assert (made_secrets / path).stat().st_mode & 0o777 == 0o644  # readable by the services' users


def test_the_made_secrets_fit_together(made_secrets):
    secret = {p.stem: p.read_text() for p in (made_secrets / "secrets").iterdir()}
    url = urlsplit(secret["broker_url"])
    assert (url.scheme, url.hostname, url.port, url.path) == ("redis", "broker", 6379, "/0")
    assert url.password == secret["broker_password"] and len(secret["broker_password"]) == 48
    user, _, password = secret["flower_basic_auth"].partition(":")
    assert user and len(password) == 48
    passwords = [secret[n] for n in ("db_password", "redis_password", "broker_password")]
    assert len({*passwords, password, secret["grafana_admin_password"]}) == 5  # all different
    assert secret["smtp_password"] == ""


def test_the_app_services_environment_is_a_valid_configuration(services, made_secrets, monkeypatch):
    """The environment compose gives each app service (with .env.example's values and the
    secrets made by the README's commands) loads, and its broker is the broker service."""
    variables = env_example()
    for name in APP_SERVICES:
        env = {k: interpolate(v, variables) for k, v in environment(services[name]).items()}
        for variable in list(os.environ):  # only what compose sets
            if variable.lower().removesuffix("_file") in Settings.model_fields or variable in env:
                monkeypatch.delenv(variable)
        for variable, value in env.items():
            if value.startswith(SECRETS_DIR):
                value = str(made_secrets / "secrets" / (value.removeprefix(SECRETS_DIR) + ".txt"))
            monkeypatch.setenv(variable, value)
        settings = load_settings()
        broker = urlsplit(settings.celery_broker_url.get_secret_value())
        assert broker.hostname == "broker" and settings.result_backend_url.startswith("redis://:")
        assert "CELERY_BROKER_URL_FILE" in env and "CELERY_BROKER_URL" not in env, name
        assert "broker_url" in secret_names(services[name])
        assert settings.backup_staging_dir == PurePosixPath("/var/tmp/vq-backup/staging")
        if name != "flower":
            assert (settings.db_host, settings.redis_host) == ("postgres", "app-redis")
            assert settings.db_password is not None and settings.redis_password is not None
            assert settings.smtp_host == "mailcatcher" and settings.smtp_port == 1025
        else:  # Flower only reads the broker: it gets no other secret
            assert secret_names(services[name]) == ["broker_url", "flower_basic_auth"]
            assert settings.db_password is None and settings.redis_password is None


def test_every_setting_of_env_example_reaches_the_app_services_with_the_same_default(services):
    """A setting in .env.example that x-vq-env does not pass on would be silently ignored; its
    default in docker-compose.yml (no .env) is the one .env.example shows."""
    for variable, value in env_example().items():
        if variable.lower() not in Settings.model_fields:
            continue  # compose's own: ports, image tag, worker concurrency
        for name in APP_SERVICES:
            passed = environment(services[name]).get(variable)
            assert passed is not None, f"{variable} of .env.example does not reach {name}"
            if passed.startswith("${"):
                assert interpolate(passed, {}) == value, f"{name}: {variable}"
    env = environment(services["beat"])
    assert env["BACKUP_PRUNE_SCHEDULE"] == "${BACKUP_PRUNE_SCHEDULE:-30 */6 * * *}"
    assert env_example()["BACKUP_PRUNE_SCHEDULE"] == "30 */6 * * *"


def test_the_broker_is_a_redis_of_its_own_and_never_the_application_redis(services):
    broker, app_redis = services["broker"], services["app-redis"]
    assert broker is not app_redis and broker["image"].startswith("redis:")
    assert "broker_password" in secret_names(broker) and "broker_password" not in secret_names(app_redis)
    assert "requirepass" in " ".join(broker["command"])
    assert {s for s, _ in volume_entries(broker)}.isdisjoint(s for s, _ in volume_entries(app_redis))
    for name in APP_SERVICES:
        env = environment(services[name])
        assert interpolate(env.get("REDIS_HOST", "app-redis"), {}) == "app-redis"
        assert not any("app-redis" in v for k, v in env.items() if k.startswith("CELERY_"))


def test_workers_scale_and_there_is_exactly_one_beat_named_backup_service(services):
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    assert worker["command"] == ["/app/workers/start"]
    assert worker.get("deploy", {}).get("replicas", 1) >= 1
    beats = [n for n, s in services.items() if "beat/start" in " ".join(map(str, s.get("command", [])))]
    assert beats == ["beat"]
    assert services["beat"]["container_name"] == "backup-service"
    assert services["beat"].get("deploy", {}).get("replicas", 1) == 1
    staging = {name: dict((t, s) for s, t in volume_entries(services[name])) for name in ("worker", "beat")}
    assert staging["worker"]["/var/tmp/vq-backup/staging"] == "staging"  # one named volume, shared
    assert staging["beat"]["/var/tmp/vq-backup/staging"] == "staging"
    for name, service in services.items():  # a fixed container name only on services never scaled
        assert "container_name" not in service or name == "beat"


def test_worker_beat_exporter_and_flower_run_the_one_image_built_from_the_dockerfile(services):
    images = {services[name]["image"] for name in APP_SERVICES}
    assert len(images) == 1
    assert services["exporter"]["command"] == ["vq-backup", "exporter"]
    assert services["flower"]["command"] == ["/app/flower/start"]
    assert services["beat"]["command"] == ["/app/beat/start"]


def test_the_services_have_health_checks(services):
    for name in HEALTH_CHECKED:
        check = services[name].get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "/app/workers/healthcheck"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    # the exporter is alive when it answers; /healthz is 503 with no backup yet or the broker down
    exporter = " ".join(services["exporter"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8080/metrics" in exporter and "/healthz" not in exporter
    for name in ("app-redis", "broker"):
        assert "redis-cli ping" in " ".join(services[name]["healthcheck"]["test"])
    for dependency in ("postgres", "app-redis", "broker"):
        assert services["worker"]["depends_on"][dependency]["condition"] == "service_healthy"


def test_flower_runs_behind_basic_auth_from_a_secret(services):
    flower = services["flower"]
    env = environment(flower)
    assert env["FLOWER_BASIC_AUTH_FILE"] == "/run/secrets/flower_basic_auth"
    assert "FLOWER_BASIC_AUTH" not in env
    assert any(str(p).endswith(":5555") for p in flower["ports"])
    start = (COMPOSE_DIR / "flower" / "start").read_text()
    assert "FLOWER_BASIC_AUTH_FILE" in start and "celery -A vq_tasks flower" in start


def test_grafana_and_prometheus_get_their_files_and_passwords_from_secrets(services):
    grafana = environment(services["grafana"])
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana
    assert dict(volume_entries(services["prometheus"]))["./prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    mail = services["mailcatcher"]
    assert any(str(p).endswith(":8025") for p in mail["ports"])
    assert environment(services["worker"])["SMTP_HOST"] == "${SMTP_HOST:-mailcatcher}"


# ---- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def args_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arg.split("=", 1) for op, arg in stage if op == "ARG" and "=" in arg)


def test_the_image_runs_as_a_non_root_user_with_a_fixed_uid():
    stage = final_stage()
    users = [arg for op, arg in stage if op == "USER"]
    assert users == ["vqbackup"]
    uid = args_of(stage)["VQ_UID"]
    assert uid.isdigit() and int(uid) >= 1000
    assert any(op == "RUN" and '--uid "${VQ_UID}"' in arg and "vqbackup" in arg for op, arg in stage)
    assert ("ENTRYPOINT", '["/usr/bin/tini", "--"]') in stage
    assert not [op for op, _ in dockerfile_instructions() if op == "HEALTHCHECK"]  # compose sets them
    assert dockerfile_instructions()[0] == ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm")


def test_the_image_has_the_wrappers_and_the_start_scripts_compose_runs(services):
    copied: dict[str, str] = {}
    for op, arg in final_stage():
        if op == "COPY" and "--from" not in arg:
            parts = [p for p in shlex.split(arg) if not p.startswith("--")]
            *sources, target = parts
            for source in sources:
                assert (ROOT / source).is_file(), source
                destination = target + Path(source).name if target.endswith("/") else target
                copied[str(PurePosixPath("/app") / destination)] = source
    assert copied["/scripts/backup.sh"] == "compose/scripts/backup.sh"
    assert copied["/scripts/restore.sh"] == "compose/scripts/restore.sh"
    for name in ("worker", "beat", "flower"):
        assert services[name]["command"][0] in copied, name
    assert services["worker"]["healthcheck"]["test"][1] in copied
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    for source in [*copied.values(), "pyproject.toml", "vq_tasks/"]:  # sent to the build
        assert any(p.startswith("!") and source.startswith(p[1:]) for p in dockerignore), source


def test_the_image_tools_match_the_compose_servers(services):
    stage = final_stage()
    args = args_of(stage)
    postgres_major = services["postgres"]["image"].split(":")[1].split(".")[0]
    assert args["PG_MAJOR"] == postgres_major  # pg_dump never older than the server
    install = " ".join(arg for op, arg in stage if op == "RUN")
    assert '"postgresql-client-${PG_MAJOR}"' in install and "apt.postgresql.org" in install
    assert "bookworm-pgdg" in install
    env = " ".join(arg for op, arg in stage if op == "ENV")
    assert "PG_BIN_DIR=/usr/lib/postgresql/${PG_MAJOR}/bin" in env
    assert "REDIS_SERVER_BIN=/usr/bin/redis-server" in env
    redis_tag = services["app-redis"]["image"].split(":")[1]
    assert args["REDIS_SERVER_VERSION"] == redis_tag  # a restore's redis-server reads its RDB
    assert '"redis-server=5:${REDIS_SERVER_VERSION}.*"' in install and "tar tini" in install
    assert "pip install --no-cache-dir '.[cloud,monitoring]'" in DOCKERFILE.read_text()


def test_the_compose_volumes_land_on_folders_the_image_gives_to_its_user(services):
    stage_text = " ".join(arg for op, arg in final_stage() if op == "RUN")
    owned = stage_text.split("install -d -o vqbackup -g vqbackup -m 0750")[1].split(";")[0].split()
    for name in ("worker", "beat", "exporter"):
        for source, target in volume_entries(services[name]):
            if not is_bind(source):
                assert target in owned, f"{name}: volume {source} at {target}, a folder vqbackup does not own"
