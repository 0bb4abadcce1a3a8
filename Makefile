# dtmcli developer commands. Each target sets itself up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup services lint test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Start MariaDB/PostgreSQL/Redis if they are down and enable PostgreSQL prepared transactions (XA).
services:
	bash scripts/setup-services.sh

lint: setup
	$(VENV)/bin/ruff check dtmcli tests examples bench
	$(VENV)/bin/mypy dtmcli

test: setup services lint
	$(VENV)/bin/pytest

demo: setup
	$(PY) examples/demo.py

bench: setup services
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info
