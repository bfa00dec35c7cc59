# Quick start (fresh machine):  `make experiment`  then  `make test`.
# Both create .venv, install the project and its data, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup data experiment test test-fast lint bench clean

# constraints.txt pins this machine's builds (local files); pyproject.toml only declares ranges.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,experiment]'
	touch $(STAMP)

setup: $(STAMP) data

# Debian's FashionMNIST files and the browser for end-to-end tests, where we are root with apt-get.
data:
	@bash scripts/install_system_packages.sh

experiment: setup
	$(PY) -m experiments.shared_mlp

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not browser and not distributed"

lint: $(STAMP)
	$(PY) -m ruff check .

bench: setup
	$(PY) benchmarks/monitor_overhead.py

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache
