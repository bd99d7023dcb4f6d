"""Rolling update inside a pool: each upstream is drained, "restarted" by a hook from
the config, and put back only after passing its health checks; under load, not one
request fails. A failing hook stops the update and leaves the rest untouched."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.conftest import ADMIN_TOKEN, Upstream, ZdProxy, admin_api, pools, run_cli
from tests.test_rollout import load

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]


def hook(log: Path, fail_on: str = "") -> list[str]:
    """Append the upstream's address to `log`, wait while the test restarts it, succeed
    (or fail for the address `fail_on`)."""
    script = (
        "import os, sys, time; address = os.environ['ZDPROXY_UPSTREAM']; "
        f"open({str(log)!r}, 'a').write(address + '\\n'); time.sleep(0.4); "
        f"sys.exit(3 if address == {fail_on!r} else 0)"
    )
    return [sys.executable, "-c", script]


async def restart_on_request(
    log: Path, apps: dict[str, tuple[dict[str, Any], dict[str, int]]]
) -> None:
    """Play the app server restarting: while its hook runs, it answers 503 to everything."""
    handled = 0
    while True:
        lines = log.read_text().split() if log.exists() else []  # noqa: ASYNC240 - tiny file
        for address in lines[handled:]:
            readiness, failing = apps[address]
            readiness["status"] = failing["status"] = 503
            asyncio.get_running_loop().call_later(
                0.3, lambda r=readiness, f=failing: (r.update(status=200), f.clear())
            )
        handled = len(lines)
        await asyncio.sleep(0.01)


async def three_blue(upstream: StartUpstream) -> tuple[list[Upstream], dict[str, Any]]:
    apps, states = [], {}
    for i in range(3):
        readiness: dict[str, Any] = {"status": 200}
        failing: dict[str, int] = {}
        app = await upstream(f"blue-{i}", readiness=readiness, failing=failing)
        apps.append(app)
        states[app.address] = (readiness, failing)
    return apps, states


def config_for(apps: list[Upstream], log: Path, fail_on: str = "") -> dict[str, Any]:
    return {
        "pools": {
            **pools([a.address for a in apps]),
            "blue": {
                "upstreams": [a.address for a in apps],
                "health": {"path": "/readyz", "interval": "100ms", "rise": 2, "fall": 1},
            },
        },
        "hooks": {"deploy": {"command": hook(log, fail_on), "timeout": "10s"}},
    }


async def test_rolling_update_of_three_instances_under_load_fails_no_request(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    apps, states = await three_blue(upstream)
    log = tmp_path / "hook.log"
    proxy = await asyncio.get_running_loop().run_in_executor(None, zdproxy, config_for(apps, log))
    actor = asyncio.ensure_future(restart_on_request(log, states))
    try:
        async with load(proxy.url) as running:
            env = {"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_TOKEN": ADMIN_TOKEN}
            result = await run_cli(
                "rolling", "blue", "--hook", "deploy", "--wait", env=env, within=60
            )
            assert result.code == 0, result.err
    finally:
        actor.cancel()
    expected = {"blue-0", "blue-1", "blue-2"}
    failures = [name for _, name in running.outcomes if name not in expected]
    assert failures == [], failures[:5]
    assert log.read_text().split() == sorted(a.address for a in apps)  # one at a time, in order
    rolling = await admin_api(proxy, "GET", "/v1/rolling")
    assert rolling["state"] == "done" and rolling["pending"] == []
    assert rolling["updated"] == sorted(f"blue/{a.address}" for a in apps)
    status = await admin_api(proxy, "GET", "/v1/status")
    assert all(u["routable"] and not u["drained"] for u in status["pools"]["blue"]["upstreams"])
    assert {name for _, name in running.outcomes} == expected


async def test_a_failing_hook_stops_the_update_and_leaves_the_rest(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    apps, _ = await three_blue(upstream)
    ordered = sorted(a.address for a in apps)
    log = tmp_path / "hook.log"
    config = config_for(apps, log, fail_on=ordered[1])
    proxy = await asyncio.get_running_loop().run_in_executor(None, zdproxy, config)
    await admin_api(proxy, "POST", "/v1/rolling", {"color": "blue", "hook": "deploy"})
    async with asyncio.timeout(30):
        while (rolling := await admin_api(proxy, "GET", "/v1/rolling"))["state"] == "running":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert rolling["state"] == "failed"
    assert rolling["reason"] == f"blue/{ordered[1]}: hook deploy failed: exit 3; it stays drained"
    assert rolling["updated"] == [f"blue/{ordered[0]}"]
    assert log.read_text().split() == ordered[:2]  # the third was never touched
    upstreams = {
        u["id"]: u
        for u in (await admin_api(proxy, "GET", "/v1/status"))["pools"]["blue"]["upstreams"]
    }
    assert upstreams[f"blue/{ordered[1]}"]["drained"] is True
    assert (
        not upstreams[f"blue/{ordered[2]}"]["drained"]
        and upstreams[f"blue/{ordered[2]}"]["routable"]
    )


async def test_rolling_needs_a_known_hook_and_health_checks(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    apps, _ = await three_blue(upstream)
    config = config_for(apps, tmp_path / "hook.log")
    proxy = zdproxy({**config, "pools": pools([a.address for a in apps])})  # no checks
    unknown = await admin_api(
        proxy, "POST", "/v1/rolling", {"color": "blue", "hook": "nope"}, status=400
    )
    assert unknown["errors"][0]["field"] == "hook"
    unchecked = await admin_api(
        proxy, "POST", "/v1/rolling", {"color": "blue", "hook": "deploy"}, status=400
    )
    assert "health has no path" in unchecked["detail"]
    assert (await admin_api(proxy, "GET", "/v1/rolling"))["state"] == "idle"
