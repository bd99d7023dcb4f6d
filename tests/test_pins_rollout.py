"""Pins and a rollout that rolls back: a real zdproxy in front of real blue and green apps.

A tenant pinned to the candidate's color goes back to the live color with everyone
else when the judge rolls the candidate back, and stays there across a restart; a pin
that opted out (after_rollback = "stay") keeps its users on the candidate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from tests.conftest import ADMIN_TOKEN, Upstream, ZdProxy, admin_api, run_cli
from tests.test_pins import color
from tests.test_rollout import load, rollout_config, until_rollout

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]


async def answer_of(proxy: ZdProxy, tenant: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.get(proxy.url + "/", headers={"X-Tenant": tenant}) as response,
    ):
        return response.status, await response.text()


async def test_a_tenant_pinned_to_the_candidate_goes_back_to_live_when_it_rolls_back(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    failing: dict[str, int] = {}
    blue, green = await upstream("blue"), await upstream("green", failing=failing)
    config = rollout_config(blue, green, tmp_path, steps=[{"weight": 20, "hold": "30s"}])
    config["pins"] = [
        {"name": "acme", "header": "X-Tenant", "values": ["acme"], "to": "green"},
        {
            "name": "initech",
            "header": "X-Tenant",
            "values": ["initech"],
            "to": "green",
            "after_rollback": "stay",
        },
    ]
    proxy = zdproxy(config)
    async with load(proxy.url):
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        await until_rollout(proxy, lambda r: r["state"] == "step")
        assert await color(proxy, X_Tenant="acme") == "green"
        failing["status"] = 500
        rolled = await until_rollout(proxy, lambda r: r["state"] != "step")
    assert rolled["state"] == "rolled_back", rolled
    assert await color(proxy, X_Tenant="acme") == "blue"
    assert await answer_of(proxy, "initech") == (500, "green failing\n")  # it stays
    reason = "pins to green fall back to blue since rollout 1 rolled back (initech stay on green)"
    status = await admin_api(proxy, "GET", "/v1/status")
    assert status["pin_fallback"] == {
        "rollout": 1,
        "outcome": "rolled_back",
        "color": "green",
        "live": "blue",
        "rules": ["acme"],
        "staying": ["initech"],
        "reason": reason,
    }
    env = {"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_TOKEN": ADMIN_TOKEN}
    shown = await run_cli("status", env=env)
    assert shown.code == 0 and reason in shown.out, shown

    proxy.process.kill()  # kill -9: the fallback comes back from the journal
    proxy.process.wait(5)
    again = zdproxy(config)
    assert await color(again, X_Tenant="acme") == "blue"
    assert (await admin_api(again, "GET", "/v1/status"))["pin_fallback"]["reason"] == reason
