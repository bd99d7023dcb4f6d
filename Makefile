# Every target does its own set-up: a fresh clone needs only python3 (>= 3.11).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench lock clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zdproxy demo

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check zdproxy tests benchmarks
	$(BIN)/ruff format --check zdproxy tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

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
