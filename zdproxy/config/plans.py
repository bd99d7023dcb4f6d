"""Rollout plans (`[plans.NAME]`), the judge that guards them, and hooks (`[hooks.NAME]`).

A plan is a list of steps (the candidate's share and how long it holds), a bake
period after promotion, and what to do when the judge fails it. Two plans are built
in, `canary` and `blue-green` (BUILTIN_PLANS), so a config without [plans] can
deploy; a [plans.NAME] of the same name replaces one. Hooks are commands from this
file only: nothing in the API can run a command.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator

from zdproxy.config.overrides import PinSettings
from zdproxy.config.section import Section as _Section
from zdproxy.config.spelling import did_you_mean
from zdproxy.config.units import DAY, HOUR, Duration, format_duration


class JudgeSettings(_Section):
    """How the candidate is judged against the live color while it takes traffic.

    Errors are 5xx answers and upstream failures (connect, timeout, reset), counted
    even when a retry on the live color hid them from the user, and requests pending
    past `pending_failure_after`. The tests are anytime-valid (they may decide on any
    tick): the candidate fails as soon as the evidence shows its error rate above
    `max_error_rate`, or above `max_error_ratio` times live's (and
    `max_error_rate_over_live` above it), or its latency
    beyond `max_latency_ratio` times live's (median or p99) or beyond `max_p99`; a
    candidate as good as live is rolled back with probability at most
    `false_rollback_rate` over the whole rollout.
    """

    tick: Duration = Field(
        default=0.1,
        ge=0.05,
        le=0.25,
        description="How often it judges, 50ms to 250ms; the records it reads are 100 ms fresh.",
    )
    window: Duration = Field(
        default=10.0,
        ge=1,
        le=600,
        description="The recent window shown in the numbers, over which the candidate's "
        "error rate is compared with live's for `max_error_rate_over_live`, and live's "
        "recent rate raises the limit a pass must show (a shared outage). 1s to 10m.",
    )
    false_rollback_rate: float = Field(
        default=0.0025,
        gt=0,
        le=0.2,
        description="The largest chance that a candidate as good as live is rolled back, "
        "over the whole rollout (0.25% by default; at most 0.2). Lower asks more evidence.",
    )
    min_requests: int = Field(
        default=20,
        ge=1,
        le=1_000_000,
        description="Candidate requests a step needs before it may pass, at least: a pass "
        "also needs its error rate shown under the limits (95% confidence); a failure "
        "needs no minimum (at most 1000000).",
    )
    max_error_rate: float = Field(
        default=0.05, ge=0, le=1, description="Absolute limit on the candidate's error rate, 0-1."
    )
    max_error_rate_over_live: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="How far the candidate's recent error rate may exceed live's before "
        "being worse than live (beyond `max_error_ratio`) fails it, 0-1; 1: not compared.",
    )
    max_error_ratio: float = Field(
        default=1.5,
        ge=1,
        le=1000,
        description="Fails a candidate whose error rate is shown above this times live's "
        "(and `max_error_rate_over_live` above it); a candidate under it is not failed "
        "by the test but with probability `false_rollback_rate`.",
    )
    max_latency_ratio: float = Field(
        default=1.5,
        ge=0,
        le=1000,
        description="Fails a candidate with over half its requests slower than this times "
        "live's median, or over 1% slower than this times live's p99; 0: not compared.",
    )
    max_p99: Duration = Field(
        default=0.0,
        ge=0,
        le=HOUR,
        description="Fails a candidate with over 1% of its requests slower than this; 0: none. "
        "At most 1h.",
    )
    pending_failure_after: Duration = Field(
        default=0.5,
        gt=0,
        le=HOUR,
        description="A candidate request still unanswered this long (or 4x live's p99, if "
        "longer) counts as a failure while it waits: a hang is caught before it times out.",
    )


class StepSettings(_Section):
    """One step: the candidate's share of the split, and the rollout pins it turns on."""

    weight: float = Field(
        default=0,
        ge=0,
        le=100,
        description="The candidate's share of the unpinned traffic, in percent; 0 (with "
        "`pins`): only pinned users reach the candidate.",
    )
    pins: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list,
        max_length=1000,
        description='Names of [[pins]] rules (to = "candidate") that send their users to '
        "the candidate from this step until the rollout ends; before this step, and "
        "outside rollouts of this plan, they match nothing. At most 1000.",
    )
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
        description="After promotion, the old live pool stays warm this long, and longer "
        "until the judge passes the new one (up to step_deadline more); a failure in it "
        "makes the old pool live again. At most 7d.",
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
        description="A step whose hold ends without a pass: hold (wait for more evidence, "
        "up to step_deadline, then pause) or fail (roll back). A bake without a pass "
        "step_deadline past its time: finishes with a warning (hold) or rolls back (fail).",
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
        default_factory=list,
        description="Hooks run once the candidate is healthy and pre_rollout is done, e.g. "
        "smoke tests through the preview.",
    )
    pre_rollout_first: bool = Field(
        default=False,
        description="Run the pre_rollout hooks before waiting for the candidate's health "
        "(a build that becomes ready only after its migration); the verify hooks still "
        "wait for it. false: health first, then both.",
    )
    on_rollback: list[str] = Field(default_factory=list, description="Hooks run after a rollback.")
    post_promote: list[str] = Field(
        default_factory=list, description="Hooks run when the rollout is done."
    )

    @field_validator("steps")
    @classmethod
    def _rising(cls, steps: list[StepSettings]) -> list[StepSettings]:
        # Every step gives the candidate more: a higher weight, or pins (of its own).
        for i, (before, after) in enumerate(pairwise([StepSettings(weight=0), *steps])):
            if after.weight < before.weight:
                raise ValueError(
                    f"weights must not fall from step to step ({before.weight:g} then "
                    f"{after.weight:g})"
                )
            if after.weight == before.weight and not after.pins:
                raise ValueError(
                    f"step {i + 1} changes nothing: give it a higher weight than "
                    f"{before.weight:g} or pins"
                )
        return steps

    def describe(self) -> str:
        """The plan in one line: "5% for 1m, 25% for 2m, 100% for 1m, then a 5m bake"."""
        steps = ", ".join(
            f"{step.weight:g}%{' and pins ' + ', '.join(step.pins) if step.pins else ''} "
            f"for {format_duration(step.hold)}"
            for step in self.steps
        )
        return f"{steps}, then a {format_duration(self.bake)} bake"

    def step_pins(self) -> set[str]:
        """The names of the rollout pins its steps name."""
        return {name for step in self.steps for name in step.pins}

    def hooks(self) -> list[str]:
        return [*self.pre_rollout, *self.verify, *self.on_rollback, *self.post_promote]


class HookSettings(_Section):
    """A command (argv, no shell) with a timeout; its output goes into the event."""

    command: list[str] = Field(min_length=1, description='e.g. ["/opt/app/bin/migrate", "up"]')
    timeout: Duration = Field(
        default=300.0, gt=0, le=DAY, description="Killed past this: a failure. At most 1d."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment.")


# What `zdproxy deploy` can use with no [plans] at all. The judge has its defaults; a
# step passes after its hold only with the evidence (min_requests) for a pass.
BUILTIN_PLANS: Mapping[str, PlanSettings] = MappingProxyType(
    {
        # 5%, 25%, 50%, 100%: about 11 minutes with enough traffic, the bake included.
        "canary": PlanSettings(
            steps=[
                StepSettings(weight=5, hold=60),
                StepSettings(weight=25, hold=120),
                StepSettings(weight=50, hold=120),
                StepSettings(weight=100, hold=60),
            ],
            bake=300,
        ),
        # All traffic at once, judged; the old color stays warm for the bake.
        "blue-green": PlanSettings(steps=[StepSettings(weight=100, hold=30)], bake=600),
    }
)
DEFAULT_PLAN = "canary"


def with_builtin_plans(plans: dict[str, PlanSettings]) -> dict[str, PlanSettings]:
    """The file's own plans in its order, then the built-in ones it does not replace."""
    return {**plans, **{n: p for n, p in BUILTIN_PLANS.items() if n not in plans}}


def is_builtin(name: str, plan: PlanSettings) -> bool:
    """The plan is a built-in one, not replaced by the file (nor by an identical twin)."""
    return BUILTIN_PLANS.get(name) == plan


# `Settings.plans`: what the file declares, the built-in plans added (validate_default
# makes that hold for a file without [plans] too).
Plans = Annotated[dict[str, PlanSettings], AfterValidator(with_builtin_plans)]


class RolloutSettings(_Section):
    """Which plan `zdproxy deploy` uses without --plan."""

    default_plan: str = Field(
        default=DEFAULT_PLAN,
        max_length=200,
        description='A plan name: a [plans.NAME], or a built-in one ("canary", '
        '"blue-green"). "" (configs from before the built-in plans): the first '
        '[plans.NAME] of the file, or "canary" when it declares none.',
    )

    def plan_in(self, plans: Mapping[str, PlanSettings]) -> str:
        """The name of the plan `zdproxy deploy` uses without --plan (`plans` as
        Settings.plans has them: the file's first)."""
        return self.default_plan or next(iter(plans))


def check_plans(
    plans: dict[str, PlanSettings],
    hooks: dict[str, HookSettings],
    default: str,
    pins: Sequence[PinSettings],
) -> None:
    """Cross-references: every hook a plan names exists; every pin a step names exists
    and sends to the candidate; the default plan exists."""
    named_by: dict[str, str] = {}  # a rollout pin's name -> the first step naming it
    for name, plan in plans.items():
        for hook in plan.hooks():
            if hook not in hooks:
                raise ValueError(f"plans.{name}: no [hooks.{hook}] for hook {hook!r}")
        for i, step in enumerate(plan.steps):
            for pin in step.pins:
                if not any(rule.name == pin for rule in pins):
                    raise ValueError(f"plans.{name}.steps[{i}].pins: no [[pins]] named {pin!r}")
                named_by.setdefault(pin, f"plans.{name}.steps[{i}]")
    for i, rule in enumerate(pins):
        by = named_by.get(rule.name)
        if by is None:
            continue
        # A rollout pin is on only from a step of a rollout to its end: it leads to that
        # rollout's candidate, and has nothing to do once the rollout ended.
        if rule.to != "candidate":
            raise ValueError(f'pins[{i}].to: {by} names this pin: it must be "candidate"')
        if rule.after_rollback != "live":
            raise ValueError(
                f"pins[{i}].after_rollback: {by} names this pin: it is off once its "
                "rollout ends, whatever the end"
            )
    if default and default not in plans:
        raise ValueError(
            f"rollout.default_plan: no plan {default!r} (known: {', '.join(plans)})"
            + did_you_mean(default, plans)
        )
