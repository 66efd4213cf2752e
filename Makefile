# flux-migrate: everything sets itself up in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

SIZE ?= 100000
REPEAT ?= 3
KEEP ?=
CODE := flux_migrate pipeline stages tests bench

.PHONY: help install bytecode demo test bench bench-memory lint clean

help:
	@echo "make demo   - migrate a generated sample database into a real PostgreSQL"
	@echo "make test   - run the test suite against a real PostgreSQL (throwaway unless TEST_POSTGRES_DSN)"
	@echo "make bench  - benchmark against the ceiling and the alternatives (SIZE=sessions, REPEAT=n)"
	@echo "make bench-memory - the app's call mix on the memory, 20 concurrent callers"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "flux-migrate needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Compiled once here, so that each command the tests (or you) start does not compile the
# project's modules again where PYTHONDONTWRITEBYTECODE is set (about 0.25 s per start).
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q flux_migrate flux_migrate/pipeline flux_migrate/stages >/dev/null

demo: bytecode
	$(BIN)/flux-migrate demo $(if $(KEEP),--keep-server,)

# One test process per core (at most 4), each with its own throwaway PostgreSQL unless
# TEST_POSTGRES_DSN names one; a test file stays in one process (its module fixtures).
test: lint bytecode
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

$(VENV)/.bench-stamp: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $@

bench: $(VENV)/.bench-stamp bytecode
	$(BIN)/python -m bench --sessions $(SIZE) --repeat $(REPEAT)

lint: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check --quiet $(CODE)
	$(BIN)/mypy flux_migrate

clean:
	rm -rf $(VENV) .demo .bench .pytest_cache .hypothesis
