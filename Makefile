# rescoin: `make demo` and `make test` set everything up themselves.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: all setup demo test unit e2e bench clean

all: test

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { apt-get update && apt-get install -y python3 python3-venv; }
	@$(PY) -c 'import venv, ensurepip' 2>/dev/null || { apt-get update && apt-get install -y python3-venv; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rescoin demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

e2e: $(STAMP)
	$(BIN)/python -m pytest -q -m e2e tests

bench: $(STAMP)
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/replay.py
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) rescoin-history .pytest_cache
