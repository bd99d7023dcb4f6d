# Every target does its own set-up: a fresh clone needs only python3 (>= 3.11).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck contracts pytest tools bench lock clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zdproxy demo

test: lint typecheck contracts pytest

lint: $(STAMP)
	$(BIN)/ruff check zdproxy tests benchmarks
	$(BIN)/ruff format --check zdproxy tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# The layers and the import circles, as pyproject.toml's [tool.importlinter] states them.
contracts: $(STAMP)
	$(BIN)/lint-imports --no-cache

pytest: $(STAMP) tools
	$(BIN)/pytest -q

# The tests run systemd's own tools (systemd-socket-activate, systemd-analyze); a
# machine without them gets Debian's systemd package (root, or sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
tools:
	@command -v systemd-socket-activate >/dev/null && command -v systemd-analyze >/dev/null || { \
		echo "installing systemd for systemd-socket-activate and systemd-analyze"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq systemd >/dev/null; }

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Regenerates the lock from pyproject.toml with a throw-away pip-tools venv, upgrading
# every pin; `make lock LOCK_FLAGS=` only adds what pyproject.toml gained.
LOCK_FLAGS ?= --upgrade
lock:
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet pip-tools
	.lock-venv/bin/pip-compile --quiet $(LOCK_FLAGS) --extra test --all-build-deps --allow-unsafe \
		--generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
		--output-file requirements.lock pyproject.toml
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .demo .mypy_cache .pytest_cache .ruff_cache
