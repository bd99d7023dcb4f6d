"""Rollout plans (`[plans.NAME]`), the judge that guards them, and hooks (`[hooks.NAME]`).

A plan is a list of steps (the candidate's share and how long it holds), a bake
period after promotion, and what to do when the judge fails it. Hooks are commands
from this file only: nothing in the API can run a command.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

from pydantic import Field, field_validator

from zdproxy.config.section import Section as _Section
from zdproxy.config.units import DAY, HOUR, Duration


class JudgeSettings(_Section):
    """How the candidate is judged against the live pool while it takes traffic.

    Errors are 5xx answers and upstream failures (connect, timeout, reset). The
    candidate fails when the lower Wilson bound of its error rate is above
    `max_error_rate`, or above the live pool's upper bound plus
    `max_error_rate_over_live`; or when its p99 is above `max_p99` or `max_p99_ratio`
    times the live pool's. A breach must repeat on `consecutive_breaches` ticks.
    """

    tick: Duration = Field(
        default=0.1,
        ge=0.05,
        le=0.25,
        description="How often it judges, 50ms to 250ms; the records it reads are 100 ms fresh.",
    )
    window: Duration = Field(
        default=10.0, ge=1, le=600, description="The sliding window it judges over, 1s to 10m."
    )
    min_requests: int = Field(
        default=20,
        ge=1,
        le=1_000_000,
        description="Candidate requests in the window before any verdict (at most 1000000).",
    )
    confidence: float = Field(
        default=0.95,
        ge=0.5,
        lt=1,
        description="Of the Wilson bounds around error rates; 0.5 to below 1.",
    )
    max_error_rate: float = Field(
        default=0.05, ge=0, le=1, description="Absolute limit on the candidate's error rate, 0-1."
    )
    max_error_rate_over_live: float = Field(
        default=0.02, ge=0, le=1, description="Limit on the candidate's excess over live, 0-1."
    )
    max_p99: Duration = Field(
        default=0.0,
        ge=0,
        le=HOUR,
        description="Absolute limit on the candidate's p99; 0: none. At most 1h.",
    )
    max_p99_ratio: float = Field(
        default=2.0, ge=0, le=1000, description="Limit on candidate p99 / live p99; 0: none."
    )
    consecutive_breaches: int = Field(
        default=2, ge=1, le=100, description="Breaching ticks in a row that fail a step (1-100)."
    )


class StepSettings(_Section):
    weight: float = Field(gt=0, le=100, description="The candidate's share, in percent.")
    hold: Duration = Field(
        default=60.0, ge=0, le=7 * DAY, description="How long the step holds (at most 7d)."
    )


class PlanSettings(_Section):
    """One way to take a candidate live: `zdproxy deploy green --plan NAME`."""

    steps: list[StepSettings] = Field(
        min_length=1,
        max_length=100,
        description="The candidate's shares in order; the last is usually 100. At most 100.",
    )
    bake: Duration = Field(
        default=60.0,
        ge=0,
        le=7 * DAY,
        description="After promotion, the old live pool stays warm this long; a failure "
        "in it makes the old pool live again. At most 7d.",
    )
    min_healthy: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="Healthy candidate upstreams needed to begin (a pool has at most 1000).",
    )
    preflight_timeout: Duration = Field(
        default=300.0,
        gt=0,
        le=DAY,
        description="Deadline to reach min_healthy; past it: abort. At most 1d.",
    )
    step_deadline: Duration = Field(
        default=1800.0,
        gt=0,
        le=7 * DAY,
        description="A step still without a verdict (too little traffic) this long after "
        "it began is paused, with an alert event: never a silent pass. At most 7d.",
    )
    pause_timeout: Duration = Field(
        default=3600.0,
        gt=0,
        le=7 * DAY,
        description="A paused step (by hand, or for lack of a verdict) ends this long after "
        "it paused, as on_pause_timeout says: a forgotten pause never holds a rollout forever.",
    )
    on_pause_timeout: Literal["rollback", "resume"] = Field(
        default="rollback",
        description="rollback: the old live color takes all traffic again. resume: the step "
        "goes on (its hold starts again).",
    )
    inconclusive: Literal["hold", "fail"] = Field(
        default="hold",
        description="A step whose hold ends without enough traffic: hold (wait for more, up "
        "to step_deadline) or fail (roll back).",
    )
    on_failure: Literal["rollback", "freeze"] = Field(
        default="rollback",
        description="rollback: candidate to 0 (or the old pool live again during the bake). "
        "freeze: keep the traffic where it is, stop, and raise an alert (for releases "
        "whose migrations are not backward compatible).",
    )
    judge: JudgeSettings = JudgeSettings()
    pre_rollout: list[str] = Field(
        default_factory=list, description="Hooks run before any traffic (migrations)."
    )
    verify: list[str] = Field(
        default_factory=list, description="Hooks run next, e.g. smoke tests via the preview."
    )
    on_rollback: list[str] = Field(default_factory=list, description="Hooks run after a rollback.")
    post_promote: list[str] = Field(
        default_factory=list, description="Hooks run when the rollout is done."
    )

    @field_validator("steps")
    @classmethod
    def _rising(cls, steps: list[StepSettings]) -> list[StepSettings]:
        for before, after in pairwise(steps):
            if after.weight <= before.weight:
                raise ValueError(
                    f"weights must rise step by step ({before.weight} then {after.weight})"
                )
        return steps

    def hooks(self) -> list[str]:
        return [*self.pre_rollout, *self.verify, *self.on_rollback, *self.post_promote]


class HookSettings(_Section):
    """A command (argv, no shell) with a timeout; its output goes into the event."""

    command: list[str] = Field(min_length=1, description='e.g. ["/opt/app/bin/migrate", "up"]')
    timeout: Duration = Field(
        default=300.0, gt=0, le=DAY, description="Killed past this: a failure. At most 1d."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment.")


class RolloutSettings(_Section):
    """Which plan `zdproxy deploy` uses without --plan."""

    default_plan: str = Field(default="", description="A name of [plans]; default: the first.")


def check_plans(
    plans: dict[str, PlanSettings], hooks: dict[str, HookSettings], default: str
) -> None:
    """Cross-references: every hook a plan names exists; the default plan exists."""
    for name, plan in plans.items():
        for hook in plan.hooks():
            if hook not in hooks:
                raise ValueError(f"plans.{name}: no [hooks.{hook}] for hook {hook!r}")
    if default and default not in plans:
        raise ValueError(f"rollout.default_plan: no [plans.{default}]")
