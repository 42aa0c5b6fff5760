# visiontune: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Stages run `python stages/...`: the venv's python must come first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install visiontune with pinned versions (idempotent)

demo: setup ## run the whole pipeline (dvc repro) on the demo data
	$(BIN)/dvc repro

test: setup ## run the whole test suite (CI runs this)
	$(BIN)/pytest

test-fast: setup ## run the tests not marked slow
	$(BIN)/pytest -m "not slow"

lint: setup ## ruff lint + format check
	$(BIN)/ruff check src stages tests bench
	$(BIN)/ruff format --check src stages tests bench

format: setup ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src stages tests bench
	$(BIN)/ruff format src stages tests bench

bench: setup ## speed and accuracy benchmark on ../shared/data (writes bench/results/)
	$(PY) bench/run.py

# Runs keep their artifacts in mlruns/ (tracking.artifact_location, an absolute path in the
# store); the UI reads them from there. UI_PORT=5001 make ui if 5000 is taken.
UI_PORT ?= 5000
ui: setup ## MLflow UI for the default local store (mlflow.db + mlruns/), on localhost only
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--artifacts-destination $(CURDIR)/mlruns --host 127.0.0.1 --port $(UI_PORT) --workers 1

.PHONY: help setup demo test test-fast lint format bench ui
