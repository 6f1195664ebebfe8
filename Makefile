# cnc — two commands for a newcomer: `make demo` and `make test` (both install into .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS ?= default
DEMO_OUT ?= out/demo$(if $(filter tiny,$(MODELS)),-tiny,)
#: pytest-xdist workers for `make test` (both cores of the 2-vCPU reference machine; 0 = serial).
TEST_WORKERS ?= 2
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-cluster lint bench gpu-check gpu-wheels clean

help: ## List the targets.
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 -e ".[test]"
	@touch $@

install: $(VENV)/.installed ## Create .venv and install the project (torch 2.14.1) into it.

demo: install ## Build triplet shards from examples/ (MODELS=default: download + real weights; MODELS=tiny: tiny random models).
	@test -f configs/build/$(MODELS).yaml || { echo "unknown MODELS=$(MODELS): use default or tiny"; exit 2; }
	@[ "$(MODELS)" = "tiny" ] || $(BIN)/cnc models download --config configs/build/$(MODELS).yaml \
	  || { status=$$?; echo "Could not download the models (no network?). Run the whole path with tiny models: make demo MODELS=tiny"; exit $$status; }
	@$(BIN)/cnc build --config configs/build/$(MODELS).yaml --input examples --output $(DEMO_OUT) \
	  || { status=$$?; [ "$(MODELS)" = "tiny" ] || echo "No weights or no network? Run the whole path with tiny models: make demo MODELS=tiny"; exit $$status; }
	$(BIN)/cnc inspect $(DEMO_OUT) -n 8 --html  # report under $(DEMO_OUT)/_cnc/inspect/

lint: install ## Lint with ruff and check the import layers of docs/architecture.md (both in pyproject.toml).
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint ## Lint, then run the test suite (no network, CPU only; the cluster tier is `make test-cluster`).
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not cluster" $(PYTEST_ARGS)

test-cluster: install ## The cluster tier: emulated multi-node Ray clusters (node loss), Ray Jobs, multi-worker Ray Train.
	$(BIN)/python -m pytest -q -m cluster $(PYTEST_ARGS)

bench: install ## CPU throughput benchmark of the shard builder (tiny models).
	$(BIN)/python benchmarks/build_throughput.py

gpu-check: ## On a bare GPU machine: every GPU measurement in one run (<= 7 min; results in gpu-results/).
	bash benchmarks/gpu_check.sh

gpu-wheels: ## Download the wheels gpu-check installs on the GPU image (Python 3.12) into .whl/ (needs pip access).
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
	  --platform any -d .whl $$(grep -v '^#' benchmarks/gpu_wheels.txt | awk 'NF {print $$1}')

clean: ## Remove build outputs (keeps .venv).
	rm -rf out .pytest_cache
