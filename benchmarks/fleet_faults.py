"""Fleet mode's failures under the users' traffic (benchmarks/fleet.py's part 7).

- `quorum`: the fleet at a 10% split; 2 of the 3 etcd members stopped (SIGTERM) for
  `outage` seconds, so that etcd has no quorum while one member still answers ("no
  leader"). Measured: when each member reports etcd unavailable, that a change is
  refused meanwhile, that the state is unchanged, the time from etcd's restart until
  every member is available again on one applied revision, and the users' failures.
- `quorum_rollback`: the same outage during a rollout at its step; meanwhile the
  candidate fails on one member that did not lead, which rolls back on its own. Measured:
  that the others stay at the step while etcd is away, and the time from etcd's restart
  until every member has rolled back (the rollback wins over the rollout it ends).
- `leader_kill`: the `quick` plan deployed through a member that does not lead; at step
  2 the leader's zdproxy gets SIGKILL. Measured: the time until another member leads,
  that the rollout ends done with every step taken once, the users' failures on the
  survivors (and on the killed member, which no load balancer takes out here). The
  killed member is started again after each run.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from faulty_app import Fault
from fleet_rig import PLANS, Member, Rig, Traffic, active, rollout_of, summary

STOPPED = (1, 2)  # the etcd members stopped: 2 of 3
NOTICED_WITHIN = 20.0  # seconds for every member to report etcd unavailable
CONVERGED_WITHIN = 60.0  # seconds after etcd's restart for the fleet to agree again
LOCAL_WITHIN = 20.0  # seconds for the failing member to roll back on its own


def by_name(statuses: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["fleet"]["member"]: s for s in statuses}


def agreed(statuses: list[dict[str, Any]]) -> bool:
    """Every member reaches etcd, has written its changes and runs one revision."""
    revisions = {s["fleet"]["applied_revision"] for s in statuses}
    fleet = [s["fleet"] for s in statuses]
    return len(revisions) == 1 and all(f["available"] and not f["pending"] for f in fleet)


async def stop_etcd(rig: Rig) -> float:
    stopped = time.time()
    for index in STOPPED:
        await asyncio.to_thread(rig.cluster.stop, index)
    return stopped


def start_etcd(rig: Rig) -> float:
    restarted = time.time()
    for index in STOPPED:
        rig.cluster.start_member(index)
    return restarted


def event_after(member: Member, kind: str, since: float) -> float | None:
    event = member.feed.find(kind, since)
    return round(event["time"] - since, 3) if event is not None else None


async def quorum(rig: Rig, traffic: Traffic, outage: float) -> dict[str, Any]:
    await rig.reset()
    await rig.undrain_candidate()
    origin = rig.members[0]
    await rig.split(origin, 1000)  # both colors carry traffic: the state must hold
    before = await rig.until(
        lambda ss: agreed(ss) and all(s["split"]["candidate_weight"] == 1000 for s in ss), 10
    )
    if before is None:
        raise RuntimeError("the split did not reach every member in 10 s")
    revision = before[0]["fleet"]["applied_revision"]
    stopped = await stop_etcd(rig)
    noticed = await rig.until(
        lambda ss: not any(s["fleet"]["available"] for s in ss), NOTICED_WITHIN
    )
    refused, answer = await rig.api(origin, "PUT", "/v1/split", {"candidate_weight": 2000})
    await asyncio.sleep(max(0.0, stopped + outage - time.time()))
    during = await rig.statuses()
    restarted = start_etcd(rig)
    converged = await rig.until(agreed, CONVERGED_WITHIN)
    settled = time.time()
    after = converged or await rig.statuses()
    await rig.split(origin, 0)
    return {
        "outage_s": round(restarted - stopped, 1),
        "unavailable_reported_after_s": {
            m.name: event_after(m, "fleet_store_unavailable", stopped) for m in rig.members
        },
        "all_reported_unavailable": noticed is not None,
        "change_refused": {
            "status": refused,
            "field": (answer.get("errors") or [{}])[0].get("field")
            if isinstance(answer, dict)
            else None,
        },
        "state_unchanged_during": all(
            s["split"]["candidate_weight"] == 1000 and s["fleet"]["applied_revision"] == revision
            for s in during
        ),
        "available_again_after_s": {
            m.name: event_after(m, "fleet_store_available", restarted) for m in rig.members
        },
        "converged_after_s": round(settled - restarted, 2) if converged is not None else None,
        "applied_revisions_after": sorted({s["fleet"]["applied_revision"] for s in after}),
        "split_after": sorted({s["split"]["candidate_weight"] for s in after}),
        "failures": traffic.failures(stopped, settled),
    }


async def quorum_rollback(
    rig: Rig, traffic: Traffic, outage: float, fault: Fault
) -> dict[str, Any]:
    await rig.reset()
    statuses = await rig.statuses()
    failing = rig.follower(statuses)
    rid, color = await rig.deploy(rig.members[0], "hold")

    def at_step(ss: list[dict[str, Any]]) -> bool:
        return all(rollout_of(s)["id"] == rid and rollout_of(s)["state"] == "step" for s in ss)

    if await rig.until(at_step, 30) is None:
        await rig.api(rig.members[0], "POST", "/v1/rollout/abort")
        return {"notes": ["the rollout did not reach its step in 30 s: not measured"]}
    await asyncio.sleep(2)  # the candidate serves a while before the outage
    stopped = await stop_etcd(rig)
    await rig.until(lambda ss: not any(s["fleet"]["available"] for s in ss), NOTICED_WITHIN)
    switched = await rig.faults(fault, [failing], color)

    def local(ss: list[dict[str, Any]]) -> bool:
        return bool(rollout_of(by_name(ss)[failing.name])["state"] == "rolled_back")

    alone = await rig.until(local, LOCAL_WITHIN)
    rolled_back_locally = time.time() - switched if alone is not None else None
    await asyncio.sleep(max(0.0, stopped + outage - time.time()))
    during = by_name(await rig.statuses())
    restarted = start_etcd(rig)

    def everywhere(ss: list[dict[str, Any]]) -> bool:
        return agreed(ss) and all(rollout_of(s)["state"] == "rolled_back" for s in ss)

    converged = await rig.until(everywhere, CONVERGED_WITHIN)
    settled = time.time()
    await rig.faults(Fault.NONE, [failing], color)
    final = converged or await rig.statuses()
    return {
        "failing": failing.name,
        "outage_s": round(restarted - stopped, 1),
        "rolled_back_locally_after_s": round(rolled_back_locally, 3)
        if rolled_back_locally is not None
        else None,
        "states_at_end_of_outage": {name: rollout_of(s)["state"] for name, s in during.items()},
        "rolled_back_after_restart_s": {
            m.name: event_after(m, "rollout_rolled_back", restarted)
            for m in rig.members
            if m is not failing
        },
        "all_rolled_back_after_restart_s": round(settled - restarted, 2)
        if converged is not None
        else None,
        "states_after": {s["fleet"]["member"]: rollout_of(s)["state"] for s in final},
        "failures": traffic.failures(switched, settled),
    }


async def leader_kill(rig: Rig, traffic: Traffic, kills: int) -> dict[str, Any]:
    runs = [await one_kill(rig, traffic) for _ in range(kills)]
    taken = [r["leader_after_s"] for r in runs if r.get("leader_after_s") is not None]
    return {"kills": len(runs), "leader_after_ms": summary(taken), "runs": runs}


async def one_kill(rig: Rig, traffic: Traffic) -> dict[str, Any]:
    await rig.reset()
    leader = rig.leader(await rig.statuses())
    if leader is None:
        raise RuntimeError("the members do not agree on a leader: none to kill")
    survivors = [m for m in rig.members if m is not leader]
    rid, _ = await rig.deploy(survivors[0], "quick")

    def at_step_2(ss: list[dict[str, Any]]) -> bool:
        return all(
            rollout_of(s)["id"] == rid
            and (rollout_of(s)["state"], rollout_of(s)["step"]) == ("step", 2)
            for s in ss
        )

    if await rig.until(at_step_2, 90) is None:
        await rig.api(survivors[0], "POST", "/v1/rollout/abort")
        return {"note": "the rollout did not reach step 2 in 90 s: no kill"}
    process = leader.zd.process
    assert process is not None
    killed = time.time()
    process.kill()
    await asyncio.to_thread(process.wait)

    def replaced(ss: list[dict[str, Any]]) -> bool:
        return any(s["fleet"]["leading"] for s in ss) and rig.leader(ss) not in (None, leader)

    led = await rig.until(replaced, 30)
    seen = time.time() - killed
    new = rig.leader(led) if led is not None else None
    taken = None
    if new is not None:  # its event's time: when it took the leadership
        taken = await new.feed.wait(
            lambda e: e["kind"] == "fleet_leader" and e["time"] >= killed, 5
        )
    ended = await rig.until(
        lambda ss: all(rollout_of(s)["id"] == rid and not active(s) for s in ss), 120
    )
    end = time.time()
    _, record = await rig.api(survivors[0], "GET", f"/v1/rollouts/{rid}")
    steps = [e["step"] for e in record.get("history", []) if e["state"] == "step"]
    leader.zd.start()  # the next run has three members again
    await leader.zd.ready(rig.session)
    return {
        "killed": leader.name,
        "new_leader": new.name if new is not None else None,
        "leader_after_s": round(taken["time"] - killed, 3) if taken is not None else None,
        "leading_in_status_after_s": round(seen, 3) if led is not None else None,
        "state": record.get("state"),
        "states": [rollout_of(s)["state"] for s in ended] if ended is not None else None,
        "steps": steps,
        "each_step_once": steps == list(range(1, len(PLANS["quick"]["steps"]) + 1)),
        "done_after_kill_s": round(end - killed, 2) if ended is not None else None,
        "failures_survivors": traffic.failures(killed, end, {m.name for m in survivors}),
        "failures_killed_member": traffic.failures(killed, end, {leader.name}),
    }
