"""How the CLI shows the admin API's answers to a person."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

# The states of a rollout that runs: the judge's hold and ETA mean something.
ACTIVE = ("preflight", "step", "paused", "baking", "finishing")
# What each test of the judge counts: its observed share of the candidate's requests
# (errors_by_color: of both colors' errors).
TESTS = {
    "errors": "error rate",
    "errors_vs_live": "error rate against live's",
    "errors_by_color": "candidate's share of both colors' errors",
    "p50_vs_live": "slower than the ratio x live's median",
    "p99_vs_live": "slower than the ratio x live's p99",
    "p99": "slower than max_p99",
}
BAR = 10  # cells of an evidence bar: full at the evidence that fails


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def age(seconds: float) -> str:
    """How old something is: tenths of a second under a minute."""
    return f"{seconds:.1f}s" if seconds < 60 else _duration(seconds)


def table(rows: list[list[str]]) -> list[str]:
    """Columns as wide as their widest cell, two spaces apart; the first row heads them."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def status_table(status: dict[str, Any]) -> str:
    split = status["split"]
    lines = [
        f"zdproxy {status['version']}, up {_duration(status['uptime_seconds'])}; "
        f"live {split['live']}, candidate {split['candidate']} at "
        f"{split['shares'][split['candidate']]:g}% (sticky: {split['sticky_key']})",
        "",
    ]
    pools = [["COLOR", "SHARE", "VERSION", "UPSTREAMS", "REQ/S", "ERRORS", "P50 MS", "P99 MS"]]
    upstreams = [["UPSTREAM", "HEALTH", "STATE", "IN FLIGHT", "NOTE"]]
    for color, pool in status["pools"].items():
        window = pool["window"]
        routable = sum(u["routable"] for u in pool["upstreams"])
        pools.append(
            [
                color,
                _share(pool),
                pool["version"] or "-",
                f"{routable}/{len(pool['upstreams'])} routable",
                f"{window['requests_per_second']:.1f}",
                f"{window['error_rate'] * 100:.2f}%",
                _ms(window["p50_ms"]),
                _ms(window["p99_ms"]),
            ]
        )
        for u in pool["upstreams"]:
            notes = []
            if u["drained"]:
                notes.append("drained")
            if u["ejected_for"]:
                notes.append(f"ejected for {u['ejected_for']:.0f}s")
            if u["health"] in ("down", "unknown"):
                notes.append(f"{u.get('health_check', 'check')}: {u['health_reason']}")
            if u["tunnels"]:
                notes.append(f"{u['tunnels']} tunnels")
            upstreams.append(
                [
                    u["id"],
                    u["health"],
                    u.get("state", u["health"]),  # a zdproxy older than the CLI: no state
                    str(u["in_flight"]),
                    "; ".join(notes),
                ]
            )
    lines += table(pools)
    window = status["pools"]["blue"]["window"]["seconds"]
    lines.append(f"(traffic over the last {window:g}s)")
    lines.append("")
    lines += table(upstreams) if len(upstreams) > 1 else ["no upstreams configured"]
    lines.append("")
    rules = status["rules"]
    lines.append(
        f"rules: {len(rules)}"
        + "".join(f"\n  {r.get('name') or f'pins[{i}]'} -> {r['to']}" for i, r in enumerate(rules))
    )
    if status.get("pin_fallback"):
        lines.append(status["pin_fallback"]["reason"])
    lines.append(rollout_line(status["rollout"]))
    if status["journal"]:
        lines.append("runtime changes (journal): " + ", ".join(status["journal"]))
    if workers := status.get("workers"):  # proxy.workers above 1 (and a zdproxy that says)
        lines += ["", *table(_worker_rows(workers))]
    if fleet := status.get("fleet"):  # fleet mode (and a zdproxy that says)
        lines += ["", *membership_lines(fleet)]
    return "\n".join(lines)


def membership_lines(membership: dict[str, Any]) -> list[str]:
    """This member in its fleet (`status`, `fleet status`): who leads, the revision it
    runs, etcd's reach, and its own changes not in etcd yet or dropped."""
    m = membership
    leader = m["leader"] or "none"
    if m["leading"]:
        leader += " (this member)"
    elif m["leader"] and not m["available"]:
        leader += " (as last seen)"
    since = _duration(m["since_seconds"])
    etcd = (
        f"etcd available for {since}"
        if m["available"]
        else f"etcd unavailable for {since}: {m['reason']}"
    )
    pending = "a change made here is not in etcd yet" if m["pending"] else "nothing pending"
    lease = "" if m["lease"] else "; no lease: not among the fleet's members"
    return [
        f"fleet {m['prefix']}: member {m['member']}, leader {leader}; revision "
        f"{m['applied_revision']} applied, {m['latest_revision']} the latest seen",
        f"  {etcd}; {pending}; {m['conflicts']} changes made here lost to another member's{lease}",
    ]


def _worker_rows(workers: list[dict[str, Any]]) -> list[list[str]]:
    head = ["WORKER", "PID", "SNAPSHOT", "CONNECTIONS", "IN FLIGHT", "UP", "RESTARTS", "LOST"]
    return [head] + [
        [
            str(w["index"]),
            str(w["pid"]) if w["pid"] is not None else "(starting)",
            f"{w['snapshot_version']}" + ("" if w["current"] else " (behind)"),
            str(w["connections"]),
            str(w["requests"]),
            _duration(w["uptime_seconds"]),
            str(w["restarts"]),
            str(w["lost_requests"]),
        ]
        for w in workers
    ]


def _share(pool: dict[str, Any]) -> str:
    """What the color really gets, and the split's share when the fallback moved it."""
    configured = pool["share"]
    effective = pool.get("effective_share", configured)
    if effective == configured:
        return f"{effective:g}%"
    return f"{effective:g}% (split {configured:g}%)"


def describe(rollout: dict[str, Any]) -> str:
    """The rollout in one line: which, where, and why."""
    if rollout["state"] == "idle":
        return "no rollout yet"
    where = rollout["state"]
    if rollout["step"]:
        of = f"step {rollout['step']} of {rollout['steps']}"
        where = of if where == "step" else f"{where}, {of}"
    share = f", {rollout['share']:g}% of the traffic" if rollout["share"] is not None else ""
    return (
        f"rollout {rollout['id']}: {rollout['candidate']} with plan {rollout['plan']}: "
        f"{where}{share}; {rollout['reason']}"
    )


def rollout_line(rollout: dict[str, Any]) -> str:
    """The status's rollout line: the state, and the judge's verdict while it runs."""
    state = rollout["state"]
    judge = rollout["judge"]
    if state not in ACTIVE or judge is None:
        return f"rollout: {state}"
    numbers = judge["numbers"]
    where = f"step {rollout['step']} of {rollout['steps']}" if rollout["step"] else state
    hold = numbers.get("hold_left_seconds")
    return (
        f"rollout {rollout['id']}: {rollout['candidate']} {where}; judge: {judge['verdict']} "
        f"({judge['reason']}), evidence {_percent(numbers.get('evidence'), 0)}"
        + ("" if hold is None else f", hold left {_duration(math.ceil(hold))}")
    )


def rollout_view(rollout: dict[str, Any]) -> str:
    """`zdproxy rollout show`: the rollout, the judge's verdict and the numbers behind it,
    then the history."""
    lines = [describe(rollout)]
    judge = rollout["judge"]
    if judge is not None:
        lines += _judge_lines(judge, ended=rollout["state"] not in ACTIVE)
    if rollout["history"]:
        lines.append("  history:")
    lines += [
        f"    step {entry['step']} {entry['state']} [{entry['actor']}] {entry['reason']}"
        for entry in rollout["history"]
    ]
    return "\n".join(lines)


def _judge_lines(judge: dict[str, Any], *, ended: bool) -> list[str]:
    numbers = judge["numbers"]
    phase = numbers.get("phase") or "the phase"
    last = "last verdict" if ended else "verdict"
    lines = [f"  {last}: {judge['verdict']} ({phase}): {judge['reason']}"]
    if not ended:
        if (hold := numbers.get("hold_left_seconds")) is not None:
            lines.append(f"  hold left: {_duration(math.ceil(hold))}")
        if needed := numbers.get("requests_needed"):
            lines.append(f"  needed: {_needed(needed, numbers)}")
    lines += _versus(numbers, phase)
    tests = numbers.get("tests") or {}
    if tests:
        lines.append("  evidence to fail (100% fails):")
        width = max(len(name) for name in tests)
        lines += [f"    {name.ljust(width)}  {_test(name, t)}" for name, t in tests.items()]
    return lines


def _needed(needed: int, numbers: dict[str, Any]) -> str:
    if numbers.get("no_active_users"):
        return f"{needed} more candidate requests; no active user in the candidate's share"
    eta = numbers.get("eta_seconds")
    if eta is None:
        return f"{needed} more candidate requests, no ETA (no recent candidate traffic)"
    return f"{needed} more candidate requests, ETA {_duration(math.ceil(eta))}"


def _versus(numbers: dict[str, Any], phase: str) -> list[str]:
    """Candidate against live: counts over the phase and the rollout, rates and latency
    over the judge's recent window."""
    candidate, live = numbers.get("candidate"), numbers.get("reference")
    if candidate is None or live is None:
        return []
    recent = numbers.get("recent") or {}
    rows = [["", "REQUESTS", "ERROR RATE (95% BOUNDS)", "REQ/S", "P50 MS", "P99 MS"]]
    for name, counts, window in (
        ("candidate", candidate, recent.get("candidate") or {}),
        ("live", live, recent.get("live") or {}),
    ):
        rate = _percent(counts["error_rate"])
        if bounds := counts.get("error_rate_bounds"):
            rate += f" ({_percent(bounds[0])}-{_percent(bounds[1])})"
        per_second = window.get("requests_per_second")
        rows.append(
            [
                name,
                str(counts["requests"]),
                rate,
                "-" if per_second is None else f"{per_second:.1f}",
                _ms(window.get("p50_ms")),
                _ms(window.get("p99_ms")),
            ]
        )
    since = "until promotion" if live.get("frozen") else "so far"
    seconds = (recent.get("candidate") or {}).get("seconds")
    over = "" if seconds is None else f"; req/s and latency: the last {seconds:g}s"
    note = f"  (candidate: {phase}; live: the rollout {since}{over})"
    return ["  " + line for line in table(rows)] + [note]


def _test(name: str, test: dict[str, Any]) -> str:
    evidence = test["evidence"]
    filled = min(BAR, int(evidence * BAR))
    shown = ">999%" if evidence > 9.99 else _percent(evidence, 0)
    observed = f"{_percent(test['observed'])} ({test['events']}/{test['trials']})"
    limit = "" if test["limit"] is None else f", limit {_percent(test['limit'])}"
    what = TESTS.get(name, "observed")
    excess = test.get("excess")
    if excess is not None:
        limit += f"; recent excess over live {_percent(excess)}"
    return f"[{'#' * filled}{'.' * (BAR - filled)}] {shown:>4}  {what}: {observed}{limit}"


def _percent(share: float | None, digits: int = 2) -> str:
    return "-" if share is None else f"{share * 100:.{digits}f}%"


def event_line(event: dict[str, Any]) -> str:
    """One event: its local time with the offset (RFC 3339), and who acted."""
    when = datetime.fromtimestamp(event["time"]).astimezone().isoformat(timespec="seconds")
    by = event.get("by", event["actor"])  # a zdproxy older than the CLI: no `by`
    return f"{when} #{event['id']} {event['kind']} [{by}] {event['reason']}"
