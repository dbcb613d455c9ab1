# One command each: `make run` (set up, then the default RLHF pipeline on the built-in task),
# `make test` (set up, then the default test suite). See README.md.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-dev run test test-slow bench lint

setup:
	scripts/bootstrap.sh

setup-dev:
	scripts/bootstrap.sh dev

run: setup
	$(VENV)/bin/alignkit $(ARGS)

test: setup-dev
	$(PY) -m pytest -m "not slow" -q $(ARGS)

test-slow: setup-dev
	$(PY) -m pytest -m slow -q $(ARGS)

bench: setup-dev
	$(PY) -m benchmarks $(ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
