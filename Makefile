# Two commands from a fresh clone: `make demo` and `make test`.
# Everything they need is installed here; nothing is assumed on the machine.
SHELL := /bin/bash
# pipefail: a failing pip must fail the target even though its output is filtered.
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The stamp is keyed by pyproject.toml so a dependency change reinstalls.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
# pip's find-links setup on these machines prints one warning per missing index dir.
PIPQ := sed "/is ignored: it is neither a file nor a directory/d"
DEMO_OUT ?= demo_out
# The deploy config read by `make up`, `make down` and `make manifests` (infra/config.py).
STACK_CONFIG ?= infra/duet.toml

.PHONY: demo test test-fast lint format system-deps venv whisperx-env clean up down manifests

$(STAMP):
	@bash infra/local/install_system_deps.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip 2>&1 | $(PIPQ)
	@# torch first, pinned to the local CPU build: a bare range would pull CUDA wheels.
	@$(BIN)/python -c "import torch" 2>/dev/null || ($(BIN)/pip install -q "torch==2.13.0" 2>&1 | $(PIPQ))
	@$(BIN)/pip install -q -e ".[dev]" 2>&1 | $(PIPQ)
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

whisperx-env: $(STAMP)
	@$(BIN)/python -m curation.speech_env build

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# WhisperX's isolated environment is built (once per requirements hash, in a
# cache outside the clone) before the tests and the demo, where its progress shows.
# Two pytest-xdist workers, one per core of the CI machine; tests/conftest.py groups
# tests by the fixtures they share and queues the longest groups first.
XDIST := -n 2 --no-loadscope-reorder

test: $(STAMP) lint whisperx-env
	$(BIN)/python -m pytest -q $(XDIST) --durations=25

test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow"

demo: $(STAMP) whisperx-env
	$(BIN)/duet demo --out $(DEMO_OUT)

# The local stack (infra/stack.py): S3 server, Ray head with dashboard, Prefect server
# and worker on loopback; `down` stops exactly what `up` started (its state file).
up: $(STAMP)
	$(BIN)/duet stack up --config $(STACK_CONFIG)

down: $(STAMP)
	$(BIN)/duet stack down --config $(STACK_CONFIG)

# infra/kuberay/*.yaml and infra/prefect/prefect.yaml, generated from $(STACK_CONFIG).
manifests: $(STAMP)
	$(BIN)/duet manifests --config $(STACK_CONFIG)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
