"""`zdproxy init` and the built-in plans: a config for one app that passes `check`, runs,
and deploys with the built-in canary plan, with no [plans] in it."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN, READY, Upstream, run_cli
from zdproxy.config.loader import ConfigError, load_settings, settings_from_mapping
from zdproxy.config.plans import BUILTIN_PLANS

StartUpstream = Callable[..., Awaitable[Upstream]]


async def init(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    result = await run_cli("init", "--output", str(tmp_path / "zdproxy.toml"), *args)
    return result.code, result.out, result.err


async def test_init_writes_a_config_that_checks_and_a_private_token(tmp_path: Path) -> None:
    code, out, err = await init(tmp_path, "--app", "127.0.0.1:9001", "--health", "/readyz")
    assert code == 0, err
    config, token = tmp_path / "zdproxy.toml", tmp_path / "admin.token"
    assert f"wrote {config}: blue 127.0.0.1:9001, green 127.0.0.1:9002" in out
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text().strip()) >= 32

    data = tomllib.loads(config.read_text())
    assert data["pools"]["blue"]["upstreams"] == ["127.0.0.1:9001"]
    assert data["pools"]["green"]["upstreams"] == ["127.0.0.1:9002"]  # the app's port + 1
    assert data["pools"]["blue"]["health"] == data["pools"]["green"]["health"]
    assert data["pools"]["green"]["health"] == {"path": "/readyz"}
    assert data["admin"]["token_file"] == str(token)
    assert "plans" not in data and data["rollout"]["default_plan"] == "canary"

    checked = await run_cli("check", "-c", str(config))
    assert (checked.code, checked.out.strip(), checked.err) == (0, f"{config}: ok", "")
    settings = load_settings(config)
    assert settings.admin.bearer_token == token.read_text().strip().encode()
    assert list(settings.plans) == ["canary", "blue-green"]


async def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    assert (await init(tmp_path, "--app", "127.0.0.1:9001"))[0] == 0
    config, token = tmp_path / "zdproxy.toml", tmp_path / "admin.token"
    before = (config.read_text(), token.read_text())

    code, _, err = await init(tmp_path, "--app", "127.0.0.1:7001")
    assert code == 2 and f"{config}, {token} exists: --force overwrites it" in err
    assert (config.read_text(), token.read_text()) == before

    token.chmod(0o644)
    code, _, err = await init(tmp_path, "--app", "127.0.0.1:7001", "--force")
    assert code == 0, err
    assert '"127.0.0.1:7001"' in config.read_text() and token.read_text() != before[1]
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    # Without --health both pools get the default, a TCP connect: alike, no warning.
    checked = await run_cli("check", "-c", str(config))
    assert (checked.code, checked.err) == (0, ""), checked.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app", "unix:/run/app.sock"], "give --candidate, green's address"),
        (["--app", "127.0.0.1:9001", "--candidate", "127.0.0.1:9001"], "the app itself"),
        (["--app", "127.0.0.1:9001", "--health", "readyz"], "a path starts with /"),
        (["--app", "127.0.0.1:9001", "--listen", "127.0.0.1:9002"], "zdproxy's own listener"),
        (["--app", "localhost"], "invalid address"),
    ],
)
async def test_init_refuses_what_would_not_work(
    tmp_path: Path, args: list[str], message: str
) -> None:
    code, _, err = await init(tmp_path, *args)
    assert code == 2 and message in err, err
    assert not (tmp_path / "zdproxy.toml").exists()  # nothing written
    assert not (tmp_path / "admin.token").exists()


# -- the built-in plans ---------------------------------------------------------------------


def test_built_in_plans_without_plans_and_replaced_by_the_files_own() -> None:
    bare = settings_from_mapping({})
    assert list(bare.plans) == ["canary", "blue-green"]
    assert bare.rollout.default_plan == "canary"
    assert [s.weight for s in bare.plans["canary"].steps] == [5, 25, 50, 100]
    assert [s.weight for s in bare.plans["blue-green"].steps] == [100]

    own = {"steps": [{"weight": 50, "hold": "1s"}, {"weight": 100, "hold": "1s"}]}
    replaced = settings_from_mapping({"plans": {"canary": own, "quick": own}})
    assert list(replaced.plans) == ["canary", "quick", "blue-green"]  # the file's first
    assert [s.weight for s in replaced.plans["canary"].steps] == [50, 100]  # whole, not merged
    assert replaced.plans["blue-green"] == BUILTIN_PLANS["blue-green"]


def test_default_plan_names_a_plan_with_a_suggestion() -> None:
    assert settings_from_mapping({"rollout": {"default_plan": "blue-green"}}).rollout
    with pytest.raises(ConfigError) as refused:
        settings_from_mapping({"rollout": {"default_plan": "canery"}})
    assert refused.value.errors == [
        "rollout.default_plan: no plan 'canery' (known: canary, blue-green); did you mean 'canary'?"
    ]


async def test_check_verbose_lists_the_plans(tmp_path: Path) -> None:
    path = tmp_path / "zdproxy.toml"
    path.write_text(
        '[pools.blue]\nupstreams = ["127.0.0.1:9001"]\n'
        '[plans.quick]\nsteps = [{ weight = 100, hold = "10s" }]\nbake = "1m30s"\n'
        '[rollout]\ndefault_plan = "quick"\n'
    )
    result = await run_cli("check", "-c", str(path), "-v")
    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        f"{path}: ok",
        "plan quick: 100% for 10s, then a 1m30s bake",
        "plan canary (built-in): 5% for 1m, 25% for 2m, 50% for 2m, 100% for 1m, then a 5m bake",
        "plan blue-green (built-in): 100% for 30s, then a 10m bake",
        "`zdproxy deploy` without --plan uses: quick",
    ]


# -- init, check, run, deploy ---------------------------------------------------------------


class Daemon:
    """`zdproxy run -c FILE` on a file as written, its listeners moved to free ports and
    its state to the test's directory from the environment, as an operator would."""

    def __init__(self, config: Path, state: Path) -> None:
        overrides = {
            "ZDPROXY_PROXY__LISTEN": "127.0.0.1:0",
            "ZDPROXY_ADMIN__LISTEN": "127.0.0.1:0",
            "ZDPROXY_STATE__DIR": str(state),
        }
        clean = {k: v for k, v in os.environ.items() if not k.startswith("ZDPROXY_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "zdproxy", "run", "-c", str(config)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**clean, **overrides},
        )
        assert self.process.stderr is not None
        self.admin, self.url, lines = "", "", []
        for line in self.process.stderr:
            lines.append(line)
            if match := ADMIN.search(line):
                self.admin = match.group(1)
            elif match := READY.search(line):
                self.url = f"http://{match.group(1)}"
                break
        assert self.url, "zdproxy did not start:\n" + "".join(lines)
        stderr = self.process.stderr
        threading.Thread(target=lambda: stderr.read(), daemon=True).start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


async def test_init_check_run_and_deploy_with_the_built_in_canary(
    tmp_path: Path, upstream: StartUpstream, daemons: list[Daemon]
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = tmp_path / "zdproxy.toml"
    app = ["--app", blue.address, "--candidate", green.address, "--health", "/readyz"]
    assert (await init(tmp_path, *app))[0] == 0
    assert (await run_cli("check", "-c", str(config))).code == 0

    daemon = Daemon(config, tmp_path / "state")
    daemons.append(daemon)
    # The CLI reads the token from the file init wrote; the address is the moved one.
    cli = ("-c", str(config), "--admin", daemon.admin)
    healthy = await run_cli(*cli, "wait", "--until", "healthy:green", "--timeout", "30s")
    assert healthy.code == 0, healthy.err

    deployed = await run_cli(*cli, "deploy", "green")
    assert deployed.code == 0, deployed.err
    assert deployed.out.startswith("rollout 1: green with plan canary: preflight")

    async with asyncio.timeout(30):  # the built-in canary's first step: 5%
        while (rollout := await rollout_of(cli))["state"] == "preflight":  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    assert (rollout["state"], rollout["step"], rollout["share"]) == ("step", 1, 5)
    aborted = await run_cli(*cli, "rollout", "abort")
    assert aborted.code == 0, aborted.err
    assert aborted.out.startswith("rollout 1: green with plan canary: aborted")
    assert (await rollout_of(cli))["state"] == "aborted"


async def rollout_of(cli: tuple[str, ...]) -> dict[str, Any]:
    shown = await run_cli(*cli, "status", "--field", "rollout")
    assert shown.code == 0, shown.err
    rollout: dict[str, Any] = json.loads(shown.out)
    return rollout
