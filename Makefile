# bitserve developer tasks. `make install` is idempotent: it re-installs only when
# pyproject.toml changed since the last install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-unit lint lint-deploy typecheck check up bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and exactly pinned: the CPU wheel from the local disk / the CPU index.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The test command (README): finds or starts Redis and PostgreSQL, never skips integration tests.
test: install
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Docker has no engine on the CI machines: the image and compose files are checked statically.
lint-deploy: install
	$(BIN)/hadolint docker/Dockerfile
	command -v docker-compose >/dev/null || (apt-get update -qq && apt-get install -y -qq docker-compose)
	docker-compose -f docker-compose.yml config -q

typecheck: install
	$(BIN)/mypy

check: lint lint-deploy typecheck test

# Embedded default: gateway + worker on this machine, SQLite, no external servers.
up: install
	$(BIN)/bitserve up

bench: install
	$(BIN)/python benchmarks/predict_speed.py
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/serve_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
