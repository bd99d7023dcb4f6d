"""The optional compiled build. pyproject.toml holds every piece of metadata; this file
only adds C extensions, and only when the environment has ZDPROXY_COMPILE=1:

    ZDPROXY_COMPILE=1 python -m build --no-isolation   # cp311-cp311-linux_x86_64 wheel
    python -m build --no-isolation                     # pure py3-none-any wheel

With ZDPROXY_COMPILE=1, mypyc (part of mypy) compiles the modules of
zdproxy/compiled.py's COMPILED_MODULES; it needs mypy in the building environment
(hence --no-isolation: the .venv of requirements.lock has it), a C compiler and
Python's headers. Any other value, or none, builds the pure-Python package.
"""

from __future__ import annotations

import os
import sys
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def compiled_modules() -> list[str]:
    """The source files to compile, from zdproxy/compiled.py, loaded by its path: the
    package itself is not importable before it is built."""
    spec = spec_from_file_location("_zdproxy_compiled", ROOT / "zdproxy" / "compiled.py")
    assert spec is not None and spec.loader is not None
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return [module.source_path(name) for name in module.COMPILED_MODULES]


# The commands that build extensions. mypycify type-checks the modules and writes their C
# when it is called, so it is called only for these: not for the metadata or the sdist
# (which carries no generated C), nor for an editable install (whose extensions would
# land in the source tree and shadow its edits).
BUILDS_EXTENSIONS = {"bdist_wheel", "build", "build_ext"}


class BuildExt(build_ext):
    """build_ext, without the search path for shared libraries (RUNPATH) that a Python
    built with --enable-shared (pyenv's) gives every extension it builds: an extension
    does not link libpython on Linux, and a path of the build machine does not belong
    in a wheel or a package (lintian: custom-library-search-path)."""

    def build_extensions(self) -> None:
        linker = self.compiler.linker_so
        self.compiler.linker_so = [arg for arg in linker if not arg.startswith("-Wl,-rpath")]
        super().build_extensions()


def extensions() -> list[Any]:
    if os.environ.get("ZDPROXY_COMPILE") != "1" or not BUILDS_EXTENSIONS & set(sys.argv[1:]):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        sys.exit(
            "setup.py: ZDPROXY_COMPILE=1 compiles the data plane with mypyc, which comes "
            "with mypy: install mypy in this environment (`pip install mypy`, and build "
            "with --no-isolation), or build the pure-Python package without ZDPROXY_COMPILE"
        )
    # Paths relative to the root, where setuptools runs: mypyc names the modules after them.
    return mypycify(compiled_modules(), opt_level="3")


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
