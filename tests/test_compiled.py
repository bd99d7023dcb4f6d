"""The build under test is the one the tests think they test.

`make test` tests the Python sources: a compiled module left in the source tree (by
`setup.py build_ext --inplace`, or mypyc run by hand) would be imported instead of its
source, and every edit of that source would go untested. `make test-compiled` tests a
compiled copy of the tree (ZDPROXY_EXPECT_COMPILED=1): a build step that silently did
nothing would leave it testing the sources again. Either way these tests fail, naming
the files and the command that sets it right. The modules are zdproxy/compiled.py's.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Callable
from importlib import import_module
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from subprocess import PIPE

import aiohttp

import zdproxy
from tests.conftest import ZdProxy, admin_api, pools
from zdproxy.compiled import COMPILED_MODULES, Build, build, is_compiled, source_path

REPO = Path(__file__).resolve().parent.parent
EXPECTED = Build.COMPILED if os.environ.get("ZDPROXY_EXPECT_COMPILED") == "1" else Build.PURE
# What each build's `zdproxy --version` ends with.
DESCRIBED = {Build.COMPILED: "compiled data plane", Build.PURE: "pure Python"}
EXTENSIONS = tuple(EXTENSION_SUFFIXES)
CLEAN = "`make clean-compiled` removes them"
BUILD = "`make test-compiled` compiles the copy of the tree it tests"


def artifacts() -> list[Path]:
    """The compiled modules in this tree: extensions in the package, and mypyc's shared
    library at the root, relative to the root."""
    found = [p for p in (REPO / "zdproxy").rglob("*.so") if p.name.endswith(EXTENSIONS)]
    found += REPO.glob("*__mypyc*.so")
    return sorted(p.relative_to(REPO) for p in found)


def test_the_tests_import_zdproxy_from_their_own_tree() -> None:
    # Not from another checkout or an installed copy (the .venv's editable install of
    # another tree, when PYTHONPATH does not point here).
    assert Path(zdproxy.__file__).is_relative_to(REPO), (zdproxy.__file__, REPO)


def test_the_tree_holds_the_compiled_modules_of_the_build_under_test_and_no_others() -> None:
    found = [str(path) for path in artifacts()]
    if EXPECTED is Build.PURE:
        assert not found, f"compiled modules shadow their sources: {found}; {CLEAN}"
        return
    libraries = [name for name in found if "__mypyc" in name]
    modules = sorted(name.split(".")[0] + ".py" for name in found if name not in libraries)
    assert modules == sorted(map(source_path, COMPILED_MODULES)), f"{found}: {BUILD}"
    assert len(libraries) == 1, f"one mypyc library, not {libraries}: {BUILD}"


def test_every_listed_module_runs_as_the_build_under_test() -> None:
    wrong = []
    for name in COMPILED_MODULES:
        module = import_module(name)
        assert module.__file__ is not None and Path(module.__file__).is_relative_to(REPO)
        if is_compiled(name) != (EXPECTED is Build.COMPILED):
            wrong.append(str(Path(module.__file__).relative_to(REPO)))
    fix = CLEAN if EXPECTED is Build.PURE else BUILD
    assert not wrong, f"expected the {EXPECTED} build, but these run: {wrong}; {fix}"
    assert build() == (EXPECTED, len(COMPILED_MODULES) if EXPECTED is Build.COMPILED else 0)


async def test_a_zdproxy_started_by_the_tests_runs_the_build_under_test(
    zdproxy: Callable[..., ZdProxy],
) -> None:
    # The daemon the tests start (python -m zdproxy), and the zdproxy command beside
    # this python, each in a process of its own: both find the same tree as this one.
    proxy = zdproxy({"pools": pools(["127.0.0.1:9"])})
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.admin_url}/metrics") as response,
    ):
        metrics = await response.text()
    info = re.search(r"^zdproxy_info\{.*\bbuild=\"(\w+)\"", metrics, re.MULTILINE)
    assert info is not None, metrics
    assert info.group(1) == EXPECTED, BUILD if EXPECTED is Build.COMPILED else CLEAN

    command = Path(sys.executable).with_name("zdproxy")
    process = await asyncio.create_subprocess_exec(command, "--version", stdout=PIPE)
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    version = out.decode().strip()
    assert process.returncode == 0 and version.endswith(f"{DESCRIBED[EXPECTED]})"), version


def mypyc_libraries(pid: int) -> set[str]:
    """The files of mypyc's libraries that a process has loaded (mapped)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in maps if "__mypyc" in line}


async def test_the_data_plane_workers_run_the_build_under_test(
    zdproxy: Callable[..., ZdProxy],
) -> None:
    # With proxy.workers above 1 the data plane runs in processes of their own (python -m
    # zdproxy.workers.worker): each maps mypyc's library of this tree if it runs compiled.
    proxy = zdproxy({"pools": pools(["127.0.0.1:9"]), "proxy": {"workers": 2}})
    workers = (await admin_api(proxy, "GET", "/v1/status"))["workers"]
    assert len(workers) == 2, workers
    expected = {str(path) for path in REPO.glob("*__mypyc*.so")}
    if EXPECTED is Build.PURE:
        expected = set()
    for worker in workers:
        mapped = mypyc_libraries(worker["pid"])
        assert mapped == expected, (worker["index"], BUILD if expected else CLEAN)
