# rescoin: `make demo` and `make test` set everything up themselves.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: all setup host demo test unit lint e2e bench clean

all: test

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { apt-get update && apt-get install -y python3 python3-venv; }
	@$(PY) -c 'import venv, ensurepip' 2>/dev/null || { apt-get update && apt-get install -y python3-venv; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# libvirtd, QEMU and libvirt-python for the integration and end-to-end tests (root; idempotent)
host: $(STAMP)
	bash scripts/setup-host --venv $(VENV)

demo: $(STAMP)
	$(BIN)/rescoin demo

test: $(STAMP) host lint
	$(BIN)/python -m pytest -q tests

# the unit tests on every core (pytest-xdist); `make test` runs everything in one process
unit: $(STAMP)
	$(BIN)/python -m pytest -q -n auto tests/unit

# ruff (rules and line length in pyproject.toml) and mypy (strict on rescoin/core); fails on any finding
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

e2e: $(STAMP) host
	$(BIN)/python -m pytest -q -m e2e tests

bench: $(STAMP)
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/replay.py
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) rescoin-history .pytest_cache
