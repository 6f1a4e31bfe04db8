# VQ Backup. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# every Python package, direct and indirect, at the version constraints.txt pins (`make lock` renews it);
# PIP_CONSTRAINT reaches pip's build environments too (setuptools)
LOCK   := constraints.txt
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)
AZURITE_VERSION ?= 3.35.0
AZURITE := .emulators/node_modules/.bin/azurite-blob

.PHONY: install lock tools emulators demo test test-unit test-unit-debian compose-test lint bench bench-scaling clean

$(STAMP):  # named by the hash of both files: a change to either installs again
	$(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(LOCK) $(BIN)/python -m pip install -q pip setuptools
	PIP_CONSTRAINT=$(LOCK) $(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

# pinned on the oldest Python the package declares, which needs the most (redis needs async-timeout
# below 3.11.3): Debian 12's own python3 is 3.11.2
LOCK_PYTHON ?= /usr/bin/python3

lock:  ## pin the newest releases that pyproject.toml's ranges allow into constraints.txt (then run the tests)
	rm -rf .lock-venv
	$(LOCK_PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip 'setuptools>=68'
	.lock-venv/bin/python -m pip install -q '.[dev]'
	{ echo "# Every Python package VQ Backup installs, pinned: make install, .ci/run and the Dockerfile use it."; \
	  echo "# Made by \`make lock\` from the ranges in pyproject.toml; renew it with the same command."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v -e '^vq-backup' -e '^wheel=='; } > $(LOCK)
	rm -rf .lock-venv

$(AZURITE):
	npm install --prefix .emulators --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VERSION)

emulators: $(STAMP) $(AZURITE)  ## moto and gcp-storage-emulator (in the venv), Azurite (npm)

demo: $(STAMP)  ## back up and list an embedded PostgreSQL and Redis through a real worker
	$(BIN)/vq-backup demo

# the programs the tests run; Debian: postgresql postgresql-client redis-server tar coreutils age zstd
# nodejs npm rabbitmq-server iproute2 nftables util-linux, and prometheus (--no-install-recommends)
# for promtool. .ci/run installs them (and starts RabbitMQ).
TOOLS := pg_dump psql pg_isready redis-server tar md5sum sha256sum age age-keygen zstd promtool node npm \
         rabbitmq-server rabbitmqctl ip nft unshare

tools:  ## stop, naming them, when programs the tests need are missing
	@missing=""; for tool in $(TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "make test needs these programs, not found on PATH:$$missing (see TOOLS in the Makefile)" >&2; exit 1; \
	fi

test: tools $(STAMP) $(AZURITE)  ## every test: unit, and integration against real services, workers, emulators
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-unit: tools $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

DEBIAN_PYTHON ?= /usr/bin/python3
DEBIAN_VENV   ?= .venv-debian

test-unit-debian:  ## the unit tests on Debian 12's own python3 (3.11.2, the oldest declared), in a venv of its own
	$(MAKE) test-unit PYTHON=$(DEBIAN_PYTHON) VENV=$(DEBIAN_VENV)

compose-test: $(STAMP)  ## build the image, run the compose stack with podman, check it end to end (root; compose/README.md)
	$(BIN)/python compose/test/run

lint: $(STAMP)  ## ruff (style, imports) and mypy (the type hints of vq_tasks)
	$(BIN)/ruff check vq_tasks tests bench
	$(BIN)/ruff format --check vq_tasks tests bench
	$(BIN)/mypy

bench: $(STAMP)  ## VQ Backup against a hand-written backup and restore script, 1 GiB data set, 2 rounds (BENCH_ARGS="--reuse ..."); then Redis SYNC against the logical snapshot at 1M keys
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/redis_methods.py

bench-scaling: $(STAMP)  ## the same at 0.25, 1 and 4 GiB: time against size, worker memory flat (data sets kept)
	$(BIN)/python bench/run.py --sizes 0.25,1,4 --reuse $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEBIAN_VENV) .lock-venv .demo .emulators build *.egg-info
