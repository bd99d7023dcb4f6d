"""Fleet rollouts under the users' traffic (benchmarks/fleet.py's parts 2, 3, 4 and 6).

- `reaction`: a rollout of the color that is not live, with the `hold` plan (one step at
  20% for an hour); once every member is at the step and the candidate has served
  `healthy` seconds, the candidate's app of every member (or of one member that does not
  lead) switches to a fault. Measured from the first bad answer (its departure; the
  arrival of the first hung request for `hang`) to the last request that reached the
  candidate's app on any member, and to the last member's `rollout_rolled_back` event.
- `rollout`: a rollout to done with the `canary` plan: its duration and the users'
  failures, and the etcd load while it runs.
- `load`: the etcd load of a settled fleet (no rollout) over a window; `estimate`
  scales both to a larger fleet.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from faulty_app import Fault
from fleet_rig import ACTIVE, PLANS, Member, Rig, Traffic, active, rollout_of, summary

SETTLE = 1.5  # seconds of traffic after the rollback: any request still reaching the candidate
ENDED_WITHIN = 30.0  # seconds for a rollback after the fault; past it the run says so
ENDS = ("rolled_back", "aborted", "failed", "frozen", "done")


class Failing(StrEnum):
    """Where the candidate fails."""

    EVERY = "every member"
    FOLLOWER = "one member that does not lead"
    LEADER = "the leader only"


@dataclass
class ReactionRun:
    """One run: times in seconds after the first bad answer, unless said otherwise."""

    failing: list[str]  # the members whose candidate app failed
    leader: str
    decided_by: str  # the member whose own judge rolled back
    states: dict[str, str]  # each member's rollout state at the end
    detected: float | None  # first bad answer, after the fault's switch
    last_request: float | None  # the last arrival at the candidate on any member
    rolled_back: dict[str, float]  # each member's rollout_rolled_back event
    requests_after_bad: int  # arrivals at the candidate, every member, after the first bad answer
    failures: dict[str, int]  # the users', from the switch to SETTLE after the end
    # Users the candidate served on each member before the fault: a hang blocks each of
    # them (a user waits for its answer), so they bound the failures a judge can see.
    candidate_users: dict[str, int]

    @property
    def all_rolled_back(self) -> float | None:
        return max(self.rolled_back.values()) if self.rolled_back else None

    @property
    def decided(self) -> float | None:
        """When the deciding member's judge rolled back: the judge's share of the time."""
        return self.rolled_back.get(self.decided_by)

    @property
    def spread(self) -> float | None:
        """From that decision to the last member's rollback: fleet mode's share."""
        if self.decided is None or self.all_rolled_back is None:
            return None
        return self.all_rolled_back - self.decided


async def reaction(
    rig: Rig, traffic: Traffic, runs: int, fault: Fault, where: Failing, healthy: float
) -> dict[str, Any]:
    done: list[ReactionRun] = []
    notes: list[str] = []
    for run in range(runs):
        await rig.reset()
        statuses = await rig.statuses()
        leader = rig.leader(statuses)
        if where is Failing.EVERY or leader is None:
            failing = list(rig.members)
        else:
            failing = [leader if where is Failing.LEADER else rig.follower(statuses)]
        origin = rig.members[run % len(rig.members)]  # each member takes deploys in turn
        rid, color = await rig.deploy(origin, "hold")

        def at_step(ss: list[dict[str, Any]], rid: int = rid) -> bool:
            return all(rollout_of(s)["id"] == rid and rollout_of(s)["state"] == "step" for s in ss)

        if await rig.until(at_step, 30) is None:
            notes.append(f"run {run + 1}: not at its step 30 s after the deploy: skipped")
            await rig.api(origin, "POST", "/v1/rollout/abort")
            continue
        served_from = time.time()
        await asyncio.sleep(healthy)
        if await rig.until(at_step, 1) is None:
            _, left = await rig.api(origin, "GET", f"/v1/rollouts/{rid}")
            notes.append(
                f"run {run + 1}: {left['state']} before its fault ({left['reason']}): skipped"
            )
            continue
        switched = await rig.faults(fault, failing, color)
        ended = await rig.until(lambda ss: not any(active(s) for s in ss), ENDED_WITHIN)
        if ended is None:
            notes.append(f"run {run + 1}: still at its step {ENDED_WITHIN:g} s after the fault")
            await rig.api(origin, "POST", "/v1/rollout/abort")
        await asyncio.sleep(SETTLE)
        end = time.time()
        await rig.faults(Fault.NONE, failing, color)
        await rig.reset()  # every request sent until `end` has its answer: failures count
        window = (served_from, switched, end)
        done.append(measure_reaction(rig, traffic, failing, leader, rid, color, window))
    return summarize_reaction(done, fault, where, notes)


def measure_reaction(
    rig: Rig,
    traffic: Traffic,
    failing: list[Member],
    leader: Member | None,
    rid: int,
    color: str,
    window: tuple[float, float, float],
) -> ReactionRun:
    """`window`: when the candidate began to serve at its step, the fault's switch, and
    the end of the run."""
    served_from, switched, end = window
    bad = [r for m in failing for r in m.records(color, switched) if r.bad]
    first_bad = min((r.departure or r.arrival for r in bad), default=None)
    arrivals = [r.arrival for m in rig.members for r in m.records(color, switched)]
    rolled_back: dict[str, float] = {}
    states: dict[str, str] = {}
    decided_by = ""
    for member in rig.members:
        for state in ENDS:
            event = member.feed.find(f"rollout_{state}", switched - 60, rid)
            if event is not None:
                states[member.name] = state
                if state == "rolled_back" and first_bad is not None:
                    rolled_back[member.name] = event["time"] - first_bad
                if event["actor"] == "auto":
                    decided_by = member.name
                break
    return ReactionRun(
        failing=[m.name for m in failing],
        leader=leader.name if leader is not None else "",
        decided_by=decided_by,
        states=states,
        detected=first_bad - switched if first_bad is not None else None,
        last_request=max(arrivals) - first_bad if first_bad is not None else None,
        rolled_back=rolled_back,
        requests_after_bad=sum(a > first_bad for a in arrivals) if first_bad is not None else 0,
        failures=traffic.failures(switched, end),
        candidate_users=traffic.users_of(color, served_from, switched),
    )


def summarize_reaction(
    runs: list[ReactionRun], fault: Fault, where: Failing, notes: list[str]
) -> dict[str, Any]:
    complete = [r for r in runs if r.last_request is not None and r.all_rolled_back is not None]
    incomplete = len(runs) - len(complete)
    if incomplete:
        notes.append(f"{incomplete} runs without a bad answer or a rollback on every member")
    last = [r.last_request for r in complete if r.last_request is not None]
    events = [r.all_rolled_back for r in complete if r.all_rolled_back is not None]
    spreads = [r.spread for r in complete if r.spread is not None]
    failed = [r.failures["failed"] for r in runs]
    return {
        "fault": str(fault),
        "failing": str(where),
        "runs": len(runs),
        "rolled_back_everywhere": len(complete),
        "detected_ms": summary([r.detected for r in runs if r.detected is not None]),
        "last_candidate_request_ms": summary(last),
        "all_rolled_back_ms": summary(events),
        "judge_decided_ms": summary([r.decided for r in complete if r.decided is not None]),
        "decision_to_every_member_ms": summary(spreads),
        "failures_per_run": {
            "median": statistics.median(failed) if failed else 0,
            "max": max(failed, default=0),
            "total": sum(failed),
        },
        "requests_per_run": sum(r.failures["requests"] for r in runs) // max(len(runs), 1),
        "decided_by_failing_member": sum(r.decided_by in r.failing for r in runs),
        "goal": "median of last_candidate_request at most 1000 ms",
        "met": bool(last) and summary(last)["median"] <= 1000,
        "details": [
            asdict(r) | {"all_rolled_back": r.all_rolled_back, "spread": r.spread} for r in runs
        ],
        "notes": notes,
    }


# -- a rollout to done, and the etcd load -------------------------------------------------


async def counters(rig: Rig) -> dict[str, Any]:
    """Each member's writes to etcd and their bytes (status fleet), and etcd's counters."""
    statuses = await rig.statuses()
    members = {
        s["fleet"]["member"]: (s["fleet"]["writes"], s["fleet"]["bytes_written"]) for s in statuses
    }
    return {"t": time.time(), "members": members, "etcd": await rig.etcd_metrics()}


def rates(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What changed between two `counters`, per second."""
    seconds = after["t"] - before["t"]
    members = {}
    for name, (writes, written) in after["members"].items():
        writes0, written0 = before["members"].get(name, (0, 0))
        members[name] = {
            "writes_per_s": round((writes - writes0) / seconds, 2),
            "bytes_per_s": round((written - written0) / seconds, 1),
            "bytes_per_write": round((written - written0) / max(writes - writes0, 1)),
        }
    etcd = {
        name: round((after["etcd"][name] - before["etcd"][name]) / seconds, 2)
        for name in after["etcd"]
    }
    # etcd keeps every revision until it is compacted (off by default): the file grows.
    etcd["db_size_bytes"] = after["etcd"]["etcd_mvcc_db_total_size_in_bytes"]
    return {"seconds": round(seconds, 1), "members": members, "etcd": etcd}


async def load(rig: Rig, seconds: float) -> dict[str, Any]:
    """The etcd load of the settled fleet under the users' traffic, over `seconds`."""
    await rig.reset()
    before = await counters(rig)
    await asyncio.sleep(seconds)
    return rates(before, await counters(rig))


async def rollout(rig: Rig, traffic: Traffic) -> dict[str, Any]:
    await rig.reset()
    plan = PLANS["canary"]
    nominal = sum(float(s["hold"].removesuffix("s")) for s in plan["steps"]) + float(
        plan["bake"].removesuffix("s")
    )
    before = await counters(rig)
    origin = rig.members[0]
    started = time.time()
    rid, color = await rig.deploy(origin, "canary")
    bound = nominal + 180  # a step passes once the judge has the evidence: give it time

    def over(ss: list[dict[str, Any]]) -> bool:
        return all(rollout_of(s)["id"] == rid and rollout_of(s)["state"] not in ACTIVE for s in ss)

    ended = await rig.until(over, bound)
    after = await counters(rig)
    notes = [] if ended is not None else [f"not over {bound:g} s after the deploy"]
    finished = {}
    for member in rig.members:
        event = member.feed.find("rollout_done", started, rid)
        if event is not None:
            finished[member.name] = round(event["time"] - started, 2)
    _, last = await rig.api(origin, "GET", f"/v1/rollouts/{rid}")
    history = [
        (e["state"], e["step"], round(e["time"] - started, 2)) for e in last.get("history", [])
    ]
    return {
        "candidate": color,
        "plan": plan,
        "nominal_s": nominal,
        "states": [rollout_of(s)["state"] for s in ended or await rig.statuses()],
        "done_after_s": finished,
        "duration_s": max(finished.values(), default=None),
        "history": history,
        "failures": traffic.failures(started, after["t"]),
        "load": rates(before, after),
        "notes": notes,
    }


def estimate(windows: dict[str, dict[str, Any]], members: int, measured: int) -> dict[str, Any]:
    """The measured load scaled to `members`. A member's own writes (its state every
    publish_interval, its records every telemetry_interval during a rollout) and its
    requests (those writes, lease keepalives) grow with the members; every write under
    the prefix is delivered to every member's watch, so deliveries grow with the square.
    The delivered bytes count the values only (keys and etcd's framing add some)."""
    out: dict[str, Any] = {"members": members}
    for name, window in windows.items():
        etcd = window["etcd"]
        writes = sum(m["writes_per_s"] for m in window["members"].values()) / measured
        written = sum(m["bytes_per_s"] for m in window["members"].values()) / measured
        requests = etcd["grpc_server_msg_received_total"] / measured
        deliveries = writes * members * members
        out[name] = {
            "measured_deliveries_per_write": round(
                etcd["etcd_debugging_mvcc_events_total"] / max(etcd["etcd_mvcc_put_total"], 1e-9), 2
            ),
            "writes_per_s_per_member": round(writes, 2),
            "bytes_per_write": round(written / max(writes, 1e-9)),
            "requests_per_s_per_member": round(requests, 2),
            "writes_per_s": round(writes * members, 1),
            "requests_per_s": round(requests * members, 1),
            "watch_deliveries_per_s": round(deliveries),
            "watch_bytes_per_s": round(written * members * members),
        }
    return out
