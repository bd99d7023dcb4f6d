"""The numbers of one judge-matrix run, from its raw material (judge_run.RawRun).

Times are Unix times taken on the one machine everything runs on, so the apps', the
users' and zdproxy's clocks are the same clock.

- **caught**: the rollout ended rolled back or aborted (GET /v1/rollout).
- **reaction**: from the first bad answer of a green app (for hang: the arrival of the
  first request that hung; for crash and refused: the moment of the fault) to the last
  new request that reached a green app, as the apps recorded it. A crashed or refusing
  app records nothing, so for crash and refused the end is the last time zdproxy's
  counters of green's upstreams (responses plus failures, polled from /metrics every
  100 ms, folded by zdproxy every 100 ms) grew: up to 0.2 s late. Requests of the pinned
  tenant are left out (the pins run measures them apart).
- **errors**: every answer a user got that was not a 2xx, a transport error, or the
  client's 15 s timeout, over the whole run, split GET and POST.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from faulty_app import AppRecord, Fault
from judge_run import ACTIVE, PLANS, RawRun, Sample

CAUGHT = ("rolled_back", "aborted")
END_KINDS = {f"rollout_{s}" for s in ("done", "rolled_back", "aborted", "frozen", "failed")}
NO_APP_RECORDS = (Fault.CRASH, Fault.REFUSED)


@dataclass
class RunResult:
    cell: str
    kind: str
    plan: str
    fault: str
    seed: int
    outcome: str  # the rollout's last state: done, rolled_back, paused, "still step", ...
    reason: str  # zdproxy's reason for the end or pause (from its event)
    ended_after: float | None  # seconds from the deploy to that event
    caught: bool
    fault_at: str  # "step 2 (50%)", "bake", "" (no fault)
    users_on_candidate: int | None  # users whose last answer before the fault was green's
    no_user_on_share: bool  # the candidate's share held no user when its fault should show
    candidate_requests_before_fault: int
    reaction: float | None  # seconds
    reaction_source: str  # "apps" or "zdproxy metrics"
    rollback_after: float | None  # from the first bad answer to zdproxy's end event
    get_errors: int
    get_requests: int
    post_errors: int
    post_requests: int
    errors_before_fault: int
    rate: float  # requests per second the users achieved
    max_step: int  # the highest step the rollout reached
    candidate_requests: int  # every request a green app saw (the pinned tenant's too)
    pinned_on_green_before: int = 0  # pins run: the tenant's requests green saw before it
    pinned_back_after: float | None = None  # pins run: rollback to the tenant's last green
    pinned_on_green_at_end: bool = False
    pinned_errors_before_rollback: int = 0
    pinned_errors_after_rollback: int = 0
    notes: list[str] = field(default_factory=list)

    def progress(self) -> str:
        """One line per run, for the progress log."""
        reaction = "-" if self.reaction is None else f"{self.reaction:.2f} s"
        if self.rollback_after is not None:
            reaction += f" (rolled back {self.rollback_after:.2f} s after the first bad answer)"
        where = f" at {self.fault_at}" if self.fault_at else ""
        users = "" if self.users_on_candidate is None else f", {self.users_on_candidate} users"
        return (
            f"{self.cell}{where}{users}: {self.outcome}"
            f"{' (caught)' if self.caught else ''}, reaction {reaction}, errors GET "
            f"{self.get_errors}/{self.get_requests} POST {self.post_errors}/{self.post_requests}"
            f", {self.rate:.0f} req/s"
            + (f"; {self.reason[:120]}" if self.reason and self.outcome != "done" else "")
            + "".join(f"; {n}" for n in self.notes)
        )


def measure(raw: RawRun) -> RunResult:
    spec = raw.spec
    last = raw.samples[-1] if raw.samples else Sample(0, "unknown", None, None)
    end = _end_event(raw)
    active = last.state in ACTIVE and last.state != "paused"
    outcome = f"still {last.state}" if active else last.state
    gets = [a for a in raw.answers if a.method == "GET"]
    posts = [a for a in raw.answers if a.method == "POST"]
    green = [r for r in raw.records if r.color == "green"]
    split_green = [r for r in green if not r.pinned]
    first_bad = _first_bad(raw, split_green)
    last_green = _last_green(raw, split_green)
    fault = raw.fault_time
    # A rollback before the fault started is a false alarm, not a catch.
    caught = last.state in CAUGHT and fault is not None
    if spec.fault is not Fault.NONE and fault is None and not active:
        outcome = f"ended before the fault: {outcome}"
    reaction = None
    if caught and first_bad is not None and last_green is not None:
        reaction = max(0.0, last_green - first_bad)
    users_on = _users_on_green(raw) if fault is not None else None
    # Sticky buckets: 10% of 24 users is 0 to 6 users. With none, the fault cannot show,
    # and a step with no candidate traffic holds (no verdict) instead of passing.
    no_user = users_on == 0 or (active and last.state == "step" and not green)
    result = RunResult(
        cell=spec.cell,
        kind=str(spec.kind),
        plan=spec.plan,
        fault=str(spec.fault),
        seed=spec.seed,
        outcome=outcome,
        reason=str(end["reason"]) if end else "",
        ended_after=float(end["time"]) - raw.deployed if end else None,
        caught=caught,
        fault_at=_where(raw.fault_sample, spec.plan),
        users_on_candidate=users_on,
        no_user_on_share=no_user,
        candidate_requests_before_fault=sum(r.arrival < fault for r in green) if fault else 0,
        reaction=reaction,
        reaction_source="zdproxy metrics" if spec.fault in NO_APP_RECORDS else "apps",
        rollback_after=(end["time"] - first_bad) if end and first_bad and caught else None,
        get_errors=sum(a.failed for a in gets),
        get_requests=len(gets),
        post_errors=sum(a.failed for a in posts),
        post_requests=len(posts),
        errors_before_fault=sum(a.failed and a.done < fault for a in raw.answers) if fault else 0,
        rate=len(raw.answers) / max(raw.load[1] - raw.load[0], 1e-9),
        max_step=max((s.step or 0 for s in raw.samples), default=0),
        candidate_requests=len(green),
        notes=list(raw.notes),
    )
    if fault is not None and first_bad is None:
        result.notes.append("no bad answer from green to a user routed by the split")
    if result.errors_before_fault:
        result.notes.append(f"{result.errors_before_fault} errors before the fault")
    if any(a.pinned for a in raw.answers):
        _pinned(raw, result, end)
    return result


def _end_event(raw: RawRun) -> dict[str, Any] | None:
    """The event of the rollout's end, or of its pause: zdproxy's time and reason."""
    for event in raw.events:
        ours = event.get("data", {}).get("rollout") == raw.rollout_id
        if ours and event["kind"] in END_KINDS | {"rollout_paused"}:
            return event
    return None


def _first_bad(raw: RawRun, green: list[AppRecord]) -> float | None:
    fault = raw.fault_time
    if fault is None:
        return None
    if raw.spec.fault in NO_APP_RECORDS:
        return fault
    if raw.spec.fault is Fault.HANG:
        return min((r.arrival for r in green if r.bad), default=None)
    return min((r.departure for r in green if r.bad and r.departure is not None), default=None)


def _last_green(raw: RawRun, green: list[AppRecord]) -> float | None:
    if raw.spec.fault in NO_APP_RECORDS:
        grew = [
            t
            for (t, n), (_, before) in zip(raw.green_attempts[1:], raw.green_attempts, strict=False)
            if n > before
        ]
        return max(grew, default=None)
    return max((r.arrival for r in green), default=None)


def _where(sample: Sample | None, plan: str) -> str:
    if sample is None:
        return ""
    if sample.state == "baking":
        return "bake"
    if sample.state == "step" and sample.step:
        weight = PLANS[plan]["steps"][sample.step - 1]["weight"]
        return f"step {sample.step} ({weight}%)"
    return sample.state


def _users_on_green(raw: RawRun) -> int:
    """Users (not the pinned tenant) whose last answer before the fault came from green."""
    latest: dict[int, str | None] = {}
    for answer in sorted(raw.answers, key=lambda a: a.done):
        if raw.fault_time is not None and answer.done < raw.fault_time and not answer.pinned:
            latest[answer.user] = answer.color or latest.get(answer.user)
    return sum(color == "green" for color in latest.values())


def _pinned(raw: RawRun, result: RunResult, end: dict[str, Any] | None) -> None:
    """The pins run: how long after the rollback the pinned tenant still reached green."""
    if end is None or not result.caught:
        return
    rollback = float(end["time"])
    on_green = [r.arrival for r in raw.records if r.pinned and r.color == "green"]
    result.pinned_on_green_before = sum(t <= rollback for t in on_green)
    after = [t for t in on_green if t > rollback]
    pinned_sent = [a.sent for a in raw.answers if a.pinned]
    result.pinned_back_after = max(after, default=rollback) - rollback
    # Still reaching green in the last second of traffic: it never went back.
    result.pinned_on_green_at_end = bool(after) and max(after) > max(pinned_sent) - 1.0
    pinned = [a for a in raw.answers if a.pinned and a.failed]
    result.pinned_errors_before_rollback = sum(a.sent <= rollback for a in pinned)
    result.pinned_errors_after_rollback = sum(a.sent > rollback for a in pinned)
