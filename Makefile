# The two commands a fresh machine needs: `make dev` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: dev test chromium lint install-dev install-test install-bench format bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "nhi-lifecycle needs Python 3.11+ (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

$(VENV)/.test: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	@touch $@ $(VENV)/.dev

$(VENV)/.bench: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[bench]'
	@touch $@ $(VENV)/.test $(VENV)/.dev

install-dev: $(VENV)/.dev
install-test: $(VENV)/.test
install-bench: $(VENV)/.bench

## Run the whole service on embedded defaults (Temporal dev server + UI, Postgres, moto, worker, API).
dev: install-dev
	$(BIN)/nhi dev

## Lint and type gates: any finding fails the build.
lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## Install everything, pass the gates, run the tests against real services.
test: lint chromium
	$(BIN)/pytest

# The browser tests (tests/test_ui.py) drive the distribution's Chromium: Playwright never
# downloads a browser.
chromium:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

format: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install-bench
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .nhi .mypy_cache .ruff_cache .pytest_cache
