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
INSTALL_INPUTS := requirements/constraints.txt requirements/dev.txt $(wildcard libs/*/pyproject.toml services/*/pyproject.toml gateway/pyproject.toml) libs/serving/setup.py $(wildcard libs/*/src/*/*.c)
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
check-generated: $(VENV)/.installed ## Fail if committed stubs, the descriptor set, the catalog's copies or the chart's schema/README are stale
	$(PY) scripts/generate_protos.py --check
	$(PY) scripts/gen_catalog.py --check
	$(PY) scripts/gen_chart_schema.py --check
	$(PY) scripts/gen_chart_readme.py --check

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

.PHONY: config-reference
config-reference: $(VENV)/.installed ## Regenerate docs/configuration.md from the settings and model schemas
	$(PY) scripts/gen_config_reference.py

.PHONY: lint
lint: $(VENV)/.installed node_modules/.installed buf check-generated ## buf lint/format/breaking, stale docs/configuration.md, ruff, mypy (strict on libs, services and gateway)
	$(PY) scripts/gen_config_reference.py --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

.PHONY: dicom-tools
dicom-tools: ## Install Orthanc, its DICOMweb plugin and DCMTK with apt when missing (the DICOM tests run them)
	@if [ ! -x /usr/sbin/Orthanc ] || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || ! command -v storescu >/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "dicom-tools: Orthanc/DCMTK missing and not root: the Orthanc tests will skip (sudo apt-get install -y orthanc orthanc-dicomweb dcmtk)"; \
	  else \
	    echo "dicom-tools: apt-get install orthanc orthanc-dicomweb dcmtk"; \
	    { apt-get update -qq || true; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb dcmtk >/dev/null; } \
	      || { echo "dicom-tools: apt-get install -y orthanc orthanc-dicomweb dcmtk FAILED: the DICOM node tests need a real Orthanc and storescu" >&2; exit 1; }; \
	  fi; \
	fi

.PHONY: orthanc
orthanc: $(VENV)/.installed dicom-tools ## A local Orthanc PACS for the DICOM node: web UI and DICOMweb on 8042, DICOM 4242, data in var/orthanc
	$(PY) scripts/orthanc.py

.PHONY: test
test: lint dicom-tools ## Install on first use, then lint + the whole test suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: test-fast
test-fast: $(VENV)/.installed ## Tests without the slow marker (no lint)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

.PHONY: all
all: test ## Everything CI runs

.PHONY: run
run: $(VENV)/.installed ## Start every service (and the local gateway) on CPU with config/local.json
	$(PY) scripts/run_local.py --config $(CONFIG)

DOCS ?=
.PHONY: rag-ingest
rag-ingest: $(VENV)/.installed ## Ingest DOCS="files or dirs" into CONFIG's rag store: progress bar, resumable (cxr-rag ingest)
	@test -n "$(DOCS)" || { echo 'usage: make rag-ingest DOCS="../shared/data/pubmedqa/corpus.jsonl papers/"' >&2; exit 2; }
	$(PY) -m cxr_rag.cli --config $(CONFIG) ingest $(DOCS)

BENCH_ARGS ?=
# head to head: stack.py with only the peers of the "ahead of LitServe at every concurrency >= 8" target, long cells
HEAD_TO_HEAD = $(PY) -m bench.stack --peers service,litserve,litserve_folded --concurrency 8,32 \
	$(if $(filter --quick,$(BENCH_ARGS)),--out bench/results/head_to_head-quick.json,\
	--rounds 6 --seconds 45 --requests 1200 --out bench/results/head_to_head.json) $(BENCH_ARGS)

.PHONY: bench
bench: $(VENV)/.installed ## Every benchmark (bench/run_all.py, then bench-head_to_head): bench/results/*.json
	$(PY) -m bench.run_all; rc=$$?; $(HEAD_TO_HEAD) && exit $$rc

.PHONY: bench-head_to_head
bench-head_to_head: $(VENV)/.installed ## Service vs LitServe at c=8/32, 6 rounds of 45 s (~25 min; BENCH_ARGS=--quick ~5 min)
	$(HEAD_TO_HEAD)

.PHONY: bench-runtimes
bench-runtimes: $(VENV)/.installed ## Model runtimes at c=32: torch float32 vs OpenVINO/ONNX Runtime int8 and bfloat16 (DenseNet, U-Net, Swin) and LitServe, one run (~25 min)
	$(PY) -m bench.runtimes $(BENCH_ARGS)

.PHONY: bench-gpu
bench-gpu: $(VENV)/.installed ## On a CUDA machine: GPU tests, stack and gpu_paths, each time-boxed (bench/gpu/gpu_session.sh)
	OUT=bench/gpu/results PY=$(PY) WHEELS=none bash bench/gpu/gpu_session.sh

.PHONY: bench-rag_scale
bench-rag_scale: $(VENV)/.installed ## RAG at 200k passages: corpus, ingest, hybrid p50/p99 embedded and vs `chroma run`, recall@5/MRR, RSS (BENCH_ARGS="--passages 1000000": the long run)
	$(PY) -m bench.rag_scale $(BENCH_ARGS)

.PHONY: bench-gpu-run
bench-gpu-run: $(VENV)/.installed ## On a CUDA machine: issue 23's GPU targets (frontends, c=64, U-Net @512) and TensorRT in one call of <= 8 min (bench/gpu/run.sh)
	OUT=bench/gpu/results PY=$(PY) WHEELS=none bash bench/gpu/run.sh

.PHONY: bench-gpu-probe
bench-gpu-probe: $(VENV)/.installed ## On a CUDA machine: which executor thread bounds the classification service (cheap model at 1 and 8 frontends; DenseNet c=64 with py-spy on the executor; the host's fingerprint first), <= 6 min
	OUT=bench/gpu/results PY=$(PY) WHEELS=none PLAN=frontends-probe SESSION_S=335 bash bench/gpu/gpu_session.sh

bench-%: $(VENV)/.installed ## One benchmark, e.g. make bench-stack = python -m bench.stack (bench/gpu/ too; BENCH_ARGS=--quick)
	$(PY) -m $(if $(wildcard bench/$*.py),bench.$*,bench.gpu.$*) $(BENCH_ARGS)

.PHONY: clean
clean: ## Remove caches (keeps .venv)
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: distclean
distclean: clean ## Remove .venv and node_modules too
	rm -rf $(VENV) node_modules
