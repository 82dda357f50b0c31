# The two commands a newcomer runs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m tempo_jax.train --workdir runs/demo

test: lint
	$(BIN)/python -m pytest -q tests

# ruff, and the import-linter contract in setup.cfg (imports flow one way)
lint: venv
	$(BIN)/ruff check tempo_jax tests scripts
	cd $(CURDIR) && $(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info
