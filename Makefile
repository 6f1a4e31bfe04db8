# VQ Backup. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install demo test test-unit lint bench clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## back up and list an embedded PostgreSQL and Redis through a real worker
	$(BIN)/vq-backup demo

test: $(STAMP)  ## every test: unit, and integration against real services and workers
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

lint: $(STAMP)
	$(BIN)/ruff check vq_tasks tests bench
	$(BIN)/ruff format --check vq_tasks tests bench

bench: $(STAMP)  ## peak memory of a worker backing up a 1 GB database (docs/PERFORMANCE.md)
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) .demo build *.egg-info
