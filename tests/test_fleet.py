"""Fleet mode end to end: three `zdproxy run` processes, each with its own blue and
green apps, sharing their state through a real 3-member etcd cluster.

A change through one member is applied by the others; a rollout started on one runs
on all, and a candidate failing on one member only is rolled back on every member; a
leader killed mid-rollout is replaced and the rollout goes on from its step; while
etcd is gone the members serve on and refuse changes, and take them again after."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import Upstream, ZdProxy, admin_api, wait_until
from tests.etcd_cluster import EtcdCluster
from tests.test_rollout import COMPLETED, load, rollout_config, until_rollout

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]
# The tests take etcd_cluster first: fixtures end in reverse order, so the members stop
# while etcd still answers (each leaves at once, revoking its lease).


@dataclass
class Member:
    proxy: ZdProxy
    blue: Upstream
    green: Upstream
    failing: dict[str, int]


async def start_fleet(
    zdproxy: StartProxy,
    upstream: StartUpstream,
    etcd: EtcdCluster,
    tmp_path: Path,
    size: int = 3,
    **plan: Any,
) -> list[Member]:
    members = []
    for index in range(1, size + 1):
        failing: dict[str, int] = {}
        blue, green = await upstream("blue"), await upstream("green", failing=failing)
        config = rollout_config(blue, green, tmp_path / f"m{index}", **dict(plan))
        config["fleet"] = {
            "endpoints": etcd.client_urls,
            "name": f"m{index}",
            "lease_ttl": 2,
            "publish_interval": "200ms",
        }
        # Every failed GET goes to blue: the tests count the users' failures as zero.
        config["retry"] = {"statuses": [500, 502, 503, 504], "budget_percent": 100}
        members.append(Member(zdproxy(config), blue, green, failing))
    return members


async def status_of(member: Member) -> dict[str, Any]:
    status: dict[str, Any] = await admin_api(member.proxy, "GET", "/v1/status")
    return status


async def until_all(
    members: list[Member], check: Callable[[dict[str, Any]], bool], within: float = 10
) -> list[dict[str, Any]]:
    """Poll every member's status until `check` holds on each."""
    async with asyncio.timeout(within):
        while True:
            statuses = [await status_of(m) for m in members]
            if all(check(s) for s in statuses):
                return statuses
            await asyncio.sleep(0.05)


async def test_a_change_through_one_member_is_applied_by_every_member(
    etcd_cluster: EtcdCluster, zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    members = await start_fleet(zdproxy, upstream, etcd_cluster, tmp_path)
    first = await until_all(members, lambda s: s["fleet"]["leader"] != "")
    assert len({s["split"]["salt_id"] for s in first}) == 1  # one salt: one bucket per user
    await admin_api(members[1].proxy, "PUT", "/v1/split", {"candidate_weight": 2500})
    statuses = await until_all(members, lambda s: s["split"]["candidate_weight"] == 2500)
    revisions = {s["fleet"]["applied_revision"] for s in statuses}
    assert len(revisions) == 1 and revisions != {0}
    # Member 1 says who made the change.
    events = await admin_api(members[0].proxy, "GET", "/v1/events?kind=fleet_applied")
    assert any(e["by"] == "member m2" for e in events["events"]), events
    fleet = await admin_api(members[2].proxy, "GET", "/v1/fleet")
    assert [m["name"] for m in fleet["members"]] == ["m1", "m2", "m3"]
    assert sum(m["leading"] for m in fleet["members"]) <= 1
    assert all(m["share"]["green"] == 25 for m in fleet["members"]), fleet


async def test_a_rollout_started_on_one_member_completes_on_every_member(
    etcd_cluster: EtcdCluster, zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    members = await start_fleet(zdproxy, upstream, etcd_cluster, tmp_path)
    await until_all(members, lambda s: s["fleet"]["leader"] != "")
    async with load(members[0].proxy.url) as one, load(members[2].proxy.url) as three:
        await admin_api(members[2].proxy, "POST", "/v1/rollouts", {"color": "green"})
        done = [
            await until_rollout(m.proxy, lambda r: r["state"] in ("done", "rolled_back"))
            for m in members
        ]
    assert [r["state"] for r in done] == ["done"] * 3, done
    assert one.failures == [] and three.failures == []
    assert [(e["state"], e["step"]) for e in done[0]["history"]] == COMPLETED
    # Every member drained its own old color.
    statuses = await until_all(
        members,
        lambda s: all(u["drained"] for u in s["pools"]["blue"]["upstreams"]),
    )
    assert all(s["split"]["live"] == "green" for s in statuses)


async def test_a_candidate_failing_on_one_member_is_rolled_back_on_every_member(
    etcd_cluster: EtcdCluster, zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    steps = [{"weight": 50, "hold": "30s"}]
    members = await start_fleet(zdproxy, upstream, etcd_cluster, tmp_path, steps=steps)
    statuses = await until_all(members, lambda s: s["fleet"]["leader"] != "")
    # The failing member is not the leader: its own judge rolls the fleet back.
    follower = next(i for i, s in enumerate(statuses) if not s["fleet"]["leading"])
    async with load(members[follower].proxy.url) as running:
        await admin_api(members[0].proxy, "POST", "/v1/rollouts", {"color": "green"})
        await until_all(members, lambda s: s["rollout"]["state"] == "step")
        members[follower].failing["status"] = 500
        ended = [
            await until_rollout(m.proxy, lambda r: r["state"] != "step", within=15) for m in members
        ]
    assert [r["state"] for r in ended] == ["rolled_back"] * 3, ended
    statuses = await until_all(members, lambda s: s["split"]["candidate_weight"] == 0)
    assert all(s["split"]["live"] == "blue" for s in statuses)
    assert running.failures == []
    events = await admin_api(members[0].proxy, "GET", "/v1/events?kind=rollout_rolled_back")
    assert events["events"][-1]["by"] == f"member m{follower + 1}", events


async def test_the_leader_killed_mid_rollout_is_replaced_and_the_rollout_goes_on(
    etcd_cluster: EtcdCluster, zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    steps = [{"weight": 10, "hold": "1s"}, {"weight": 50, "hold": "2s"}]
    members = await start_fleet(zdproxy, upstream, etcd_cluster, tmp_path, steps=steps)
    statuses = await until_all(members, lambda s: s["fleet"]["leader"] != "")
    leader = next(i for i, s in enumerate(statuses) if s["fleet"]["leading"])
    others = [m for i, m in enumerate(members) if i != leader]
    async with load(others[0].proxy.url) as one, load(others[1].proxy.url) as two:
        await admin_api(others[0].proxy, "POST", "/v1/rollouts", {"color": "green"})
        await until_rollout(others[0].proxy, lambda r: r["state"] == "step" and r["step"] == 2)
        members[leader].proxy.process.send_signal(signal.SIGKILL)
        members[leader].proxy.process.wait()
        done = await until_rollout(
            others[1].proxy, lambda r: r["state"] in ("done", "rolled_back"), within=20
        )
    assert one.failures == [] and two.failures == []
    assert done["state"] == "done", done
    steps_seen = [e["step"] for e in done["history"] if e["state"] == "step"]
    assert steps_seen == [1, 2, 3], done["history"]  # none repeated, none skipped
    statuses = await until_all(others, lambda s: s["fleet"]["leader"] != f"m{leader + 1}")
    assert sum(s["fleet"]["leading"] for s in statuses) == 1


async def test_without_etcd_members_serve_on_refuse_changes_and_take_them_again_after(
    etcd_cluster: EtcdCluster, zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    members = await start_fleet(zdproxy, upstream, etcd_cluster, tmp_path, size=2)
    await until_all(members, lambda s: s["fleet"]["leader"] != "")
    await admin_api(members[0].proxy, "PUT", "/v1/split", {"candidate_weight": 1000})
    await until_all(members, lambda s: s["split"]["candidate_weight"] == 1000)
    async with load(members[1].proxy.url) as running:
        for index in range(3):
            etcd_cluster.stop(index)
        await until_all(members, lambda s: not s["fleet"]["available"], within=15)
        refused = await admin_api(
            members[1].proxy, "PUT", "/v1/split", {"candidate_weight": 0}, status=503
        )
        assert refused["errors"][0]["field"] == "fleet" and "etcd" in refused["detail"]
        served = len(running.outcomes)
        await wait_until(lambda: len(running.outcomes) > served + 50)
        for index in range(3):
            etcd_cluster.start_member(index)
        await until_all(members, lambda s: s["fleet"]["available"], within=20)
    assert running.failures == []
    await admin_api(members[1].proxy, "PUT", "/v1/split", {"candidate_weight": 0})
    await until_all(members, lambda s: s["split"]["candidate_weight"] == 0)
