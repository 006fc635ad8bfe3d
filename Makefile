# Reporting data platform — every entry point. `make demo` and `make test` are the two
# commands a fresh machine needs (README).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# checkov (the IaC scanner of tests/deploy/test_checkov.py) pins boto3, packaging and networkx
# far below constraints.txt, so it gets a venv of its own, from exact pins, off PATH.
CKV_VENV  := .venv-checkov
CKV_STAMP := $(CKV_VENV)/.installed-stamp
# Offline: no update check against PyPI, no policy download from the vendor's platform.
CKV_ENV   := CKV_SKIP_PACKAGE_UPDATE_CHECK=true BC_SKIP_MAPPING=TRUE
# Apache Superset (bi/) pins SQLAlchemy < 2: its own venv, from the exact pins of
# bi/superset/requirements-superset.txt; the portal's embedded SDK from bi/embed's lockfile.
SS_VENV     := .venv-superset
SS_STAMP    := $(SS_VENV)/.installed-stamp
EMBED_STAMP := bi/embed/node_modules/.installed-stamp
BI_DEPS     := $(SS_STAMP) $(EMBED_STAMP)
# The venv's executables (dbt, dagster) are found without activating it.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
TARGET ?= local
# make test: pytest-xdist workers (each starts its own primary + replica); 0 = one process
TEST_WORKERS ?= 2
LOCAL_DIR ?= $(CURDIR)/.local
export LOCAL_DIR
# The local Dagster instance lives under .local/dagster (dagster.yaml is copied there).
DAGSTER_HOME_DIR := $(LOCAL_DIR)/dagster

.PHONY: help venv up down status simulate clean demo full-refresh test churn dbt-build ui bi bi-down bench bench-bi lint scan dagster-home

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned project into $(VENV) ..."
	@set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' \
		2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	@$(PY) -m platform_assets.federation
	@touch $@

$(CKV_STAMP): requirements-checkov.txt
	@test -x $(CKV_VENV)/bin/python || $(PYTHON) -m venv $(CKV_VENV)
	@echo "installing the pinned checkov into $(CKV_VENV) ..."
	@set -o pipefail; $(CKV_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-checkov.txt \
		2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	@touch $@

$(SS_STAMP): bi/superset/requirements-superset.txt
	@test -x $(SS_VENV)/bin/python || $(PYTHON) -m venv $(SS_VENV)
	@echo "installing the pinned Superset into $(SS_VENV) ..."
	@set -o pipefail; $(SS_VENV)/bin/python -m pip install -q --disable-pip-version-check -r $< \
		2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	@touch $@

$(EMBED_STAMP): bi/embed/package-lock.json
	@cd bi/embed && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	@touch $@

venv: $(STAMP) $(CKV_STAMP) $(BI_DEPS) ## create .venv (and .venv-checkov, .venv-superset) and install the pinned project

up: $(STAMP) $(BI_DEPS) ## start primary + streaming replica under .local/, load demo data if empty
	@$(PY) -m localenv up && $(PY) -m bi secrets

down: $(STAMP) ## stop both servers, keep the data
	@$(PY) -m localenv down

status: $(STAMP) ## both servers' state and the replica's replay lag
	@$(PY) -m localenv status

simulate: $(STAMP) ## apply one batch of realistic changes on the primary
	@$(PY) -m localenv simulate

clean: bi-down ## stop the servers, Superset and the portal and remove .local/
	@if [ -x $(PY) ]; then $(PY) -m localenv clean; else rm -rf $(LOCAL_DIR); fi

dbt-build: up ## dbt build on TARGET=local (DuckDB, default) or TARGET=pg
	@set -a && . $(LOCAL_DIR)/platform.env && set +a && cd dbt && dbt build --target $(TARGET) --profiles-dir .

dagster-home:
	@mkdir -p $(DAGSTER_HOME_DIR) && cp dagster.yaml $(DAGSTER_HOME_DIR)/dagster.yaml

# DEMO_STARTED: the demo's summary reports the wall time of the whole target, `make up` included.
demo: $(STAMP) $(BI_DEPS) ## the main job on the embedded default (DuckDB): Superset up, every asset once, where to click
	@export DEMO_STARTED=$$($(PY) -c 'import time; print(time.time())') && $(PY) -m localenv up && $(PY) -m bi secrets && $(PY) -m localenv summary \
		&& $(PY) -m bi start && mkdir -p $(DAGSTER_HOME_DIR) && cp dagster.yaml $(DAGSTER_HOME_DIR)/dagster.yaml \
		&& DAGSTER_HOME=$(DAGSTER_HOME_DIR) $(PY) -m localenv.demo && $(PY) -m bi up

full-refresh: up dagster-home ## every asset through Dagster with every dbt model rebuilt in full
	@DAGSTER_HOME=$(DAGSTER_HOME_DIR) $(PY) -m localenv.demo --full-refresh

bi: up ## Superset (http://127.0.0.1:8088) and the customer portal (http://127.0.0.1:8090), in the background
	@$(PY) -m bi up

bi-down: ## stop Superset and the portal
	@if [ -x $(PY) ]; then $(PY) -m bi down; fi

ui: up dagster-home ## the Dagster UI (lineage, runs, backfills) on http://127.0.0.1:3000
	@DAGSTER_HOME=$(DAGSTER_HOME_DIR) $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

test: $(STAMP) $(CKV_STAMP) $(BI_DEPS) ## the whole suite (starts its own primary + replica on free ports)
	@$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

churn: $(STAMP) ## the churn property test, CHURN_EXAMPLES (100) per engine (make test runs 8)
	@CHURN_EXAMPLES=$${CHURN_EXAMPLES:-100} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests/platform/test_churn_duckdb.py tests/platform/test_churn_postgres.py

bench: $(STAMP) $(BI_DEPS) ## EVENTS (8000000) events: Dagster vs dbt vs SQL vs PostgreSQL; then make demo and bench-bi
	@$(PY) -m bench && $(MAKE) --no-print-directory demo && $(PY) -m bench.bi_load

bench-bi: $(STAMP) ## 20 companies load the embedded dashboard at once (needs make bi): p50/p95, errors
	@$(PY) -m bench.bi_load

lint: $(STAMP) ## ruff
	@$(VENV)/bin/ruff check platform_assets deploy/local tests bench bi

scan: $(CKV_STAMP) ## checkov over deploy/ (CloudFormation, Dockerfile), offline; failed checks only
	@$(CKV_ENV) $(CKV_VENV)/bin/checkov --config-file .checkov.yaml --quiet
