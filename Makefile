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

# TRL 1.12 (the last TRL with a PPO trainer) in its own folder, for the PPO workload's TRL side.
TRL_PPO_DIR := .bench/trl-1.12

bench: setup-dev
	@test -f $(TRL_PPO_DIR)/trl/experimental/ppo/ppo_trainer.py || \
		$(PY) -m pip install --no-deps --target $(TRL_PPO_DIR) trl==1.12.0
	$(PY) -m benchmarks --trl-ppo-dir=$(TRL_PPO_DIR) $(ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
