"""How the CLI shows the judge: `zdproxy rollout show` and the status's rollout line, from
rollouts as the admin API serves them (built through its model), no network."""

from __future__ import annotations

from typing import Any

from zdproxy.admin import models as m
from zdproxy.cli.views import rollout_line, rollout_view, status_table
from zdproxy.config.plans import JudgeSettings
from zdproxy.control.judge import Judge, Reference
from zdproxy.control.telemetry import WindowView
from zdproxy.routing.histogram import Histogram, index


def window(requests: int, errors: int = 0, seconds: float = 10.0) -> dict[str, Any]:
    latency = Histogram()
    for _ in range(requests):
        latency.add_counts({index(0.004): 1}, 0.004)
    return WindowView(seconds, requests, errors, latency).to_dict()


def numbers(**changes: Any) -> dict[str, Any]:
    """A step's numbers as the judge gives them: 12 candidate requests, 1 failed."""
    base: dict[str, Any] = {
        "phase": "step 2",
        "hold_left_seconds": 41.2,
        "candidate": {
            "requests": 12,
            "errors": 1,
            "error_rate": 0.083333,
            "error_rate_bounds": [0.001, 0.4123],
            "pending_failed": 0,
        },
        "reference": {
            "requests": 480,
            "errors": 2,
            "error_rate": 0.004167,
            "p50_ms": 4.0,
            "p99_ms": 9.5,
            "frozen": False,
        },
        "hang_after_ms": 500.0,
        "tests": {
            "errors": {
                "limit": 0.05,
                "observed": 0.083333,
                "events": 1,
                "trials": 12,
                "evidence": 0.31,
            },
            "p99_vs_live": {
                "limit": 0.01,
                "observed": 0.0,
                "events": 0,
                "trials": 12,
                "evidence": 0.0,
            },
        },
        "evidence": 0.31,
        "recent": {"candidate": window(12, 1), "live": window(480, 2)},
        "requests_needed": 8,
        "eta_seconds": 6.7,
    }
    return {**base, **changes}


def rollout(
    state: str = "step",
    verdict: str = "hold",
    reason: str = "12 of 20 candidate requests",
    **n: Any,
) -> dict[str, Any]:
    """A rollout as GET /v1/rollout answers it."""
    judge = {"verdict": verdict, "reason": reason, "numbers": numbers(**n)}
    model = m.Rollout(
        state=state,  # type: ignore[arg-type]
        id=3,
        candidate="green",
        previous="blue",
        plan="canary",
        step=2,
        steps=3,
        share=25.0,
        reason="step 1 passed",
        judge=m.Judge.model_validate(judge),
    )
    return model.model_dump(mode="json")


def test_the_block_says_the_verdict_hold_left_rates_and_eta() -> None:
    shown = rollout_view(rollout())
    lines = shown.splitlines()
    assert lines[0] == "rollout 3: green with plan canary: step 2 of 3, 25% of the traffic; " + (
        "step 1 passed"
    )
    assert "  verdict: hold (step 2): 12 of 20 candidate requests" in lines
    assert "  hold left: 42s" in lines  # rounded up: a countdown never shows 0 too soon
    assert "  needed: 8 more candidate requests, ETA 7s" in lines
    [candidate] = [line for line in lines if line.startswith("  candidate ")]
    assert candidate.split()[1:] == ["12", "8.33%", "(0.10%-41.23%)", "1.2", "4.0", "4.0"]
    [live] = [line for line in lines if line.startswith("  live ")]
    assert live.split()[1:] == ["480", "0.42%", "48.0", "4.0", "4.0"]
    assert "  (candidate: step 2; live: the rollout so far; req/s and latency: the last 10s)" in (
        lines
    )
    assert "    errors       [###.......]  31%  error rate: 8.33% (1/12), limit 5.00%" in lines
    assert any(line.startswith("    p99_vs_live  [..........]   0%  slower than") for line in lines)


def test_no_active_user_in_the_share_says_so_instead_of_an_eta() -> None:
    shown = rollout_view(rollout(no_active_users=True, eta_seconds=None))
    assert "  needed: 8 more candidate requests; no active user in the candidate's share" in (
        shown.splitlines()
    )
    assert "ETA" not in shown
    no_traffic = rollout_view(rollout(eta_seconds=None))
    assert "8 more candidate requests, no ETA (no recent candidate traffic)" in no_traffic


def test_a_pass_needs_nothing_more_and_a_failed_test_fills_its_bar() -> None:
    passed = rollout_view(rollout(verdict="pass", reason="within limits", requests_needed=0))
    assert "  verdict: pass (step 2): within limits" in passed.splitlines()
    assert "needed" not in passed
    tests = numbers()["tests"]
    failed = {"limit": 0.0, "observed": 0.1, "events": 1, "trials": 10, "evidence": 1000.0}
    shown = rollout_view(
        rollout(state="rolled_back", verdict="fail", tests={**tests, "errors": failed})
    )
    lines = shown.splitlines()
    assert "  last verdict: fail (step 2): 12 of 20 candidate requests" in lines
    assert not [line for line in lines if "hold left" in line or "needed" in line]  # ended
    # An infinite evidence (an error where none is allowed) is shown capped: a full bar.
    assert "    errors       [##########] >999%  error rate: 10.00% (1/10), limit 0.00%" in lines


def test_the_status_line_gives_the_verdict_while_a_rollout_runs() -> None:
    line = rollout_line(rollout())
    assert line == (
        "rollout 3: green step 2 of 3; judge: hold (12 of 20 candidate requests), "
        "evidence 31%, hold left 42s"
    )
    assert rollout_line(rollout(state="done")) == "rollout: done"
    assert rollout_line(m.Rollout().model_dump(mode="json")) == "rollout: idle"


def test_the_status_table_has_the_rollout_line() -> None:
    status: dict[str, Any] = {
        "version": "1.0",
        "uptime_seconds": 61,
        "split": {
            "live": "blue",
            "candidate": "green",
            "shares": {"blue": 75, "green": 25},
            "sticky_key": "cookie",
        },
        "pools": {"blue": {"version": "", "share": 75, "upstreams": [], "window": window(0)}},
        "rules": [],
        "rollout": rollout(),
        "journal": [],
    }
    assert rollout_line(status["rollout"]) in status_table(status).splitlines()


def test_a_real_judges_numbers_fit_the_api_model_and_the_block() -> None:
    judge = Judge(JudgeSettings(min_requests=20), 0.001, Reference(), 0.0)
    fresh = WindowView(0.1, 5, 0, Histogram())
    live = WindowView(0.1, 50, 0, Histogram())
    verdict = judge.assess(0.1, fresh, live, fresh, live)
    served = m.Judge.model_validate(
        {"verdict": verdict.outcome, "reason": verdict.reason, "numbers": verdict.numbers}
    )
    assert served.numbers.candidate is not None and served.numbers.candidate.requests == 5
    assert served.numbers.requests_needed == 111  # to show its error rate under 5%
    shown = rollout_view(rollout() | {"judge": served.model_dump(mode="json")})
    assert "  needed: 111 more candidate requests, ETA " in shown
