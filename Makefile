# Quick start:  make demo   |   make test
# Both create .venv with python3 (3.10+) if it is missing and install raytp into it.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# torch is installed first, pinned: where a local CPU wheel is on pip's find-links (as
# on the CI machines) pip takes it from disk in seconds; elsewhere it comes from PyPI.
# Override with e.g. `make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"`.
TORCH  ?= torch==2.13.0

# `make bench` on a CPU-only machine runs the quick sizes; on a GPU host:
#   make bench BENCH_ARGS="--json bench.json"
BENCH_ARGS ?= --quick

.PHONY: test demo lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

demo: $(VENV)/.installed
	$(PY) -m raytp demo

bench: $(VENV)/.installed
	$(PY) -m raytp bench $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
