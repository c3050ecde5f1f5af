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

.PHONY: demo test test-fast lint format system-deps venv whisperx-env clean

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
test: $(STAMP) lint whisperx-env
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP) whisperx-env
	$(BIN)/duet demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
