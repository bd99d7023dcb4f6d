"""The CLI in scripts: the deploy script of docs/operations.md, run as written against
real apps behind a real zdproxy; `deploy --wait`, `status --field`, `pool set
--wait-healthy`; one token variable for the daemon and the CLI; and its manners: no
traceback on a closed pipe or Ctrl-C, a process titled zdproxy, errors in words, and
"did you mean"."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import (
    ADMIN_TOKEN,
    CliResult,
    Upstream,
    ZdProxy,
    admin_api,
    pools,
    run_cli,
    unchecked,
    wait_healthy,
)
from tests.test_rollout import load, rollout_config
from zdproxy.cli import build_parser
from zdproxy.control.event_kinds import KINDS
from zdproxy.control.phases import Phase

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "operations.md"
BEGIN, END = "<!-- deploy-script: begin", "<!-- deploy-script: end -->"


def admin_env(proxy: ZdProxy) -> dict[str, str]:
    """What a CI job sets: the address and the daemon's own token variable."""
    return {"ZDPROXY_ADMIN_URL": proxy.admin_url, "ZDPROXY_ADMIN__TOKEN": ADMIN_TOKEN}


async def cli(proxy: ZdProxy, *args: str) -> CliResult:
    return await run_cli(*args, env=admin_env(proxy))


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without its ZDPROXY_* variables, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("ZDPROXY_")}, **extra}


# -- the guide's deploy script --------------------------------------------------------------


def guide_script() -> str:
    """The script of docs/operations.md's "Deploy from CI", between its markers."""
    block = GUIDE.read_text().split(BEGIN, 1)[1].split(END, 1)[0]
    return block.split("```sh\n", 1)[1].split("```", 1)[0]


def test_the_guides_deploy_script_is_short() -> None:
    assert len(guide_script().splitlines()) <= 10


async def run_guide_script(proxy: ZdProxy, workdir: Path) -> CliResult:
    """The script as a CI job runs it: `zdproxy` on the PATH, the admin API's address
    and token in the environment, and the operator's own ./install-release.sh (here it
    records which color it was asked to install on)."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    (bin_dir / "zdproxy").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m zdproxy "$@"\n')
    (workdir / "install-release.sh").write_text('#!/bin/sh\necho "$1" >> installed\n')
    (workdir / "deploy.sh").write_text(guide_script())
    for name in ("bin/zdproxy", "install-release.sh"):
        (workdir / name).chmod(0o755)
    env = clean_env(**admin_env(proxy), PATH=f"{bin_dir}:{os.environ['PATH']}")
    process = await asyncio.create_subprocess_exec(
        "bash",
        "deploy.sh",
        cwd=workdir,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(90):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())


async def test_the_guides_deploy_script_takes_a_good_release_live(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    # The config's own [plans.canary], with short holds, replaces the built-in one.
    proxy = zdproxy(rollout_config(blue, green, tmp_path))
    async with load(proxy.url):
        result = await run_guide_script(proxy, tmp_path)
    assert result.code == 0, result
    assert (tmp_path / "installed").read_text() == "green\n"
    assert result.out.splitlines()[-1].startswith("rollout 1: green with plan canary: done")
    status = await admin_api(proxy, "GET", "/v1/status")
    assert (status["split"]["live"], status["rollout"]["state"]) == ("green", "done")


async def test_the_guides_deploy_script_ends_5_when_the_release_fails(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue = await upstream("blue")
    green = await upstream("green", failing={"status": 500})  # ready, but every answer 500
    proxy = zdproxy(rollout_config(blue, green, tmp_path))
    async with load(proxy.url):
        result = await run_guide_script(proxy, tmp_path)
    assert result.code == 5, result
    assert "zdproxy deploy: rollout 1 rolled_back: " in result.err, result.err
    assert "Traceback" not in result.err
    status = await admin_api(proxy, "GET", "/v1/status")
    assert (status["split"]["live"], status["rollout"]["state"]) == ("blue", "rolled_back")


# -- deploy --wait, status --field, pool set --wait-healthy ---------------------------------


async def test_deploy_wait_past_its_timeout_leaves_the_rollout_or_aborts_it(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(rollout_config(blue, green, tmp_path, steps=[{"weight": 10, "hold": "10m"}]))
    await wait_healthy(proxy, "green")

    misuse = await cli(proxy, "deploy", "green", "--timeout", "1s")
    assert misuse.code == 2 and "apply only with --wait" in misuse.err

    left = await cli(proxy, "deploy", "green", "--wait", "--timeout", "1s")
    assert left.code == 4, left
    assert left.out.startswith("rollout 1: green with plan canary: preflight")
    assert "zdproxy deploy: timed out after 1s: rollout 1 is " in left.err
    assert left.err.rstrip().endswith("it goes on (`zdproxy rollout abort` stops it)")
    assert (await admin_api(proxy, "GET", "/v1/rollout"))["state"] in ("preflight", "step")
    assert (await cli(proxy, "rollout", "abort")).code == 0

    aborted = await cli(proxy, "deploy", "green", "--wait", "--timeout", "1s", "--abort-on-timeout")
    assert aborted.code == 4, aborted
    assert "; aborted it: rollout 2: green with plan canary: aborted" in aborted.err
    assert (await admin_api(proxy, "GET", "/v1/rollout"))["state"] == "aborted"


async def test_status_field_prints_one_value_for_a_script(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    await wait_healthy(proxy, "blue")

    async def field(path: str) -> CliResult:
        # Global options before the command, the token from the daemon's variable.
        return await run_cli(
            "--admin", proxy.admin_address, "status", "--field", path,
            env={"ZDPROXY_ADMIN__TOKEN": ADMIN_TOKEN},
        )  # fmt: skip

    assert (await field("split.live")).out == "blue\n"
    assert (await field("split.candidate_weight")).out == "0\n"
    assert (await field("rollout.state")).out == "idle\n"
    assert (await field("pools.blue.upstreams.0.health")).out == "up\n"
    assert json.loads((await field("split")).out)["live"] == "blue"

    typo = await field("split.liv")
    assert typo.code == 2 and typo.out == ""
    assert "zdproxy status: --field split.liv: split has no 'liv' (it has: " in typo.err
    assert "candidate_weight" in typo.err and typo.err.rstrip().endswith("; did you mean 'live'?")
    past = await field("pools.blue.upstreams.3")
    assert past.code == 2 and "pools.blue.upstreams is a list of 1: '3' is no index" in past.err
    scalar = await field("split.live.name")
    assert scalar.code == 2 and 'split.live is "blue", it has no fields' in scalar.err


async def test_pool_set_wait_healthy_and_health_reasons_in_words(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    checks = {"path": "/readyz", "interval": "100ms", "rise": 1, "fall": 1}
    config = pools([blue.address], [])
    for pool in config.values():
        pool["health"] = checks
    proxy = zdproxy({"pools": config})

    healthy = await cli(proxy, "pool", "set", "green", green.address, "--wait-healthy")
    assert healthy.code == 0, healthy
    assert healthy.out.splitlines() == [f"green: {green.address} (version -)", "green: healthy"]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
        down = await cli(proxy, "pool", "set", "green", closed, "--wait-healthy", "--timeout", "1s")
        assert down.code == 4, down
        assert f"zdproxy pool: timed out after 1s: not healthy: green/{closed}" in down.err

        async def reason() -> str:
            status = await admin_api(proxy, "GET", "/v1/status")
            return str(status["pools"]["green"]["upstreams"][0]["health_reason"])

        async with asyncio.timeout(10):
            while (await reason()) == "not checked yet":  # noqa: ASYNC110 - polls the API
                await asyncio.sleep(0.05)
        assert await reason() == "cannot connect: connection refused"
        table = (await cli(proxy, "status")).out
    assert f"green/{closed}  down" in table
    assert "GET /readyz: cannot connect: connection refused" in table

    misuse = await cli(proxy, "pool", "set", "green", green.address, "--timeout", "1s")
    assert misuse.code == 2 and "--timeout applies only with --wait-healthy" in misuse.err


# -- one token variable ----------------------------------------------------------------------


async def test_the_cli_reads_the_daemons_token_variable_and_refuses_zdproxy_admin(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    # The daemon runs with ZDPROXY_ADMIN__TOKEN (tests/conftest.py); so does the CLI.
    ok = await cli(proxy, "status", "--field", "split.live")
    assert (ok.code, ok.out) == (0, "blue\n"), ok.err
    older = await run_cli(
        "status", "--field", "split.live",
        env={"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    assert (older.code, older.out) == (0, "blue\n"), older.err

    retired = await run_cli("status", env={"ZDPROXY_ADMIN": proxy.admin_address})
    assert retired.code == 2 and "set ZDPROXY_ADMIN_URL instead" in retired.err
    # ZDPROXY_ADMIN_URL is no field of the daemon's settings: `check` ignores it.
    checked = await run_cli(
        "check", "-c", str(proxy.config_path), env={"ZDPROXY_ADMIN_URL": proxy.admin_url}
    )
    assert checked.code == 0, checked.err


# -- manners: closed pipes, Ctrl-C, the process title, errors --------------------------------


async def test_a_closed_pipe_or_ctrl_c_ends_without_a_traceback(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])})
    command = (sys.executable, "-m", "zdproxy")

    # `zdproxy status | head -1`: the reader is gone before zdproxy writes.
    reader, writer = os.pipe()
    os.close(reader)
    status = await asyncio.create_subprocess_exec(
        *command, "status", stdout=writer, stderr=asyncio.subprocess.PIPE,
        env=clean_env(**admin_env(proxy)),
    )  # fmt: skip
    os.close(writer)
    async with asyncio.timeout(30):
        _, err = await status.communicate()
    assert (status.returncode, err) == (141, b"")

    # `zdproxy events -f | head -n 1`: the stream goes on after head quit.
    pipeline = await asyncio.create_subprocess_exec(
        "bash", "-o", "pipefail", "-c", '"$@" events -f | head -n 1', "sh", *command,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=clean_env(**admin_env(proxy)),
    )  # fmt: skip
    try:
        assert pipeline.stdout is not None
        assert (await pipeline.stdout.readline()).strip()  # head's one line: it streams
        async with asyncio.timeout(30):
            while pipeline.returncode is None:  # new events until it writes into the pipe
                await admin_api(proxy, "PUT", "/v1/rules", {"rules": []})  # rules_changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pipeline.wait(), 0.1)
        _, err = await pipeline.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            pipeline.kill()
        await pipeline.wait()
    assert pipeline.returncode == 141 and b"Traceback" not in err, err

    # Ctrl-C: one line on stderr, exit 130.
    follow = await asyncio.create_subprocess_exec(
        *command, "events", "-f",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=clean_env(**admin_env(proxy)),
    )  # fmt: skip
    assert follow.stdout is not None
    assert (await follow.stdout.readline()).strip()  # it is streaming
    follow.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        _, err = await follow.communicate()
    assert (follow.returncode, err) == (130, b"zdproxy: interrupted\n")


def test_the_daemon_is_titled_zdproxy(zdproxy: StartProxy) -> None:
    proxy = zdproxy({"pools": unchecked(pools(["127.0.0.1:9"]))})  # never connected to
    assert Path(f"/proc/{proxy.pid}/comm").read_text() == "zdproxy\n"
    title = Path(f"/proc/{proxy.pid}/cmdline").read_bytes().rstrip(b"\0").decode()
    assert title == f"zdproxy run -c {proxy.config_path}"
    found = subprocess.run(["pidof", "zdproxy"], capture_output=True, text=True, check=False)
    assert str(proxy.pid) in found.stdout.split(), found


async def test_errors_say_what_to_do(zdproxy: StartProxy, upstream: StartUpstream) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
        unreachable = await run_cli("status", env={"ZDPROXY_ADMIN_URL": f"http://{closed}"})
        # Without an action `rollout` says so: exit 2, not 3 (it tries no connection).
        bare = await run_cli("rollout", env={"ZDPROXY_ADMIN_URL": closed})
    assert (unreachable.code, unreachable.err) == (
        3,
        f"zdproxy status: cannot reach zdproxy's admin API at http://{closed}: connection "
        "refused (is zdproxy running? see `systemctl status zdproxy`)\n",
    )
    assert bare.code == 2 and "the following arguments are required: ACTION" in bare.err

    typos = {
        ("stauts",): "invalid choice: 'stauts' (choose from ",
        ("deploy", "gren"): "did you mean 'green'?",
        ("rollout", "abrot"): "did you mean 'abort'?",
        ("events", "--kind", "rolout_done"): (
            "unknown event kind 'rolout_done'; did you mean 'rollout_done'?"
        ),
    }
    for args, message in typos.items():
        result = await run_cli(*args, env={"ZDPROXY_ADMIN_URL": closed})
        assert result.code == 2 and message in result.err, (args, result)
    assert "did you mean 'status'?" in (await run_cli("stauts")).err

    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy({"pools": pools([blue.address], [green.address])})
    plan = await cli(proxy, "deploy", "green", "--plan", "canery")
    assert plan.code == 1
    assert "no plan 'canery' (known: canary, blue-green); did you mean 'canary'?" in plan.err


# -- the parser and the vocabulary, in process -----------------------------------------------


@pytest.mark.parametrize(
    ("argv", "config", "admin"),
    [
        (["-c", "a.toml", "status"], "a.toml", None),
        (["status", "-c", "a.toml"], "a.toml", None),
        (["--config", "a.toml", "--admin", "x:1", "rollout", "show"], "a.toml", "x:1"),
        (["-c", "a.toml", "pool", "set", "green", "x:1", "-c", "b.toml"], "b.toml", None),
        (["rollout", "abort", "--admin", "unix:/a.sock"], None, "unix:/a.sock"),
        (["-c", "a.toml", "check"], "a.toml", None),
    ],
)
def test_global_options_before_or_after_the_command(
    argv: list[str], config: str | None, admin: str | None
) -> None:
    args = build_parser().parse_args(argv)
    assert (args.config, args.admin) == (config, admin)


def test_every_kind_zdproxy_emits_is_known_to_the_cli() -> None:
    """Every `emit(KIND, ...)` of the package: a literal kind is in KINDS; an f-string's
    family ("rollout_{phase}", "rolling_{state}") has members there."""
    found: set[str] = set()
    families: set[str] = set()
    for path in (REPO / "zdproxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "emit"
                and node.args
            ):
                continue
            kind = node.args[0]
            branches = [kind.body, kind.orelse] if isinstance(kind, ast.IfExp) else [kind]
            for branch in branches:
                if isinstance(branch, ast.Constant):
                    found.add(str(branch.value))
                elif isinstance(branch, ast.JoinedStr):
                    head = branch.values[0]
                    assert isinstance(head, ast.Constant), ast.unparse(branch)
                    families.add(str(head.value))
    assert found and found <= KINDS, found - KINDS
    assert families == {"rollout_", "rolling_"}
    assert {f"rollout_{phase}" for phase in Phase} <= KINDS
    assert {"rolling_started", "rolling_done", "rolling_failed"} <= KINDS
