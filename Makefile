# Every target does its own set-up: a fresh clone needs only python3 (>= 3.11).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck contracts pytest tools browser bench lock clean \
	dist wheel wheelhouse deb deb-tools package-test screenshots test-compiled clean-compiled \
	etcd

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
	$(BIN)/ruff check zdproxy tests benchmarks setup.py
	$(BIN)/ruff format --check zdproxy tests benchmarks setup.py

typecheck: $(STAMP)
	$(BIN)/mypy

# The layers and the import circles, as pyproject.toml's [tool.importlinter] states them.
contracts: $(STAMP)
	$(BIN)/lint-imports --no-cache

pytest: $(STAMP) tools browser etcd
	$(BIN)/pytest -q

# The tests run systemd's own tools (systemd-socket-activate, systemd-analyze), and
# man and groff to render the man page; a machine without them gets Debian's packages
# (root, or sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
tools:
	@command -v systemd-socket-activate >/dev/null && command -v systemd-analyze >/dev/null || { \
		echo "installing systemd for systemd-socket-activate and systemd-analyze"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq systemd >/dev/null; }
	@command -v man >/dev/null && command -v groff >/dev/null || { \
		echo "installing man-db and groff-base for man and groff"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq man-db groff-base >/dev/null; }

# The dashboard's tests (tests/test_dashboard.py) and `make screenshots` drive Debian's
# Chromium through its own chromedriver, /usr/bin/chromedriver: selenium is pointed at
# it, so nothing is downloaded at test time. Installed when missing (root, or sudo).
BROWSER_PACKAGES := chromium chromium-driver
browser:
	@missing="$$(for p in $(BROWSER_PACKAGES); do dpkg-query -W -f='$${db:Status-Abbrev}' $$p \
		2>/dev/null | grep -q '^ii' || echo $$p; done)"; \
	[ -z "$$missing" ] || { echo "installing" $$missing; $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; }

# The fleet store's tests (tests/test_fleet_store.py) start their own etcd clusters on
# free loopback ports (tests/etcd_cluster.py) from Debian's etcd-server, with etcdctl from
# etcd-client; installed when missing (root, or sudo). A system etcd service the package
# may enable or start is left as it is: nothing here starts, stops or talks to it.
ETCD_PACKAGES := etcd-server etcd-client
etcd:
	@missing="$$(for p in $(ETCD_PACKAGES); do dpkg-query -W -f='$${db:Status-Abbrev}' $$p \
		2>/dev/null | grep -q '^ii' || echo $$p; done)"; \
	[ -z "$$missing" ] || { echo "installing" $$missing; $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
		$$missing >/dev/null; }

# The man page and the bash and zsh completion, made from the CLI's parser
# (zdproxy/manual.py): $(MANUAL_DIR)/man/zdproxy.1, $(MANUAL_DIR)/completion/bash/zdproxy
# and $(MANUAL_DIR)/completion/zsh/_zdproxy, named as they are installed.
MANUAL_DIR ?= dist
.PHONY: man completion
man completion: $(STAMP)
	$(BIN)/python -m zdproxy.manual $@ $(MANUAL_DIR)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# docs/img/dashboard-rollout.png and dashboard-rollback.png, from a real `zdproxy demo`
# with a rollout and a rollback in headless Chromium: run by hand when the page changes.
screenshots: $(STAMP) browser
	$(BIN)/python benchmarks/screenshots.py docs/img

# Regenerates the locks from pyproject.toml with a throw-away pip-tools venv, upgrading
# every pin; `make lock LOCK_FLAGS=` only adds what pyproject.toml gained.
# requirements.lock: all a developer and CI install (runtime, tests, build backend).
# requirements-runtime.lock: only what zdproxy runs on, at the same versions (compiled
# within the first), for the packages (`make dist`).
LOCK_FLAGS ?= --upgrade
PIP_COMPILE := .lock-venv/bin/pip-compile --quiet --allow-unsafe --generate-hashes \
	--strip-extras --no-emit-index-url --no-emit-find-links
lock:
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet pip-tools
	$(PIP_COMPILE) $(LOCK_FLAGS) --extra test --all-build-deps \
		--output-file requirements.lock pyproject.toml
	$(PIP_COMPILE) --upgrade --constraint requirements.lock \
		--output-file requirements-runtime.lock pyproject.toml
	rm -rf .lock-venv

# Release artifacts, in dist/: the sdist and the wheel (version from the git tag, see
# pyproject.toml), the wheelhouse (every runtime dependency as a wheel, checked against
# the runtime lock's hashes), the man page and shell completions, and the Debian package
# built from all of them. DIST_PARTS is what `make dist` builds.
DIST_PARTS := wheel wheelhouse man completion deb
dist: $(DIST_PARTS)

# The wheel is the compiled build (setup.py: mypyc compiles the data plane's per-request
# modules, which zdproxy/compiled.py lists, for this python: a cp311-cp311-linux_x86_64
# wheel) where a C compiler and Python's headers are found, else the pure-Python
# py3-none-any wheel. ZDPROXY_COMPILE=1 insists on the compiled build (it fails without
# a compiler), `make wheel ZDPROXY_COMPILE=0` builds the pure one. --no-isolation: the
# build backend and mypy come from the lock (hashed), not from the network.
ZDPROXY_COMPILE ?=
CAN_COMPILE = command -v "$${CC:-cc}" >/dev/null && $(BIN)/python -c 'import pathlib, \
	sys, sysconfig; sys.exit(not pathlib.Path(sysconfig.get_path("include"), "Python.h").exists())'
wheel: $(STAMP)
	rm -f dist/zdproxy-*.whl dist/zdproxy-*.tar.gz
	@compile='$(ZDPROXY_COMPILE)'; \
	if [ -z "$$compile" ]; then \
		if $(CAN_COMPILE); then compile=1; else compile=0; \
			echo "no C compiler or no Python headers: building the pure-Python wheel"; fi; \
	fi; \
	echo "ZDPROXY_COMPILE=$$compile $(BIN)/python -m build --no-isolation --outdir dist ."; \
	ZDPROXY_COMPILE=$$compile $(BIN)/python -m build --no-isolation --outdir dist .

wheelhouse: $(STAMP) requirements-runtime.lock
	$(BIN)/python -m pip download --quiet --require-hashes --only-binary=:all: \
		--dest dist/wheelhouse -r requirements-runtime.lock

# dist/zdproxy_VERSION_ARCH.deb: zdproxy in its own venv on the system's python3, under
# /usr/lib/zdproxy (packaging/build-deb says how). No network: it installs from dist/.
deb: wheel wheelhouse man completion deb-tools
	packaging/build-deb dist
	lintian --fail-on error,warning dist/zdproxy_*.deb

# Debian's tools to build and check the package, installed when missing (root, or sudo).
DEB_TOOLS := debhelper dpkg-dev fakeroot lintian python3-venv
deb-tools:
	@missing="$$(for p in $(DEB_TOOLS); do dpkg-query -W -f='$${db:Status-Abbrev}' $$p \
		2>/dev/null | grep -q '^ii' || echo $$p; done)"; \
	[ -z "$$missing" ] || { echo "installing" $$missing; $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
		$$missing >/dev/null; }

# The packages as users get them: slow (builds, fresh venvs, installs the .deb with dpkg
# and purges it: root, or sudo), so apart from `make test`.
package-test: $(STAMP) wheelhouse deb-tools tools
	$(BIN)/pytest -q -m packaging tests/test_packaging.py

# The data plane's tests against the compiled build, which `make test` never runs (it
# tests the sources). The working tree (tracked and untracked files, not the ignored
# ones: uncommitted edits are tested) is copied to COMPILED_TREE and compiled in place
# there, then COMPILED_TESTS run from the copy with PYTHONPATH on it, so that every
# process they start imports the copy; tests/test_compiled.py fails if one runs the
# sources (ZDPROXY_EXPECT_COMPILED=1). zdproxy/_version.py (ignored) goes along, and
# again after the build, which writes its own (version 0.0.0: the copy has no git).
COMPILED_TREE := build/compiled-tree
# The tests that run requests through the data plane: the HTTP conformance tests, routing,
# pins, retries, drain and evacuation, outliers, local errors, tunnels and workers.
COMPILED_TESTS := tests/test_compiled.py tests/test_http_*.py tests/test_websocket.py \
	tests/test_dataplane_unit.py tests/test_histogram_unit.py tests/test_routing.py \
	tests/test_sticky.py tests/test_pins.py tests/test_pins_unit.py tests/test_retry.py \
	tests/test_evacuate.py tests/test_drain.py tests/test_outliers.py \
	tests/test_local_errors.py tests/test_workers.py
test-compiled: $(STAMP)
	rm -rf $(COMPILED_TREE)
	mkdir -p $(COMPILED_TREE)
	git ls-files -z --cached --others --exclude-standard | \
		tar -c --null --files-from=- --ignore-failed-read -f - | tar -x -C $(COMPILED_TREE)
	cp zdproxy/_version.py $(COMPILED_TREE)/zdproxy/
	cd $(COMPILED_TREE) && ZDPROXY_COMPILE=1 $(CURDIR)/$(BIN)/python setup.py --quiet \
		build_ext --inplace
	cp zdproxy/_version.py $(COMPILED_TREE)/zdproxy/
	cd $(COMPILED_TREE) && PYTHONPATH=$(CURDIR)/$(COMPILED_TREE) ZDPROXY_EXPECT_COMPILED=1 \
		$(CURDIR)/$(BIN)/pytest -q $(COMPILED_TESTS)

# Compiled modules in the source tree shadow their sources (Python imports an extension
# before a .py): left there by a `setup.py build_ext --inplace` or mypyc run by hand,
# they make `make test` test stale code, and tests/test_compiled.py fails on them.
clean-compiled:
	find zdproxy -name '*.so' -delete
	rm -f ./*__mypyc*.so
	rm -rf $(COMPILED_TREE)

clean: clean-compiled
	rm -rf $(VENV) .demo .mypy_cache .pytest_cache .ruff_cache dist
