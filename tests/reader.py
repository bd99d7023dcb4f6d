"""A reader's shell, for running commands as the docs give them (tests/test_readme.py):
bash in a home directory, the venv's zdproxy first on PATH, each command its own
process group, stopped as a terminal stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

COMMAND_WITHIN = 60.0  # seconds; `wait --until done` waits out a whole demo rollout
FIRST_LINE_WITHIN = 20.0  # seconds for a command that follows to print


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    def explain(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"


PIDOF_GROUP = "READER_PIDOF_GROUP"  # the shim's pidof finds processes of this group only
PIDOF_SHIM = f"""#!/bin/sh
# pidof, narrowed to the process group ${PIDOF_GROUP} (what the test started; other
# processes of the same name on this machine are not the test's to signal): the first
# process of that group the real pidof finds by NAME.
names=""
for arg in "$@"; do
  [ "$arg" = -s ] || names="$names $arg"
done
for pid in $({{real}} $names); do
  read -r stat < "/proc/$pid/stat" || continue
  set -- ${{{{stat##*) }}}}  # after "PID (COMM) ": state, ppid, pgrp
  if [ "$3" = "${PIDOF_GROUP}" ]; then echo "$pid"; exit 0; fi
done
exit 1
"""


class Shell:
    """A reader's shell: in `home`, the venv's zdproxy and the narrowed pidof first on
    PATH, none of the test's ZDPROXY_* variables."""

    def __init__(self, home: Path, tmp_path: Path) -> None:
        self.home = home
        self.pidof_group: int | None = None  # where `pidof` looks; None: nowhere
        shims = tmp_path / "bin"
        shims.mkdir()
        real = shutil.which("pidof")
        assert real is not None, "`pidof` is not installed"
        (shims / "pidof").write_text(PIDOF_SHIM.format(real=real))
        (shims / "pidof").chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ZDPROXY_")}
        self.env["PATH"] = f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}"

    async def start(
        self, text: str, stdout: int | io.TextIOWrapper, stderr: int | io.TextIOWrapper
    ) -> asyncio.subprocess.Process:
        """`text` in bash, in its own process group (as a terminal's foreground job)."""
        return await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            text,
            cwd=self.home,
            env={**self.env, PIDOF_GROUP: str(self.pidof_group or "")},
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )

    async def run(self, text: str) -> Outcome:
        """A command that ends by itself."""
        process = await self.start(text, asyncio.subprocess.PIPE, asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(COMMAND_WITHIN):
                out, err = await process.communicate()
        finally:
            await stop(process, signal.SIGKILL)
        assert process.returncode is not None
        return Outcome(process.returncode, out.decode(), err.decode())

    async def follow(self, text: str) -> Outcome:
        """A command that runs until Ctrl-C: its first line, then SIGINT."""
        process = await self.start(text, asyncio.subprocess.PIPE, asyncio.subprocess.PIPE)
        assert process.stdout is not None and process.stderr is not None
        try:
            async with asyncio.timeout(FIRST_LINE_WITHIN):
                first = await process.stdout.readline()
        finally:
            code = await stop(process, signal.SIGINT)
        rest, err = await process.stdout.read(), await process.stderr.read()
        return Outcome(code, (first + rest).decode(), err.decode())


async def stop(process: asyncio.subprocess.Process, how: signal.Signals) -> int:
    """Signal the process group as a terminal would; SIGKILL if it outlives the bound."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, how)
    try:
        async with asyncio.timeout(15):
            return await process.wait()
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise AssertionError(f"still running 15 s after {how.name}") from None
