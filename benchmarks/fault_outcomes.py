"""What the faults of workers_faults.py did to the users: each kill and each restart
or reload, the failed requests put with the one they happened in, and the tables."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from keepalive_users import Exchange

KILL_WINDOW = 5.0  # seconds after a kill in which a failure is put with it
ACTION_WINDOW = 2.0  # seconds after a restart or reload in which a failure is its


@dataclass
class Kill:
    number: int
    worker: int  # its index (the replacement takes the same)
    pid: int
    at: float  # Unix time of the SIGKILL
    victim_ports: set[int]  # client ports of the victim's connections at the kill
    survivor_ports: set[int]
    lost: int | None = None  # the worker_exited event's count
    listed_ms: float | None = None
    answered_ms: float | None = None
    closed_ms: float | None = None  # the first failure on the victim's connections
    probes_failed: int = 0  # probes are new connections: none of them may fail
    in_flight: int = 0  # the users' failures, by kind
    idle_reused: int = 0
    survivor: int = 0
    other: int = 0


@dataclass
class Action:
    kind: str  # "restart" or "reload"
    started: float
    ended: float
    outcome: str  # "done", or what went wrong
    requests: int = 0  # the users' requests sent during it (and ACTION_WINDOW after)
    failed: int = 0


@dataclass
class Run:
    kills: list[Kill] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    unexplained: list[Exchange] = field(default_factory=list)  # failures outside any window
    answers: list[Exchange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def classify(run: Run) -> None:
    """Each failed request of the users goes with the kill or action it happened in."""
    for a in run.answers:
        kill = next((k for k in reversed(run.kills) if k.at <= a.done < k.at + KILL_WINDOW), None)
        action = next(
            (x for x in run.actions if x.started <= a.sent <= x.ended + ACTION_WINDOW), None
        )
        if action is not None:
            action.requests += 1
            action.failed += a.failed
        if not a.failed or action is not None:
            continue
        if kill is None:
            run.unexplained.append(a)
            continue
        if a.port in kill.victim_ports:
            closed = (a.done - kill.at) * 1000
            kill.closed_ms = closed if kill.closed_ms is None else min(kill.closed_ms, closed)
        if a.port in kill.victim_ports and a.sent < kill.at:
            kill.in_flight += 1
        elif a.port in kill.victim_ports and not a.first_byte:
            kill.idle_reused += 1
        elif a.port in kill.survivor_ports:
            kill.survivor += 1
        else:
            kill.other += 1


def _stats(values: list[float | None], fmt: str = ".0f") -> str:
    known = [v for v in values if v is not None]
    missing = len(values) - len(known)
    text = f"{statistics.median(known):{fmt}} / {max(known):{fmt}}" if known else "-"
    return text + (f" ({missing} never)" if missing else "")


KILL_COLUMNS = (  # header, Kill attribute
    ("failed in flight (clients)", "in_flight"),
    ("lost (worker_exited)", "lost"),
    ("idle keep-alive reused, reset before any byte", "idle_reused"),
    ("failed on the surviving worker", "survivor"),
    ("other failures", "other"),
    ("probes failed (new connections)", "probes_failed"),
    ("victim's connections ended (ms)", "closed_ms"),
    ("new pid listed, current (ms)", "listed_ms"),
    ("replacement answered (ms)", "answered_ms"),
)


def report(run: Run) -> tuple[str, list[tuple[str, bool]]]:
    """The tables, and the goals with their verdicts."""
    lines = ["| kill | worker | " + " | ".join(h for h, _ in KILL_COLUMNS) + " |"]
    lines.append("|--:|--:|" + "--:|" * len(KILL_COLUMNS))
    cell = {"listed_ms": ".0f", "answered_ms": ".0f", "closed_ms": ".0f"}
    for k in run.kills:
        values = [getattr(k, a) for _, a in KILL_COLUMNS]
        shown = [
            "-" if v is None else format(v, cell.get(a, ""))
            for v, (_, a) in zip(values, KILL_COLUMNS, strict=True)
        ]
        lines.append(f"| {k.number} | {k.worker} | " + " | ".join(shown) + " |")
    if run.kills:
        summary = [_stats([getattr(k, a) for k in run.kills]) for _, a in KILL_COLUMNS]
        lines.append("| median / max | | " + " | ".join(summary) + " |")
        totals = [sum(getattr(k, a) or 0 for k in run.kills) for _, a in KILL_COLUMNS[:6]]
        lines.append("| sum | | " + " | ".join(map(str, totals)) + " | | | |")
    lines += [
        "",
        "| fault | times | not done | requests during | failed | time to done, median / max (ms) |",
    ]
    lines.append("|---|--:|--:|--:|--:|--:|")
    for kind in ("restart", "reload"):
        acts = [x for x in run.actions if x.kind == kind]
        if acts:
            times = [(x.ended - x.started) * 1000 for x in acts]
            undone = sum(x.outcome != "done" for x in acts)
            label = (
                "restart in place (SIGUSR2)"
                if kind == "restart"
                else "reload (SIGHUP, split changed)"
            )
            lines.append(
                f"| {label} | {len(acts)} | {undone} | {sum(x.requests for x in acts)} | "
                f"{sum(x.failed for x in acts)} | {_stats(list(times))} |"
            )
    restarts = [x for x in run.actions if x.kind == "restart"]
    reloads = [x for x in run.actions if x.kind == "reload"]
    answered = [k.answered_ms for k in run.kills]
    goals = [
        (
            "kill -9: zero failures on the surviving worker and on new connections",
            sum(k.survivor + k.probes_failed for k in run.kills) == 0,
        ),
        (
            "kill -9: the replacement answers within 1 s (max)",
            bool(answered) and all(a is not None and a <= 1000 for a in answered),
        ),
        (
            "kill -9: lost (worker_exited) = failed in flight, each kill",
            all(k.lost == k.in_flight for k in run.kills),
        ),
        (
            "restart in place: zero failed requests",
            all(x.failed == 0 and x.outcome == "done" for x in restarts),
        ),
        (
            "reloads: zero failed requests",
            all(x.failed == 0 and x.outcome == "done" for x in reloads),
        ),
    ]
    return "\n".join(lines), goals
