# Two entry points: `make demo` runs the main example, `make test` the whole test suite.
# Each creates .venv on first use. torch==2.13.0 is installed first: an unpinned torch
# can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1

.PHONY: demo test test-slow lint format docs bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-plot
	$(VENV)/bin/gradcal demo --overwrite

test: $(VENV)/.installed-dev
	$(PY) -m pytest -n 2 --dist loadgroup -q

test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

docs: $(VENV)/.installed-dev
	$(PY) -m mkdocs build --strict

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/simulate.py

clean:
	rm -rf $(VENV) build site *.egg-info
