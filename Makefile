# PerFusion: `make demo` runs the whole loop on this machine, `make test` runs the test suite.
# Both install what they need first (Python packages into a cached virtualenv, the Kafka broker's jars).

SHELL := /bin/bash
PYTHON ?= python3
CACHE_DIR ?= $(HOME)/.cache/perfusion
LOCKS := requirements.lock requirements-dev.lock
# The virtualenv lives outside the clone, keyed by both lock files (runtime and development), so a second clone or a second `make test`
# on the same machine reuses it instead of reinstalling torch.
VENV := $(CACHE_DIR)/venv-$(shell cat $(LOCKS) | sha256sum | cut -c1-16)
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Feast reports usage to its authors by default; this machine and CI have no network for it.
export FEAST_USAGE := False
export PERFUSION_CACHE_DIR := $(CACHE_DIR)
# The cached virtualenv is shared by every clone on the machine and its editable install points at whichever clone
# ran `make setup` last; this clone's packages come first for every command and subprocess started from here.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help setup demo test test-unit test-integration lint broker-up broker-down clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# No prerequisite on purpose: the folder's name already holds the lock files' hash, and a fresh clone's lock files
# are always newer than a cached virtualenv, which would otherwise be rebuilt every time.
$(VENV)/.installed:
	@echo "==> creating virtualenv $(VENV) from $(LOCKS)"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock -r requirements-dev.lock
	touch $@

setup: $(VENV)/.installed  ## install Python packages (cached) and the Kafka broker's jars
	@# The project itself is installed editable on every run: cheap, and points the cached venv at this clone.
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/perfusion broker install

demo: setup  ## run the whole loop on this machine with visible output
	$(BIN)/perfusion demo

test: setup  ## run every test; integration tests use the real broker (started and stopped by the tests)
	$(BIN)/pytest

test-unit: setup  ## run the tests that need no broker
	$(BIN)/pytest -m "not integration"

lint: setup  ## ruff and mypy on the package code
	$(BIN)/ruff check perfusion streams trainer service harness simulator ops features tests
	$(BIN)/ruff format --check perfusion streams trainer service harness simulator ops features tests
	$(BIN)/mypy
	$(BIN)/lint-imports

broker-up: setup  ## start the project's Kafka broker in the background
	$(BIN)/perfusion broker up

broker-down:  ## stop the project's Kafka broker
	$(BIN)/perfusion broker down

clean:  ## remove runtime state (broker data, Feast stores, published models)
	-$(BIN)/perfusion broker down
	rm -rf .state
