# Quick start:  make demo   |   make test
# Both create .venv with python3 (3.10+) if it is missing and install raytp into it.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The CPU build of torch: on machines with a local wheel (PIP_FIND_LINKS) pip takes
# it from there; elsewhere this pin keeps pip from pulling a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: test demo lint gpu-test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) -m raytp demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
