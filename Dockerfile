# syntax=docker/dockerfile:1
# The VQ Backup image: the image of the worker, beat, exporter and flower services of
# compose/docker-compose.yml. Build from the repository root: docker build -t vq-backup .
#
# pg_dump must not be older than the PostgreSQL server it dumps, and Debian bookworm ships
# PostgreSQL 15, so the client comes from the PostgreSQL project's apt repository (PGDG) in the
# major version of the compose file's postgres service (PG_MAJOR; tests/unit/test_compose.py
# checks that they agree). A restore loads the RDB into a throwaway redis-server, which must read
# the RDB version of the Redis that is backed up: bookworm's redis-server is 7.0, the version of the
# compose file's app-redis service (REDIS_SERVER_VERSION, checked the same way).
#
# Two ways to get pg_dump (POSTGRES_CLIENT_SOURCE):
#   pgdg    (default, production) postgresql-client-${PG_MAJOR} from apt.postgresql.org, so that
#           pg_dump is never older than the server;
#   debian  Debian bookworm's own postgresql-client-15 only, for builds that cannot reach PGDG (e.g.
#           compose/test/run): needs --build-arg PG_MAJOR=15 and a PostgreSQL server of 15 or older.
# PYTHON_IMAGE may name a local image for an offline build (compose/test/standins/python.Containerfile).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the package and its cloud and monitoring extras, into a virtualenv -------------------
FROM ${PYTHON_IMAGE} AS build
# every package at the version constraints.txt pins, the build's own setuptools included
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT=/src/constraints.txt
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY vq_tasks ./vq_tasks
RUN /opt/venv/bin/pip install --no-cache-dir '.[cloud,monitoring]'

# ---- runtime -------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG PG_MAJOR=16
ARG REDIS_SERVER_VERSION=7.0
ARG VQ_UID=10001
ARG POSTGRES_CLIENT_SOURCE=pgdg

RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    case "${POSTGRES_CLIENT_SOURCE}" in \
      pgdg) \
        apt-get install -y --no-install-recommends curl; \
        install -d -m 0755 /usr/share/postgresql-common/pgdg; \
        curl -fsSL -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
            https://www.postgresql.org/media/keys/ACCC4CF8.asc; \
        echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
            > /etc/apt/sources.list.d/pgdg.list; \
        apt-get purge -y --auto-remove curl; \
        apt-get update ;; \
      debian) \
        apt-cache show "postgresql-client-${PG_MAJOR}" >/dev/null 2>&1 || { \
          echo "Debian has no postgresql-client-${PG_MAJOR}: build with --build-arg PG_MAJOR=15 (bookworm's)," \
               "or POSTGRES_CLIENT_SOURCE=pgdg" >&2; exit 1; } ;; \
      *) echo "POSTGRES_CLIENT_SOURCE must be pgdg or debian, not ${POSTGRES_CLIENT_SOURCE}" >&2; exit 1 ;; \
    esac; \
    apt-get install -y --no-install-recommends \
        "postgresql-client-${PG_MAJOR}" \
        "redis-tools=5:${REDIS_SERVER_VERSION}.*" "redis-server=5:${REDIS_SERVER_VERSION}.*" \
        tar tini zstd; \
    rm -rf /var/lib/apt/lists/*; \
    "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_dump" --version; \
    redis-server --version

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PG_BIN_DIR=/usr/lib/postgresql/${PG_MAJOR}/bin \
    REDIS_SERVER_BIN=/usr/bin/redis-server

# A fixed uid, so that volumes and secret files can be given to it on the host. The folders are
# the settings' defaults; compose mounts named volumes on them, which take this ownership.
RUN set -eux; \
    groupadd --system --gid "${VQ_UID}" vqbackup; \
    useradd --system --uid "${VQ_UID}" --gid vqbackup --home-dir /home/vqbackup --create-home \
        --shell /usr/sbin/nologin vqbackup; \
    install -d -o vqbackup -g vqbackup -m 0750 \
        /var/backups/virtualqueue /var/tmp/vq-backup /var/tmp/vq-backup/staging \
        /var/tmp/vq-backup/restored-logs /var/log/vq-backup /var/lib/vq-backup \
        /etc/virtualqueue /var/log/virtualqueue

WORKDIR /app
COPY --chmod=0755 workers/start workers/healthcheck ./workers/
COPY --chmod=0755 beat/start ./beat/
COPY --chmod=0755 compose/flower/start ./flower/start
COPY --chmod=0755 compose/scripts/backup.sh compose/scripts/restore.sh /scripts/

USER vqbackup
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["/app/workers/start"]
