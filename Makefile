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
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install visiontune with pinned versions (idempotent)

demo: setup ## run the whole pipeline (dvc repro) on the demo data
	$(BIN)/dvc repro

# Two workers, each test file on one: the slow cases wait on subprocesses (dvc, an MLflow
# server, torchrun) as much as they compute.
PYTEST_WORKERS ?= 2
# Whole files to each worker, in the order tests/conftest.py sorts them (longest first).
test: setup ## run the whole test suite (CI runs this)
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: setup ## run the tests not marked slow
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

lint: setup ## ruff lint + format check
	$(BIN)/ruff check src stages tests bench
	$(BIN)/ruff format --check src stages tests bench

format: setup ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src stages tests bench
	$(BIN)/ruff format src stages tests bench

bench: setup ## speed and accuracy benchmark on ../shared/data (writes bench/results/)
	$(PY) bench/run.py

# SCALE_ARGS="--images 2000" for a quick try; the images are generated once into /tmp.
bench-serving: setup ## the model in use: predict 10 000 photos, the served model, vs the forward limit
	$(PY) bench/serving.py $(SERVING_ARGS)

bench-scale: setup ## scale benchmark: fetch..train_head on 50 000 generated photos vs 12 500
	$(PY) bench/scale.py $(SCALE_ARGS)

bench-audit: setup ## the audit on planted label flips and near-copies of ../shared/data sets
	$(PY) bench/audit.py ../shared/data/dogscats ../shared/data/dogbreeds ../shared/data/digits $(AUDIT_ARGS)

# The store the stages log to, on localhost; it prints the experiment's runs address first.
# UI_PORT=5001 make ui if 5000 is taken.
UI_PORT ?= 5000
ui: setup ## MLflow UI for the local store (mlflow.db + mlruns/), opened at the runs
	$(PY) -m visiontune.tracking.ui --params params.yaml --port $(UI_PORT)

# A lent GPU machine has its own python3 and torch but no venv, DVC, MLflow or network: these
# targets need no `setup` (bench/README.md, "GPU check").
gpu-check-prepare: ## before a GPU loan: wheels and a photo subset into .gpu/ (carried, < 60 MiB)
	python3 bench/gpu_prepare.py

gpu-check: ## on a lent GPU machine: the CUDA pipeline, measured (bench/results/gpu-*.json)
	bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

gpu-check-dry-run: ## the GPU check, small, on this CPU (after gpu-check-prepare)
	bash bench/gpu_check.sh --dry-run-cpu

.PHONY: help setup demo test test-fast lint format bench bench-serving bench-scale bench-audit ui gpu-check-prepare gpu-check gpu-check-dry-run
