# Two commands for a newcomer (see README.md): `make demo` and `make test`.
# Both are idempotent: `setup` reinstalls only when pyproject.toml changed.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup browser lint test test-unit test-integration test-e2e demo demo-loop stack-up stack-down stack-status docs docs-check

setup: $(INSTALLED) browser

# torch==2.13.0 (pinned in pyproject.toml) is the CPU wheel found through pip's configured local wheels.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Headless Chromium for the listening-page browser test (Debian package).
browser:
	@if command -v chromium >/dev/null 2>&1; then \
		echo "chromium: $$(command -v chromium)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "chromium: apt-get install failed; browser tests will be skipped"; \
	else \
		echo "chromium: not installed and apt-get is unavailable (or not root); browser tests will be skipped"; \
	fi

# ruff (configured in pyproject.toml): lint, and the format every file is kept in.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

test-integration: setup
	$(BIN)/pytest -m integration $(PYTEST_ARGS)

test-e2e: setup
	$(BIN)/pytest -m e2e $(PYTEST_ARGS)

stack-up: setup
	$(BIN)/musicrl stack up

stack-down:
	$(BIN)/musicrl stack down

stack-status:
	$(BIN)/musicrl stack status

# The demonstration of the loop runs here, on the stack that `stack-up` started
# (servers and services); the stack keeps running so the listening page can be opened.
demo-loop:
	$(BIN)/musicrl stack status
	$(BIN)/musicrl experiment demo

demo: stack-up demo-loop

docs:
	$(BIN)/python -m musicrl.settings_doc

docs-check:
	$(BIN)/python -m musicrl.settings_doc --check
