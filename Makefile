# cxr — make help lists every target. `make all` is what CI runs (`make test`).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BUF := node_modules/.bin/buf
PKGS := $(dir $(wildcard libs/*/pyproject.toml services/*/pyproject.toml gateway/pyproject.toml libs/client/pyproject.toml))
EDITABLE := $(foreach p,$(sort $(PKGS)),-e $(p))
INSTALL_INPUTS := requirements/constraints.txt requirements/dev.txt $(wildcard libs/*/pyproject.toml services/*/pyproject.toml gateway/pyproject.toml)
CONFIG ?= config/local.json
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export ANONYMIZED_TELEMETRY := False

.PHONY: help
help: ## Show every target with its description
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_.%-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: $(INSTALL_INPUTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@echo "installing the suite into $(VENV) (first time: ~2-3 min, ~7 GB; torch 2.14.1 + torchvision 0.29.1, see README)"
	$(PIP) install --quiet --progress-bar off -c requirements/constraints.txt -r requirements/dev.txt $(EDITABLE)
	@touch $@

node_modules/.installed: package.json package-lock.json
	npm install --no-audit --no-fund --loglevel=error
	@touch $@

.PHONY: install
install: $(VENV)/.installed node_modules/.installed ## Create .venv and install every package (editable) plus dev tools

.PHONY: lock
lock: $(VENV)/.installed ## Re-pin requirements/constraints.txt from the current venv
	$(PIP) freeze --exclude-editable | grep -v -E '^(-e|cxr)' > requirements/constraints.tmp
	{ head -2 requirements/constraints.txt; cat requirements/constraints.tmp; } > requirements/constraints.new
	mv requirements/constraints.new requirements/constraints.txt; rm -f requirements/constraints.tmp

.PHONY: generate
generate: $(VENV)/.installed ## Regenerate Python stubs (cxr_protos) and gateway/protos.pb from protos/
	$(PY) scripts/generate_protos.py

.PHONY: check-generated
check-generated: $(VENV)/.installed ## Fail if committed stubs or the descriptor set are stale
	$(PY) scripts/generate_protos.py --check

.PHONY: buf
buf: node_modules/.installed ## buf lint (STANDARD), buf format check, buf breaking against the last landed commit
	$(BUF) lint protos
	$(BUF) format --diff --exit-code protos
	BUF=$(BUF) scripts/buf_breaking.sh

.PHONY: fmt
fmt: $(VENV)/.installed node_modules/.installed ## Format Python (ruff) and protos (buf)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
	$(BUF) format -w protos

.PHONY: lint
lint: $(VENV)/.installed node_modules/.installed buf check-generated ## buf lint/format/breaking, ruff, mypy (strict on libs/serving)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

.PHONY: test
test: lint ## Install on first use, then lint + the whole test suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: test-fast
test-fast: $(VENV)/.installed ## Tests without the slow marker (no lint)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

.PHONY: all
all: test ## Everything CI runs

.PHONY: run
run: $(VENV)/.installed ## Start every service (and the local gateway) on CPU with config/local.json
	$(PY) scripts/run_local.py --config $(CONFIG)

.PHONY: bench
bench: $(VENV)/.installed ## Run every benchmark in bench/ and write bench/results/*.json
	$(PY) bench/run_all.py

.PHONY: bench-gpu
bench-gpu: $(VENV)/.installed ## On a CUDA machine: GPU tests, stack and gpu_paths, each time-boxed (bench/gpu_session.sh)
	OUT=bench/results/gpu PY=$(PY) WHEELS=none bash bench/gpu_session.sh

bench-%: $(VENV)/.installed ## Run one benchmark, e.g. make bench-classification (bench/classification.py)
	$(PY) bench/$*.py

.PHONY: clean
clean: ## Remove caches (keeps .venv)
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: distclean
distclean: clean ## Remove .venv and node_modules too
	rm -rf $(VENV) node_modules
