# Quick start (fresh machine):  `make experiment`  then  `make test`.
# Both create .venv, install the project and its data, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup data experiment tensorboard test test-fast lint bench clean

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

# TensorBoard (the venv's own) over every run in lightning_logs/, on this machine only.
TB_PORT ?= 6006
tensorboard: $(STAMP)
	@echo "TensorBoard: http://127.0.0.1:$(TB_PORT)/  (the PARAM MONITOR tab: #param_monitor; Ctrl-C stops it)"
	$(VENV)/bin/tensorboard --logdir lightning_logs --host 127.0.0.1 --port $(TB_PORT)

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
