# `make demo` and `make test` are the only commands a newcomer needs; each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_WORKDIR ?= workdir/demo
DEMO_EXPORT ?= exports/demo

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.base: $(BIN)/python setup.py
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(BIN)/python -m pretrain.data.prepare --config=configs/demo.py
	$(BIN)/python -m pretrain.main --config=configs/demo.py --workdir=$(DEMO_WORKDIR)
	$(BIN)/python -m pretrain.export --workdir=$(DEMO_WORKDIR) --out=$(DEMO_EXPORT) --overwrite
	$(BIN)/python -m pretrain.report --workdir=$(DEMO_WORKDIR) --export=$(DEMO_EXPORT)

lint: $(VENV)/.test
	$(BIN)/ruff check pretrain objectives configs launch tests bench

test: lint
	$(BIN)/python -m pytest -q --durations=15 tests

# Baselines need transformers 4.57 (the last release with Flax models): their own virtualenv.
BENCH_VENV := .venv-bench

$(BENCH_VENV)/.stamp: setup.py
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q -e '.[bench]'
	touch $@

bench: $(VENV)/.base $(BENCH_VENV)/.stamp
	$(BIN)/python bench/compare.py --bench_python=$(BENCH_VENV)/bin/python
	$(BIN)/python bench/pipeline.py --config=configs/demo.py
	$(BIN)/python bench/sharding_memory.py

clean:
	rm -rf $(DEMO_WORKDIR) $(DEMO_EXPORT)
