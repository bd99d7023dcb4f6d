"""Fleet mode measured as users run it: 3 zdproxy members on a real 3-member etcd cluster.

    .venv/bin/python benchmarks/fleet.py [--only PART,...] [--runs 10] [--changes 30]

The fleet (fleet_rig.py): etcd from tests/etcd_cluster.py, and for each member its own
blue and green apps (faulty_app.py) and `zdproxy run` with `[fleet]` at its defaults;
sticky users (sticky_users.py, `--users` in all, a group per member) send `--rate`
requests per second for the whole run. The parts, in this order:

- propagation (fleet_shared.py): a split change through member 2, until members 1 and 3
  applied it. Goal: median at most 200 ms.
- stickiness (fleet_shared.py): 1,000 users on random members through a 10/50/100%
  ramp: the colors each saw. Goal: none sees both colors at one split, none flips back.
- load (fleet_rollouts.py): etcd's writes, requests and bytes, the fleet settled.
- reaction-all (fleet_rollouts.py): the candidate failing on every member at a step,
  until no request reaches it. Goal: median at most 1 s.
- reaction-one: the same, failing on one member that does not lead. Goal: within 1 s.
- reaction-leader (only with --only): the same, failing on the leader only (whose judge
  reads the whole fleet's records, not its own slice).
- rollout (fleet_rollouts.py): a rollout to done: its duration, the users' failures
  (goal: none) and etcd's load while it runs.
- quorum (fleet_faults.py): etcd without quorum for `--outage` seconds; then the same
  during a rollout, rolled back meanwhile. Goal: no failure, the rollback wins.
- leader (fleet_faults.py): the leader killed (SIGKILL) mid-rollout, `--kills` times.
  Goal: another member leads, every step is taken once.

The load of a fleet of `--estimate-members` is worked out from `load` and `rollout`.
A part that cannot be measured (an error) is reported as such; the others still run.
A table goes to stdout, everything to `--output` (benchmarks/results/fleet-DATE.json).
Every process started is stopped at the end, on an error, on Ctrl-C or SIGTERM (the
apps and zdproxy also die with this script; etcd is stopped by its cluster's close).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import ClientSession
from faulty_app import Fault
from fleet_faults import leader_kill, quorum, quorum_rollback
from fleet_rig import REPO, Rig, Traffic
from fleet_rollouts import Failing, estimate, load, reaction, rollout
from fleet_shared import HOW_STICKY, propagation, stickiness

PARTS = (
    "propagation",
    "stickiness",
    "load",
    "reaction-all",
    "reaction-one",
    "reaction-leader",
    "rollout",
    "quorum",
    "leader",
)
# reaction-leader runs only when asked (--only): the brief's parts fit in about 15 minutes.
DEFAULT_PARTS = tuple(part for part in PARTS if part != "reaction-leader")
TRAFFIC_BOUND = 3 * 3600.0  # seconds: the users stop by themselves past it, whatever happens
ETCD_GUIDANCE = (
    "etcd's documentation, Operations guide, 'Hardware recommendations', 'Example hardware "
    "configurations': a small cluster serves fewer than 100 clients, fewer than 200 of "
    "requests per second, and stores no more than 100MB of data; a medium cluster fewer "
    "than 500 clients, fewer than 1,000 of requests per second, no more than 500MB; a "
    "large one fewer than 1,500 clients, fewer than 10,000 requests per second, no more "
    "than 1GB."
)


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    faults = [Fault(name) for name in args.faults.split(",")]
    results: dict[str, Any] = {}
    async with ClientSession() as session:
        rig = Rig(tmp, session, seed=args.seed)
        traffic: Traffic | None = None
        try:
            began = time.monotonic()
            await rig.start()
            results["fleet_started_s"] = round(time.monotonic() - began, 2)
            traffic = Traffic(
                rig, args.users // len(rig.members), args.rate, args.seed, TRAFFIC_BOUND
            )
            traffic.start()
            live = traffic  # for the closures below: started, never None

            parts: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
                "propagation": lambda: propagation(rig, args.changes, args.seed),
                "stickiness": lambda: stickiness(
                    rig, args.sticky_users, args.sticky_requests, args.phase, args.seed
                ),
                "load": lambda: load(rig, args.rest),
                "reaction-all": lambda: each_fault(rig, live, args, faults, Failing.EVERY),
                "reaction-one": lambda: each_fault(rig, live, args, faults, Failing.FOLLOWER),
                "reaction-leader": lambda: each_fault(rig, live, args, faults, Failing.LEADER),
                "rollout": lambda: rollout(rig, live),
                "quorum": lambda: both_outages(rig, live, args, faults[0]),
                "leader": lambda: leader_kill(rig, live, args.kills),
            }
            for name in PARTS:
                if name in args.only:
                    print(f"-- {name}", flush=True)
                    began = time.monotonic()
                    results[name] = await attempt(parts[name]())
                    results[name]["took_s"] = round(time.monotonic() - began, 1)
            results["users"] = traffic.failures(0, time.time())
        finally:
            if traffic is not None:
                await traffic.stop()
            await rig.close()
    windows = {}  # the measured load, where it was measured
    if "error" not in results.get("load", {"error": ""}):
        windows["rest"] = results["load"]
    if "error" not in results.get("rollout", {"error": ""}):
        windows["rollout"] = results["rollout"]["load"]
    if windows:
        results["estimate"] = estimate(windows, args.estimate_members, len(rig.members))
    return results


async def each_fault(
    rig: Rig, traffic: Traffic, args: argparse.Namespace, faults: list[Fault], where: Failing
) -> dict[str, Any]:
    return {str(f): await reaction(rig, traffic, args.runs, f, where, args.healthy) for f in faults}


async def both_outages(
    rig: Rig, traffic: Traffic, args: argparse.Namespace, fault: Fault
) -> dict[str, Any]:
    return {
        "settled": await attempt(quorum(rig, traffic, args.outage)),
        "rollback_meanwhile": await attempt(quorum_rollback(rig, traffic, args.outage, fault)),
    }


async def attempt(measurement: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """A measurement's result, or the error that stopped it (the others still run)."""
    try:
        return await measurement
    except Exception as exc:
        traceback.print_exc()
        return {"error": repr(exc)}


# -- the table ---------------------------------------------------------------------------


def ms(stats: dict[str, Any]) -> str:
    if not stats.get("n"):
        return "no samples"
    return (
        f"median {stats['median']:.0f} ms, p95 {stats['p95']:.0f}, max {stats['max']:.0f} "
        f"(n={stats['n']})"
    )


def verdict(part: dict[str, Any]) -> str:
    return "goal met" if part.get("met") else "GOAL MISSED"


def row(label: str, text: object) -> None:
    print(f"  {label:<36} {text}")


def report(results: dict[str, Any]) -> None:
    printers: dict[str, Callable[[str, dict[str, Any]], None]] = {
        "propagation": propagation_rows,
        "stickiness": stickiness_rows,
        "reaction-all": reactions_rows,
        "reaction-one": reactions_rows,
        "reaction-leader": reactions_rows,
        "rollout": rollout_rows,
        "quorum": quorum_rows,
        "leader": leader_rows,
    }
    print()
    for name in PARTS:
        if (part := results.get(name)) is None:
            continue
        if "error" in part:
            print(f"{name}: NOT MEASURED, {part['error']}")
        elif name in printers:
            printers[name](name, part)
    load_rows(results.get("estimate", {}))
    print(f"users over the whole run (a killed member's included): {results.get('users')}")


def propagation_rows(name: str, p: dict[str, Any]) -> None:
    print(f"{name}, {p['changes']} changes through {p['through']}: {verdict(p)}")
    row("every member applied", ms(p["all_members_ms"]))
    row("each member applied", f"{ms(p['each_member_ms'])}; missed {p['missed']}")
    row("the PUT answered", ms(p["put_answered_ms"]))


def stickiness_rows(name: str, s: dict[str, Any]) -> None:
    print(f"{name}, {s['users']} users, {s['requests']} requests: {verdict(s)}")
    for phase in s["candidate_share_by_phase"]:
        row(f"at {phase['weight']:g}%: to the candidate", f"{phase['to_candidate_percent']}%")
    row("users with both colors at one split", s["users_both_colors_at_one_split"])
    row("users moved once to the candidate", s["users_moved_once_to_candidate"])
    row("  of them while a change was on its way", s["users_moved_across_a_change_in_transit"])
    row("users flipped back", s["users_flipped_back_to_live"])
    row("failed requests", s["failed"])


def reactions_rows(name: str, by_fault: dict[str, Any]) -> None:
    for fault, r in by_fault.items():
        if fault == "took_s":
            continue
        print(f"{name}, {r['fault']} on {r['failing']}, {r['runs']} runs: {verdict(r)}")
        row("runs rolled back on every member", r["rolled_back_everywhere"])
        row("no request reaches the candidate", ms(r["last_candidate_request_ms"]))
        row("every member rolled back (events)", ms(r["all_rolled_back_ms"]))
        row("  the deciding member's judge", ms(r["judge_decided_ms"]))
        row("  from its rollback to every member", ms(r["decision_to_every_member_ms"]))
        row("first bad answer after the switch", ms(r["detected_ms"]))
        f = r["failures_per_run"]
        row("users' failures per run", f"median {f['median']}, max {f['max']}")
        for note in r["notes"]:
            row("note", note)


def rollout_rows(name: str, r: dict[str, Any]) -> None:
    print(f"{name} to done: {r['states']}")
    row("duration", f"{r['duration_s']} s (holds and bake: {r['nominal_s']:g} s)")
    row("steps (state, step, s after the deploy)", r["history"])
    row("users' failures", f"{r['failures']['failed']} of {r['failures']['requests']}")


def leader_rows(name: str, k: dict[str, Any]) -> None:
    print(f"{name} killed {k['kills']} times")
    row("another member leads", ms(k["leader_after_ms"]))
    for run in k["runs"]:
        row(f"{run.get('killed')} killed", leader_run(run))


def load_rows(estimate: dict[str, Any]) -> None:
    for window in ("rest", "rollout"):
        if not (e := estimate.get(window)):
            continue
        print(f"etcd load, {window}")
        row("writes/s per member", f"{e['writes_per_s_per_member']} of {e['bytes_per_write']} B")
        row("requests/s per member", e["requests_per_s_per_member"])
        row("watch deliveries per write", e["measured_deliveries_per_write"])
        row(
            f"for {estimate['members']} members",
            f"{e['writes_per_s']} writes/s, {e['requests_per_s']} requests/s, "
            f"{e['watch_deliveries_per_s']} deliveries/s ({e['watch_bytes_per_s'] / 1e6:.2f} MB/s)",
        )


def quorum_rows(name: str, both: dict[str, Any]) -> None:
    settled, meanwhile = both["settled"], both["rollback_meanwhile"]
    if "error" in settled:
        print(f"{name}, settled: NOT MEASURED, {settled['error']}")
    else:
        print(f"{name}: etcd without quorum for {settled['outage_s']} s")
        row("members said unavailable after (s)", settled["unavailable_reported_after_s"])
        row("a change meanwhile", settled["change_refused"])
        row("state unchanged", settled["state_unchanged_during"])
        row("one revision again after restart (s)", settled["converged_after_s"])
        failed = settled["failures"]
        row("users' failures", f"{failed['failed']} of {failed['requests']}")
    if "error" in meanwhile:
        print(f"{name}, rollback meanwhile: NOT MEASURED, {meanwhile['error']}")
        return
    print(f"{name}: the same during a rollout, the candidate failing on {meanwhile.get('failing')}")
    row("rolled back there, alone, after (s)", meanwhile.get("rolled_back_locally_after_s"))
    row("states at the end of the outage", meanwhile.get("states_at_end_of_outage"))
    row("every member rolled back after (s)", meanwhile.get("all_rolled_back_after_restart_s"))
    failed = meanwhile.get("failures", {})
    row("users' failures", f"{failed.get('failed')} of {failed.get('requests')}")


def leader_run(run: dict[str, Any]) -> str:
    if "note" in run:
        return str(run["note"])
    survivors, killed = run["failures_survivors"], run["failures_killed_member"]
    return (
        f"{run['new_leader']} leads after {run['leader_after_s']} s; {run['state']}, steps "
        f"{run['steps']}, {run['done_after_kill_s']} s after the kill; failures: survivors "
        f"{survivors['failed']} of {survivors['requests']}, killed member {killed['failed']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", default=",".join(DEFAULT_PARTS), help="comma list of " + ", ".join(PARTS)
    )
    parser.add_argument(
        "--users", type=int, default=90, help="sticky users, spread over the members"
    )
    parser.add_argument("--rate", type=float, default=180, help="their requests per second, in all")
    parser.add_argument("--changes", type=int, default=30, help="propagation: split changes")
    parser.add_argument("--sticky-users", type=int, default=1000, help="stickiness: users")
    parser.add_argument(
        "--sticky-requests", type=int, default=5, help="stickiness: requests per user"
    )
    parser.add_argument("--phase", type=float, default=8.0, help="stickiness: seconds per split")
    parser.add_argument("--rest", type=float, default=30.0, help="load: seconds measured")
    parser.add_argument("--runs", type=int, default=10, help="reaction: runs per fault")
    parser.add_argument(
        "--faults", default="errors30,hang", help="reaction: faulty_app faults, comma list"
    )
    parser.add_argument(
        "--healthy", type=float, default=2.0, help="reaction: seconds at the step before the fault"
    )
    parser.add_argument("--outage", type=float, default=10.0, help="quorum: seconds without quorum")
    parser.add_argument("--kills", type=int, default=3, help="leader: kills")
    parser.add_argument("--estimate-members", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    parser.add_argument(
        "--output", type=Path, default=REPO / f"benchmarks/results/fleet-{day}.json"
    )
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    if unknown := args.only - set(PARTS):
        parser.error(f"no part {', '.join(sorted(unknown))}")

    async def run() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
            return await measure(args, Path(tmp))

    began = time.time()
    load_before = os.getloadavg()
    try:
        results = asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: every process started was stopped", file=sys.stderr)
        sys.exit(130)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    results["took_s"] = round(time.time() - began, 1)
    results["notes"] = {
        "stickiness": HOW_STICKY,
        "etcd_guidance": ETCD_GUIDANCE,
    }
    results["args"] = {
        k: sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
    }
    report(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
