# `make run` and `make test` are the whole set-up on a fresh machine (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedbench $(ARGS)

# everything but the real-SLURM tests on two pytest workers (pytest-xdist), then those alone: they wait
# on the 2-CPU one-node cluster and read its queue
test: $(STAMP_TEST)
	$(PY) -m ruff check src tests scripts
	$(PY) -m pytest -q -n 2 -m "not slurm" $(PYTEST_ARGS)
	$(PY) -m pytest -q -m slurm $(PYTEST_ARGS)

lint: $(STAMP_TEST)
	$(PY) -m ruff check src tests scripts

clean:
	rm -rf outputs/2* multirun .pytest_cache
