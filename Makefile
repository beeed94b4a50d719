# `make demo` and `make test` are the only commands a newcomer needs; each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_WORKDIR ?= workdir/demo
DEMO_EXPORT ?= exports/demo

.PHONY: demo test lint bench constraints clean

# glibc's malloc on transparent huge pages (where the kernel offers them on request, the usual
# `madvise` setting): the CPU train step's buffers otherwise fault in ~160k fresh 4 KiB pages a
# step (README Performance). Ignored without glibc; a GLIBC_TUNABLES of your own is kept.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# constraints.txt pins every package to the versions last tested; setup.py keeps the ranges.
$(VENV)/.base: $(BIN)/python setup.py constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

DEMO_CONFIG ?= configs/cpu_recipe.py

demo: $(VENV)/.base
	$(BIN)/python -m pretrain.data.prepare --config=$(DEMO_CONFIG)
	$(BIN)/python -m pretrain.main --config=$(DEMO_CONFIG) --workdir=$(DEMO_WORKDIR)
	$(BIN)/python -m pretrain.export --workdir=$(DEMO_WORKDIR) --out=$(DEMO_EXPORT) --overwrite
	$(BIN)/python -m pretrain.report --workdir=$(DEMO_WORKDIR) --export=$(DEMO_EXPORT)

lint: $(VENV)/.test
	$(BIN)/ruff check .

# Two worker processes, one test file each at a time (files share their module fixtures; conftest
# groups the files that share the killed-run fixture): the tests are mostly single-threaded
# compilation, so two keep both cores busy.
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# Baselines need transformers 4.57 (the last release with Flax models): their own virtualenv,
# resolved from setup.py alone since constraints.txt pins transformers 5.
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

# Rewrites constraints.txt from a fresh virtualenv of setup.py's ranges: `make constraints`.
# Local version labels (torch's +cpu) are dropped so that either build satisfies the pin, and
# the CUDA runtime packages are left to torch's own requirements.
CONSTRAINTS_VENV := .venv-constraints

constraints:
	rm -rf $(CONSTRAINTS_VENV)
	$(PYTHON) -m venv $(CONSTRAINTS_VENV)
	$(CONSTRAINTS_VENV)/bin/pip install -q --upgrade pip
	$(CONSTRAINTS_VENV)/bin/pip install -q -e '.[test]'
	$(CONSTRAINTS_VENV)/bin/pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//' \
	  | grep -vE '^(nvidia-|triton)' > constraints.txt
	rm -rf $(CONSTRAINTS_VENV)

clean:
	rm -rf $(DEMO_WORKDIR) $(DEMO_EXPORT)
