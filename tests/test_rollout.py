"""Rollouts against real upstreams under load: a healthy canary completes, a failing or
slow candidate is rolled back within a second, too little traffic holds a step, a
failing hook aborts before any user request, and a kill -9 mid-rollout resumes."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import (
    ADMIN_TOKEN,
    Upstream,
    ZdProxy,
    admin_api,
    free_port,
    pools,
    run_cli,
    wait_until,
)

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]

# Errors only: p99s of a few ms on a loaded 2-core machine jitter across the histogram's
# buckets, and a 2x ratio of them is noise. The latency test sets its ratio itself.
# These tests are about the rollout's mechanics, on a few hundred requests a second:
# limits that little traffic can show (the judge's power is tests/test_judge_unit.py's
# and benchmarks/judge_matrix.py's business).
FAST_JUDGE = {
    "window": "3s",
    "min_requests": 10,
    "max_error_rate": 0.2,
    "max_error_rate_over_live": 1.0,
    "max_latency_ratio": 0,
}


# The history of a rollout of rollout_config's default plan that completed.
COMPLETED = [
    ("preflight", 0),
    ("step", 1),
    ("step", 2),
    ("step", 3),
    ("baking", 3),
    ("finishing", 3),
    ("done", 3),
]


def rollout_config(blue: Upstream, green: Upstream, tmp_path: Path, **plan: Any) -> dict[str, Any]:
    steps = plan.pop("steps", [{"weight": 10, "hold": "1s"}, {"weight": 50, "hold": "1s"}])
    hooks = plan.pop("hooks", {})
    return {
        "proxy": {"listen": f"127.0.0.1:{free_port()}"},
        "pools": pools([blue.address], [green.address]),
        "state": {"dir": str(tmp_path / "state")},
        "plans": {
            "canary": {
                "steps": [*steps, {"weight": 100, "hold": "500ms"}],
                "bake": plan.pop("bake", "500ms"),
                "judge": plan.pop("judge", FAST_JUDGE),
                **plan,
            }
        },
        "hooks": hooks,
    }


class Load:
    """New users (no cookie) sending GETs until stopped; every outcome is kept with the
    time its request was sent (which snapshot routed it)."""

    def __init__(self, url: str, path: str = "/") -> None:
        self.url = url + path
        self.outcomes: list[tuple[float, str]] = []
        self.done = asyncio.Event()

    async def client(self) -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            while not self.done.is_set() and len(self.outcomes) < 200_000:
                sent = time.time()
                try:
                    async with session.get(self.url) as resp:
                        body = await resp.read()
                        name = json.loads(body)["name"] if resp.status == 200 else str(resp.status)
                except (aiohttp.ClientError, ValueError) as exc:
                    name = f"error: {exc!r}"
                self.outcomes.append((sent, name))

    @property
    def failures(self) -> list[str]:
        return [name for _, name in self.outcomes if name not in ("blue", "green")]


@asynccontextmanager
async def load(url: str, clients: int = 4) -> AsyncIterator[Load]:
    running = Load(url)
    tasks = [asyncio.ensure_future(running.client()) for _ in range(clients)]
    try:
        yield running
    finally:
        running.done.set()
        await asyncio.gather(*tasks)


async def rollout_of(proxy: ZdProxy) -> dict[str, Any]:
    rollout: dict[str, Any] = await admin_api(proxy, "GET", "/v1/rollout")
    return rollout


async def until_rollout(
    proxy: ZdProxy, check: Callable[[dict[str, Any]], bool], within: float = 30
) -> dict[str, Any]:
    async with asyncio.timeout(within):
        while not check(rollout := await rollout_of(proxy)):  # noqa: ASYNC110 - polls the API
            await asyncio.sleep(0.05)
    return rollout


async def test_a_healthy_canary_completes_every_step_without_a_failed_request(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(rollout_config(blue, green, tmp_path))
    async with load(proxy.url) as running:
        started = await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        assert started["state"] in ("preflight", "step") and started["candidate"] == "green"
        # While it steers the split, nobody else does.
        steered = await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 0}, status=409)
        assert "holds the split" in steered["detail"]
        done = await until_rollout(proxy, lambda r: r["state"] in ("done", "rolled_back"))
    assert done["state"] == "done", done
    assert running.failures == []
    states = [(entry["state"], entry["step"]) for entry in done["history"]]
    assert states == COMPLETED
    status = await admin_api(proxy, "GET", "/v1/status")
    assert status["split"]["live"] == "green" and status["split"]["shares"]["green"] == 100
    assert all(u["drained"] for u in status["pools"]["blue"]["upstreams"])
    names = {name for _, name in running.outcomes}
    assert names == {"blue", "green"}


async def test_candidate_failing_at_step_two_is_rolled_back_before_its_weight_rises(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    failing: dict[str, int] = {}
    blue, green = await upstream("blue"), await upstream("green", failing=failing)
    config = rollout_config(blue, green, tmp_path, steps=[
        {"weight": 20, "hold": "1s"}, {"weight": 50, "hold": "30s"}
    ])  # fmt: skip
    config["retry"] = {"statuses": [500, 502, 503, 504]}  # GETs that fail go to blue
    proxy = zdproxy(config)
    async with load(proxy.url) as running:
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        await until_rollout(proxy, lambda r: r["step"] == 2)
        first_bad = time.time()
        failing["status"] = 500
        rolled = await until_rollout(proxy, lambda r: r["state"] != "step")
        target = len(running.outcomes) + 300  # blue serves alone now
        await wait_until(lambda: len(running.outcomes) >= target, within=10)
    assert rolled["state"] == "rolled_back", rolled
    assert "error rate" in rolled["reason"]
    [event] = [
        e for e in (await admin_api(proxy, "GET", "/v1/events?kind=rollout_rolled_back"))["events"]
    ]
    # How fast is a benchmark figure (benchmarks/judge_matrix.py); here, the order: the
    # rollback came after the first 500, at step 2, with the numbers that failed it.
    assert event["time"] > first_bad and event["data"]["numbers"]["phase"] == "step 2"
    assert event["data"]["numbers"]["candidate"]["errors"] > 0
    split = await admin_api(proxy, "GET", "/v1/split")
    assert split["live"] == "blue" and split["candidate_weight"] == 0
    assert running.failures == []  # every 500 was retried on blue
    after = [name for when, name in running.outcomes if when > event["time"]]
    assert after and set(after) == {"blue"}


async def test_a_candidate_three_times_slower_is_rolled_back_on_latency(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    slow: dict[str, float] = {"seconds": 0.02}
    blue = await upstream("blue", delay={"seconds": 0.02})
    green = await upstream("green", delay=slow)
    judge = {**FAST_JUDGE, "max_latency_ratio": 2.0}
    config = rollout_config(
        blue, green, tmp_path, steps=[{"weight": 50, "hold": "30s"}], judge=judge
    )
    proxy = zdproxy(config)
    async with load(proxy.url, clients=8):
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        await until_rollout(proxy, lambda r: r["state"] == "step")
        slow["seconds"] = 0.1  # p99 from ~25 ms to ~100 ms
        rolled = await until_rollout(proxy, lambda r: r["state"] != "step")
    assert rolled["state"] == "rolled_back", rolled
    assert "slower than 2x live's median" in rolled["reason"]


async def test_too_little_traffic_holds_the_step(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = rollout_config(blue, green, tmp_path, steps=[{"weight": 10, "hold": "200ms"}])
    proxy = zdproxy(config)
    await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
    await until_rollout(proxy, lambda r: r["state"] == "step")
    async with aiohttp.ClientSession() as session:  # 3 requests: far below min_requests
        for _ in range(3):
            async with session.get(proxy.url + "/") as resp:
                assert resp.status == 200
    held_since = time.monotonic()
    while time.monotonic() - held_since < 1.5:  # many judge ticks past the 200 ms hold
        rollout = await rollout_of(proxy)
        assert (rollout["state"], rollout["step"]) == ("step", 1), rollout
        await asyncio.sleep(0.1)
    assert (await admin_api(proxy, "POST", "/v1/rollout/abort"))["state"] == "aborted"
    assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == 0


async def test_a_failing_pre_rollout_hook_aborts_before_any_user_request(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    migrate = [sys.executable, "-c", "print('migration 42 failed: lock timeout'); exit(3)"]
    config = rollout_config(
        blue, green, tmp_path, pre_rollout=["migrate"], hooks={"migrate": {"command": migrate}}
    )
    proxy = zdproxy(config)
    async with load(proxy.url) as running:
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        aborted = await until_rollout(proxy, lambda r: r["state"] not in ("preflight",))
    assert aborted["state"] == "aborted"
    assert aborted["reason"] == "hook migrate failed: exit 3"
    [hook] = (await admin_api(proxy, "GET", "/v1/events?kind=hook"))["events"]
    assert hook["data"]["output"] == "migration 42 failed: lock timeout\n"
    assert green.seen == []  # not one user request reached the candidate
    assert running.failures == [] and len(running.outcomes) > 0


async def test_verify_hooks_reach_the_candidate_through_the_preview(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    """With no preview secret and no allowed network (the shipped config), the hook's
    token is signed with the rollout's own key: honoured while it runs, not after."""
    blue, green = await upstream("blue"), await upstream("green")
    seen = tmp_path / "smoke.json"
    smoke = [
        sys.executable,
        "-c",
        "import json, os, urllib.request; env = os.environ; "
        "request = urllib.request.Request('http://' + env['ZDPROXY_PROXY'] + '/smoke', "
        "headers={env['ZDPROXY_PREVIEW_HEADER']: env['ZDPROXY_PREVIEW_VALUE']}); "
        "body = json.load(urllib.request.urlopen(request, timeout=5)); "
        f"open({str(seen)!r}, 'w').write(json.dumps([body['name'], "
        "env['ZDPROXY_CANDIDATE_UPSTREAMS'], env['ZDPROXY_PREVIEW_HEADER'], "
        "env['ZDPROXY_PREVIEW_VALUE'], env['ZDPROXY_LIVE_VERSION']]))",
    ]
    config = rollout_config(
        blue, green, tmp_path, verify=["smoke"], hooks={"smoke": {"command": smoke}}
    )
    proxy = zdproxy(config)
    await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
    rollout = await until_rollout(proxy, lambda r: r["state"] != "preflight")
    assert rollout["state"] == "step", rollout
    name, upstreams, header, token, live_version = json.loads(seen.read_text())
    assert (name, upstreams) == ("green", green.address)
    assert token.startswith("green.")
    assert live_version == config["pools"]["blue"].get("version", "")
    await admin_api(proxy, "POST", "/v1/rollout/abort")
    async with (
        aiohttp.ClientSession() as session,  # the rollout's key ended with it
        session.get(proxy.url + "/smoke", headers={header: token}) as resp,
    ):
        assert (await resp.json())["name"] == "blue"


async def test_failure_during_the_bake_makes_the_warm_old_pool_live_again(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    failing: dict[str, int] = {}
    blue, green = await upstream("blue"), await upstream("green", failing=failing)
    config = rollout_config(blue, green, tmp_path, steps=[], bake="60s")
    proxy = zdproxy(config)
    async with load(proxy.url) as running:
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        await until_rollout(proxy, lambda r: r["state"] == "baking")
        assert (await admin_api(proxy, "GET", "/v1/split"))["live"] == "green"
        first_bad = time.time()
        failing["status"] = 503
        rolled = await until_rollout(proxy, lambda r: r["state"] != "baking")
        target = len(running.outcomes) + 300
        await wait_until(lambda: len(running.outcomes) >= target, within=10)
    assert rolled["state"] == "rolled_back", rolled
    [event] = (await admin_api(proxy, "GET", "/v1/events?kind=rollout_rolled_back"))["events"]
    assert event["time"] > first_bad and event["data"]["numbers"]["reference"]["frozen"]
    split = await admin_api(proxy, "GET", "/v1/split")
    assert split == {**split, "live": "blue", "candidate_weight": 0}
    after = [name for when, name in running.outcomes if when > event["time"]]
    assert after and set(after) == {"blue"}  # blue was kept warm: it answers at once
    assert not [
        u
        for u in (await admin_api(proxy, "GET", "/v1/status"))["pools"]["blue"]["upstreams"]
        if u["drained"]
    ]


async def test_kill_9_mid_rollout_resumes_with_the_same_weights(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = rollout_config(blue, green, tmp_path, steps=[
        {"weight": 10, "hold": "500ms"}, {"weight": 40, "hold": "2s"}
    ])  # fmt: skip
    proxy = zdproxy(config)
    async with load(proxy.url):
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        await until_rollout(proxy, lambda r: r["step"] == 2)
    proxy.process.kill()
    proxy.process.wait(5)

    again = zdproxy(config)
    resumed = await rollout_of(again)
    assert (resumed["state"], resumed["step"], resumed["share"]) == ("step", 2, 40.0)
    async with load(again.url) as running:
        done = await until_rollout(again, lambda r: r["state"] in ("done", "rolled_back"))
    assert done["state"] == "done", done
    assert running.failures == []
    kinds = [e["kind"] for e in (await admin_api(again, "GET", "/v1/events"))["events"]]
    assert "rollout_resumed" in kinds


async def test_rollback_wins_over_a_pause_and_is_counted(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    failing: dict[str, int] = {}
    blue, green = await upstream("blue"), await upstream("green", failing=failing)
    config = rollout_config(blue, green, tmp_path, steps=[{"weight": 30, "hold": "30s"}])
    proxy = zdproxy(config)
    async with load(proxy.url):
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        await until_rollout(proxy, lambda r: r["state"] == "step")
        assert (await admin_api(proxy, "POST", "/v1/rollout/pause"))["state"] == "paused"
        failing["status"] = 500  # paused, but still judged
        rolled = await until_rollout(proxy, lambda r: r["state"] != "paused")
    assert rolled["state"] == "rolled_back"
    async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/metrics") as r:
        metrics = await r.text()
    assert 'zdproxy_rollouts_total{result="rolled_back"} 1.0' in metrics
    assert "zdproxy_rollout_active 0.0" in metrics
    # Nothing re-promotes by itself; a retry is a command.
    await asyncio.sleep(0.3)
    assert (await rollout_of(proxy))["state"] == "rolled_back"


async def test_freeze_keeps_the_traffic_and_alerts_instead_of_rolling_back(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    failing: dict[str, int] = {}
    blue, green = await upstream("blue"), await upstream("green", failing=failing)
    steps = [{"weight": 40, "hold": "30s"}]
    proxy = zdproxy(rollout_config(blue, green, tmp_path, steps=steps, on_failure="freeze"))
    async with load(proxy.url):
        await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
        await until_rollout(proxy, lambda r: r["state"] == "step")
        failing["status"] = 500
        frozen = await until_rollout(proxy, lambda r: r["state"] != "step")
    assert frozen["state"] == "frozen" and "frozen" in frozen["reason"]
    assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == 4000  # kept
    [event] = (await admin_api(proxy, "GET", "/v1/events?kind=rollout_frozen"))["events"]
    assert event["data"]["numbers"]["candidate"]["errors"] > 0


async def test_deploy_and_wait_until_done_from_the_cli(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(rollout_config(blue, green, tmp_path, steps=[]))
    env = {"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_TOKEN": ADMIN_TOKEN}
    async with load(proxy.url):
        deployed = await run_cli("deploy", "green", env=env)
        assert deployed.code == 0, deployed.err
        assert deployed.out.startswith("rollout 1: green with plan canary:")
        waited = await run_cli("wait", "--until", "done", "--timeout", "30s", env=env)
    assert (waited.code, waited.out.strip()) == (0, "done: ok"), waited
    again = await run_cli("deploy", "green", env=env)  # green is live now
    assert again.code == 1 and "green is already live" in again.err
