# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: install run test test-fast

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -e '.[dev]'
	touch $@

run: install
	$(PYTHON) run.py +experiment=noisy_mnist

test: install
	$(PYTHON) -m pytest

test-fast: install
	$(PYTHON) -m pytest -m "not slow"
