"""Control actions an operator takes around a rollout, through the CLI as a deploy script
would: an aborted rollout stays ended, ids are never reused and `wait --until done:ID`
answers for that rollout; a drain or deploy that would leave traffic nowhere is refused."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp

from tests.conftest import ADMIN_TOKEN, CliResult, Upstream, ZdProxy, admin_api, run_cli
from tests.test_rollout import load, rollout_config, until_rollout

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]
ENDS = (
    "rollout_done",
    "rollout_rolled_back",
    "rollout_aborted",
    "rollout_frozen",
    "rollout_failed",
)


async def cli(proxy: ZdProxy, *args: str) -> CliResult:
    env = {"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_TOKEN": ADMIN_TOKEN}
    return await run_cli(*args, env=env, within=60)


async def events_of(proxy: ZdProxy) -> list[dict[str, Any]]:
    answer = await admin_api(proxy, "GET", "/v1/events?limit=1000")
    events: list[dict[str, Any]] = answer["events"]
    return events


async def deployed_green(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> tuple[ZdProxy, dict[str, Any]]:
    """A proxy whose rollout 1 of green holds a 10% step for 30 s."""
    blue, green = await upstream("blue"), await upstream("green")
    steps = [{"weight": 10, "hold": "30s"}]
    config = rollout_config(blue, green, tmp_path, steps=steps)
    proxy = zdproxy(config)
    assert (await cli(proxy, "deploy", "green")).code == 0
    return proxy, config


async def test_an_aborted_rollout_never_steps_again_and_wait_answers_for_its_id(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    steps = [{"weight": 10, "hold": "60s"}]  # it never passes by itself: promote does
    proxy = zdproxy(rollout_config(blue, green, tmp_path, steps=steps, bake="1s"))
    async with load(proxy.url) as running:
        first = await cli(proxy, "deploy", "green")
        assert first.code == 0, first
        assert "rollout 1:" in first.out and "--until done:1" in first.out
        await until_rollout(proxy, lambda r: r["state"] == "step")
        aborted = await cli(proxy, "rollout", "abort")
        assert aborted.code == 0 and "aborted" in aborted.out, aborted
        second = await cli(proxy, "deploy", "green")
        assert second.code == 0 and "rollout 2:" in second.out, second
        await until_rollout(proxy, lambda r: r["state"] == "step")
        promoted = await cli(proxy, "rollout", "promote")
        assert promoted.code == 0, promoted
        done = await cli(proxy, "wait", "--until", "done:2", "--timeout", "60s")
        assert done.code == 0, done
    assert running.failures == []
    current = await admin_api(proxy, "GET", "/v1/rollout")
    assert (current["id"], current["state"]) == (2, "done"), current
    # Each rollout's own story, in order: nothing of rollout 1 after its abort (no step,
    # no promotion, no split change, no drain), and rollout 2 took the promote.
    events = await events_of(proxy)
    story = [(e["kind"], e["data"].get("rollout")) for e in events if "rollout_" in e["kind"]]
    assert story == [
        ("rollout_preflight", 1),
        ("rollout_step", 1),
        ("rollout_aborted", 1),
        ("rollout_preflight", 2),
        ("rollout_step", 2),
        ("rollout_baking", 2),
        ("rollout_finishing", 2),
        ("rollout_done", 2),
    ], story
    [end] = [i for i, e in enumerate(events) if e["kind"] in ENDS and e["data"]["rollout"] == 1]
    # Only what its end set off: the requests it had in flight moved to blue.
    late = [e for e in events[end + 1 :] if e["data"].get("rollout") == 1]
    assert [e["kind"] for e in late] in ([], ["evacuated"]), late
    failed = await cli(proxy, "wait", "--until", "done:1", "--timeout", "5s")
    assert failed.code == 5 and "rollout 1 aborted" in failed.err, failed
    show = await admin_api(proxy, "GET", "/v1/rollouts/1")
    assert show["id"] == 1 and show["state"] == "aborted"
    unknown = await cli(proxy, "wait", "--until", "done:7", "--timeout", "2s")
    assert unknown.code == 1 and "no rollout 7" in unknown.err, unknown


async def test_a_restart_keeps_ids_increasing(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    proxy, config = await deployed_green(zdproxy, upstream, tmp_path)
    assert (await cli(proxy, "rollout", "abort")).code == 0
    proxy.stop()
    again = zdproxy(config)
    restarted = await admin_api(again, "GET", "/v1/rollout")
    assert restarted["id"] == 1 and restarted["state"] == "aborted"  # never resumed
    split = await admin_api(again, "GET", "/v1/split")
    assert split["live"] == "blue" and split["candidate_weight"] == 0
    deployed = await cli(again, "deploy", "green")
    assert deployed.code == 0 and "rollout 2:" in deployed.out, deployed


async def test_while_a_rollout_holds_the_split_a_shift_is_refused_even_forced(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    proxy, _ = await deployed_green(zdproxy, upstream, tmp_path)
    await until_rollout(proxy, lambda r: r["state"] == "step")
    body = {"candidate_weight": 10000, "force": True}
    refused = await admin_api(proxy, "PUT", "/v1/split", body, status=409)
    assert "rollout 1 (green, step 1 of 2) holds the split" in refused["detail"], refused
    again = await cli(proxy, "deploy", "green")
    running = "rollout 1 (green, step 1 of 2) is running: abort it or wait for it to end"
    assert again.code == 1 and running in again.err, again
    assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == 1000


async def test_draining_the_only_routable_color_is_refused(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path, refused_address: Callable[[], str]
) -> None:
    blue = await upstream("blue")
    nothing = refused_address()  # green: connections are refused
    green: Any = SimpleNamespace(address=nothing)
    proxy = zdproxy(rollout_config(blue, green, tmp_path))
    refused = await cli(proxy, "drain", "blue")
    assert refused.code == 1 and "leaves no routable upstream" in refused.err, refused
    async with aiohttp.ClientSession() as session, session.get(proxy.url) as resp:
        assert resp.status == 200  # blue still serves
    status = await admin_api(proxy, "GET", "/v1/status")
    assert not any(u["drained"] for u in status["pools"]["blue"]["upstreams"])
    forced = await cli(proxy, "drain", "blue", "--force")
    assert forced.code == 0, forced


async def test_a_deploy_to_a_color_where_nothing_answers_is_refused(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path, refused_address: Callable[[], str]
) -> None:
    blue = await upstream("blue")
    nothing = refused_address()
    green: Any = SimpleNamespace(address=nothing)
    proxy = zdproxy(rollout_config(blue, green, tmp_path))
    refused = await cli(proxy, "deploy", "green")
    assert refused.code == 1 and "none of green's upstreams answers" in refused.err, refused
    assert (await admin_api(proxy, "GET", "/v1/rollout"))["state"] == "idle"
    assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == 0


async def test_a_reload_mid_rollout_keeps_the_rollouts_split(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    proxy, config = await deployed_green(zdproxy, upstream, tmp_path)
    await until_rollout(proxy, lambda r: r["state"] == "step")
    edited = {**config, "split": {"live": "green", "candidate_weight": 5000}}
    edited["upstream"] = {"timeout": "7s"}
    assert await proxy.reload(edited)
    split = await admin_api(proxy, "GET", "/v1/split")
    assert split["live"] == "blue" and split["candidate_weight"] == 1000, split
    held = [e for e in await events_of(proxy) if e["kind"] == "config_held"]
    assert held and held[0]["data"]["item"] == "split"
    assert (await admin_api(proxy, "GET", "/v1/rollout"))["state"] == "step"
