# bitserve developer tasks. `make install` is idempotent: it re-installs only when
# pyproject.toml or the lock file changed since the last install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every dependency but torch, pinned with its SHA-256 hashes (`make lock` writes them).
LOCK := requirements-dev.lock
LOCK_VENV := .venv-lock
PIP_COMPILE = $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras \
	--no-emit-index-url --no-emit-find-links --unsafe-package torch --no-allow-unsafe

.PHONY: install lock test test-unit lint lint-deploy typecheck browser docs docs-check check up bench clean

install: $(STAMP)

# Hash-checked: pip refuses any file of the lock whose SHA-256 differs from the recorded one
# (--require-hashes), and --no-deps installs nothing the lock does not list. torch is the one
# exception: pinned by version only (the CPU wheel from the local disk / the CPU index, whose
# hash differs per build); its own dependencies are in the lock, so --no-deps again.
# `pip check` then proves the set complete and consistent.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

# Re-resolve both lock files from pyproject.toml (docs/operations.md, "Dependencies"): the
# runtime set for the image, the runtime + dev set for `make install` and CI.
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || \
		($(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install --quiet pip-tools)
	$(PIP_COMPILE) --output-file requirements.lock pyproject.toml
	$(PIP_COMPILE) --extra dev --output-file requirements-dev.lock pyproject.toml

# The test command (README): finds or starts Redis and PostgreSQL, never skips integration tests.
test: install browser
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Docker has no engine on the CI machines: the image and compose files are checked statically.
# The Kubernetes manifests against the API's schemas (strict: unknown fields are errors); the
# kustomization files and KEDA's ScaledObject have no schema there (tests/unit/test_deployment.py
# checks them).
K8S_VERSION := 1.30.0
K8S_MANIFESTS := $(filter-out %/kustomization.yaml,$(wildcard deploy/k8s/base/*.yaml))
lint-deploy: install
	$(BIN)/hadolint docker/Dockerfile
	command -v docker-compose >/dev/null || (apt-get update -qq && apt-get install -y -qq docker-compose)
	docker-compose -f docker-compose.yml config -q
	$(BIN)/kubernetes-validate --strict --quiet -k $(K8S_VERSION) $(K8S_MANIFESTS)

typecheck: install
	$(BIN)/mypy

# The web page's browser tests drive Debian's Chromium through Playwright (no browser download).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

# The GN/WS/BN explainer's printable forms (docs/normalization.html, .pdf), from its Markdown.
docs: install
	$(BIN)/python -m experiments.normalization.printable

# CI: the printable explainer builds and fits its four to five A4 pages (into a scratch folder).
docs-check: install
	$(BIN)/python -m experiments.normalization.printable --out-dir $$(mktemp -d)

check: lint lint-deploy typecheck test

# Embedded default: gateway + worker on this machine, SQLite, no external servers.
up: install
	$(BIN)/bitserve up

bench: install
	$(BIN)/python benchmarks/predict_speed.py
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/serve_speed.py

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .mypy_cache .ruff_cache
