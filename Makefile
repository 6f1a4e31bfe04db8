# VQ Backup. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
AZURITE_VERSION ?= 3.35.0
AZURITE := .emulators/node_modules/.bin/azurite-blob

.PHONY: install emulators demo test test-unit lint bench bench-scaling clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

$(AZURITE):
	npm install --prefix .emulators --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VERSION)

emulators: $(STAMP) $(AZURITE)  ## moto and gcp-storage-emulator (in the venv), Azurite (npm)

demo: $(STAMP)  ## back up and list an embedded PostgreSQL and Redis through a real worker
	$(BIN)/vq-backup demo

test: $(STAMP) $(AZURITE)  ## every test: unit, and integration against real services, workers, emulators
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

lint: $(STAMP)  ## ruff (style, imports) and mypy (the type hints of vq_tasks)
	$(BIN)/ruff check vq_tasks tests bench
	$(BIN)/ruff format --check vq_tasks tests bench
	$(BIN)/mypy

bench: $(STAMP)  ## VQ Backup against a hand-written backup and restore script, 1 GiB data set, 2 rounds (BENCH_ARGS="--reuse ...")
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-scaling: $(STAMP)  ## the same at 0.25, 1 and 4 GiB: time against size, worker memory flat (data sets kept)
	$(BIN)/python bench/run.py --sizes 0.25,1,4 --reuse $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .demo .emulators build *.egg-info
