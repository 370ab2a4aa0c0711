# make demo / make test: create .venv if needed (CPU torch first, so nothing pulls a CUDA build), then run the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: demo demo-quick test lint bench
demo: $(BIN)/.installed
	$(BIN)/eva demo --output-dir out/demo

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest

demo-quick: $(BIN)/.installed
	$(BIN)/eva demo --quick --output-dir out/demo-quick

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks examples

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_init.py --case minilm
