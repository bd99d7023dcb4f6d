"""The compiled build: which modules mypyc compiles, and which of them this process runs
compiled.

A compiled build (`ZDPROXY_COMPILE=1`, setup.py) turns each module of COMPILED_MODULES
into a C extension next to its source; Python's import prefers the extension, so the
source stays as documentation and as the fallback of a pure-Python build. The list is
the data plane's per-request path: it is the one definition setup.py, `zdproxy
--version`, the zdproxy_info metric, tests/test_compiled.py and the docs read.

This module imports nothing of zdproxy, so that setup.py can load it from its file
before the package is built.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from importlib.machinery import EXTENSION_SUFFIXES, PathFinder
from importlib.util import find_spec

# Compiled, a frozen slots dataclass refuses copy.deepcopy and pickle's default rebuild:
# routing/address.py stays interpreted, and records.py's IntervalRecord, which workers
# send pickled, has a __reduce__ of its own. The rest of routing/ and dataplane/server.py
# run per snapshot or per tick, not per request, and gain nothing measurable compiled.
COMPILED_MODULES = (
    "zdproxy.dataplane.access",
    "zdproxy.dataplane.balancer",
    "zdproxy.dataplane.body",
    "zdproxy.dataplane.client",
    "zdproxy.dataplane.context",
    "zdproxy.dataplane.exchange",
    "zdproxy.dataplane.flow",
    "zdproxy.dataplane.framing",
    "zdproxy.dataplane.http",
    "zdproxy.dataplane.limits",
    "zdproxy.dataplane.peers",
    "zdproxy.dataplane.pins",
    "zdproxy.dataplane.request_id",
    "zdproxy.dataplane.route",
    "zdproxy.dataplane.serving",
    "zdproxy.dataplane.steering",
    "zdproxy.dataplane.upstream",
    "zdproxy.dataplane.validate",
    "zdproxy.routing.histogram",
    "zdproxy.routing.records",
)


class Build(StrEnum):
    """How the modules of COMPILED_MODULES run in this process."""

    COMPILED = "compiled"  # every one from its C extension
    PURE = "pure"  # every one from its Python source
    PARTLY = "partly"  # some of each: a build that went wrong, or a stale extension


def source_path(module: str) -> str:
    """The module's source file, relative to the project's root: "zdproxy/dataplane/http.py"."""
    return module.replace(".", "/") + ".py"


def origin(module: str) -> str | None:
    """The file the module runs from: its own once imported, else the one its import
    would load (an extension wins over a source), found without importing it."""
    loaded = sys.modules.get(module)
    if loaded is not None:
        return loaded.__spec__.origin if loaded.__spec__ is not None else None
    parent, _, _ = module.rpartition(".")
    package = find_spec(parent)  # imports the grandparents only, not `parent` itself
    if package is None or package.submodule_search_locations is None:
        return None
    spec = PathFinder.find_spec(module, list(package.submodule_search_locations))
    return spec.origin if spec is not None else None


def is_compiled(module: str) -> bool:
    found = origin(module)
    return found is not None and found.endswith(tuple(EXTENSION_SUFFIXES))


def build() -> tuple[Build, int]:
    """Whether this process runs the modules of COMPILED_MODULES compiled, and how many
    of them it does."""
    compiled = sum(is_compiled(module) for module in COMPILED_MODULES)
    if compiled == len(COMPILED_MODULES):
        return Build.COMPILED, compiled
    return (Build.PURE if compiled == 0 else Build.PARTLY), compiled


def describe() -> str:
    """What `zdproxy --version` says of the build: "compiled data plane", "pure Python",
    or "partly compiled data plane: 3 of 20 modules"."""
    kind, compiled = build()
    if kind is Build.PARTLY:
        return f"partly compiled data plane: {compiled} of {len(COMPILED_MODULES)} modules"
    return "compiled data plane" if kind is Build.COMPILED else "pure Python"
