"""The admin API's request and response bodies. The OpenAPI document is generated
from these models, and every response is built through them, so the two agree."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from zdproxy.admin.fleet_models import Membership
from zdproxy.config.overrides import PinSettings
from zdproxy.config.settings import Color, PoolMembers, UpstreamEntry
from zdproxy.control.availability import UpstreamState
from zdproxy.control.events import EventRecord, rfc3339


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests ---------------------------------------------------------------------------


class PoolChange(PoolMembers):
    """PUT /v1/pools/{color}."""

    force: bool = Field(
        default=False,
        description="Apply even when the color takes traffic and no healthy upstream remains.",
    )


class SplitChange(Body):
    """PUT /v1/split: the candidate's share; optionally which color is live, and the salt."""

    candidate_weight: int = Field(
        ge=0, le=10000, description="The candidate's share in basis points (2500 = 25%)."
    )
    live: Color | None = Field(default=None, description="Make this color live; default: as is.")
    salt: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="A new sticky salt: reshuffles which users fall in the candidate's share.",
    )
    force: bool = Field(
        default=False, description="Apply even when a color that would get traffic has none."
    )


class Target(Body):
    """A color or one upstream ("blue/127.0.0.1:9001"); exactly one of the two."""

    color: Color | None = None
    upstream: str | None = Field(default=None, min_length=1, max_length=300)

    @model_validator(mode="after")
    def _one(self) -> Target:
        if (self.color is None) == (self.upstream is None):
            raise ValueError("give either color or upstream")
        return self


class DrainRequest(Target):
    """POST /v1/drain."""

    wait: bool = Field(default=False, description="Answer only when the drain has finished.")
    cut_after: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds after which requests still in flight are cut (with wait).",
    )
    tunnel_grace: float = Field(
        default=5.0, ge=0, le=3600, description="Seconds WebSocket tunnels get before closing."
    )
    force: bool = Field(
        default=False,
        description="Drain even when no routable upstream of either color would remain.",
    )


class RulesChange(Body):
    """PUT /v1/rules: the ordered pin rules; the first match wins."""

    rules: list[PinSettings] = Field(max_length=1000)


class StatusQuery(Body):
    follow: bool = Field(
        default=False,
        description="Stream server-sent events, one a second: `samples` (each color's "
        "traffic per second, the last 15 minutes first) and `status` (this body).",
    )


class EventsQuery(Body):
    since: int = Field(default=0, ge=0, description="Only events with a larger id.")
    kind: str | None = Field(default=None, max_length=100, description="Only this kind.")
    limit: int = Field(default=100, ge=1, le=10000, description="The newest this many.")
    follow: bool = Field(
        default=False,
        description="Stream server-sent events: the matching history, then every new event.",
    )


# -- responses --------------------------------------------------------------------------


class FieldError(BaseModel):
    field: str
    reason: str


class Problem(BaseModel):
    """An error (RFC 9457, application/problem+json). `errors` names each field."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[FieldError] = Field(default_factory=list)


class Pool(BaseModel):
    upstreams: list[UpstreamEntry]
    version: str


class Split(BaseModel):
    live: Color
    candidate: Color
    candidate_weight: int = Field(description="Basis points.")
    shares: dict[Color, float] = Field(
        description="Percent of the traffic per color, as the split sets it."
    )
    effective_shares: dict[Color, float] = Field(
        description="Percent of the split's traffic the data plane routes to each color now: "
        "`shares`, unless a color has no routable upstream (its share then goes to the "
        "other; with neither, both are 0 and requests get 503). Pins and previews aside."
    )
    sticky_key: str
    salt_id: str = Field(description="A digest of the sticky salt (the salt is not shown).")


class Rules(BaseModel):
    rules: list[PinSettings]


class DrainResult(BaseModel):
    upstreams: list[str]
    finished: bool = Field(description="False when the call did not wait.")
    drained: bool = Field(description="Nothing was cut (always true without wait).")
    cut: int = 0
    tunnels_closed: int = 0
    seconds: float = 0.0


class Undrained(BaseModel):
    upstreams: list[str] = Field(description="Upstreams put back (those that were drained).")


class Upstream(BaseModel):
    id: str
    address: str
    weight: int
    routable: bool
    health: Literal["up", "down", "unknown", "unchecked"] = Field(
        description='"unknown": no verdict yet, not routable; "unchecked": the pool turned '
        "its checks off (health.enabled = false), routable without any check."
    )
    health_check: str = Field(description='The check: "TCP connect", "GET /readyz", ...')
    health_reason: str
    ejected_for: float | None = Field(description="Seconds left of an outlier ejection.")
    drained: bool
    state: UpstreamState = Field(
        description="Why it is routable or not, the first that applies: drained (an "
        "operator drained it), ejected (outlier ejection), then its health: down, unknown "
        "(checked, no verdict yet), up, unchecked (health.enabled = false). Routable: up "
        "and unchecked."
    )
    in_flight: int
    tunnels: int


class Window(BaseModel):
    seconds: float
    requests: int
    errors: int
    requests_per_second: float
    error_rate: float
    p50_ms: float | None
    p99_ms: float | None
    routes: dict[str, int] = Field(
        description="Responses by how their color was chosen: split (all one way), "
        "bucket (sticky bucket), preview, pin."
    )
    pending: int = Field(description="Requests in flight at the last tick.")
    oldest_pending_ms: float | None = Field(
        description="Age of the oldest request in flight at the last tick."
    )


class PoolStatus(BaseModel):
    version: str
    share: float = Field(
        description="Percent of the traffic the split gives this color, as configured (the "
        "config file or the API); see effective_share."
    )
    effective_share: float = Field(
        description="Percent of the split's traffic the data plane routes to this color "
        "now: `share`, unless a color has no routable upstream (its share then goes to the "
        "other; with neither, 0). Pins and previews aside."
    )
    upstreams: list[Upstream]
    window: Window


class PlanStep(BaseModel):
    weight: float = Field(description="The candidate's share in this step, percent.")
    hold: float = Field(description="Seconds the step holds.")


RolloutStateName = Literal[
    "idle",
    "preflight",
    "step",
    "paused",
    "baking",
    "finishing",
    "done",
    "rolled_back",
    "aborted",
    "frozen",
    "failed",
]


class RolloutEntry(BaseModel):
    time: float = Field(description="Seconds since the epoch.")
    state: RolloutStateName
    step: int
    reason: str
    actor: Literal["api", "cli", "auto", "config", "fleet"]

    @computed_field(description="`time` in RFC 3339, UTC, to the millisecond.")  # type: ignore[prop-decorator]
    @property
    def timestamp(self) -> str:
        return rfc3339(self.time)


# The share of the evidence needed to fail: 0 none, 1 or more failed (shown up to 1000:
# with a limit of 0, one event is infinite evidence).
Evidence = Annotated[float, Field(ge=0, le=1000)]


class JudgeCandidate(BaseModel):
    requests: int = Field(description="The candidate's requests over the phase.")
    errors: int = Field(
        description="Of those, 5xx answers, upstream failures (connect, timeout, reset), "
        "and requests counted as failed while pending past hang_after_ms."
    )
    error_rate: float | None = Field(description="errors / requests, 0-1; null: no request.")
    error_rate_bounds: tuple[float, float] = Field(
        description="A 95% confidence interval of the error rate (anytime-valid: it holds "
        "however often it is read), 0-1."
    )
    pending_failed: int = Field(
        description="Requests counted as failed while still pending past hang_after_ms."
    )


class JudgeReference(BaseModel):
    requests: int = Field(description="The live color's requests since the rollout began.")
    errors: int
    error_rate: float | None = Field(description="0-1; null: no request.")
    p50_ms: float | None = Field(description="The live color's median latency.")
    p99_ms: float | None
    frozen: bool = Field(
        description="True from promotion on: the bake compares with the old live color as "
        "it was before the switch."
    )


class JudgeTest(BaseModel):
    limit: float | None = Field(
        description="The share of the trials allowed to be events: an error rate, the "
        "share of requests allowed to be slower than the test's latency bound (p50_vs_live "
        "0.5, p99_vs_live and p99 0.01), or the candidate's share of both colors' errors."
    )
    observed: float | None = Field(description="events / trials; null: no trial yet.")
    events: int = Field(description="Errors, or requests slower than the test's bound.")
    trials: int = Field(description="What the test has seen: see `of`.")
    evidence: Evidence = Field(
        description="The share of the evidence needed to fail the candidate: 0 none, 1 or "
        "more failed; 1000 at most (one error where the limit allows none is infinite)."
    )
    of: Literal["requests", "errors"] = Field(
        default="requests",
        description='The trials: "requests" (the candidate\'s), or "errors" (those of both '
        "colors, for errors_by_color: events are the candidate's, limit the share of them "
        "it may have at max_error_ratio).",
    )
    excess: float | None = Field(
        default=None,
        description="errors_vs_live and errors_by_color: the candidate's recent error rate "
        "minus live's; they fail it only above max_error_rate_over_live.",
    )


class JudgeNumbers(BaseModel):
    """The evidence behind a verdict, as every rollout event carries it. Keys the judge
    adds later pass through unchanged; `recent` is the sliding window (as in the status)."""

    model_config = ConfigDict(extra="allow")

    phase: str | None = Field(default=None, description='The judged phase: "step 2" or "bake".')
    hold_left_seconds: float | None = Field(
        default=None, description="Seconds left of the step's hold or of the bake."
    )
    candidate: JudgeCandidate | None = Field(
        default=None, description="The candidate over the phase (the step, or the bake)."
    )
    reference: JudgeReference | None = Field(
        default=None,
        description="The live color the candidate is compared with, over the rollout until "
        "promotion.",
    )
    hang_after_ms: float | None = Field(
        default=None, description="A candidate request pending longer counts as failed."
    )
    tests: dict[str, JudgeTest] = Field(
        default_factory=dict,
        description="The judge's tests by name: errors (absolute error rate), "
        "errors_vs_live, errors_by_color (steps under 100%), p50_vs_live, p99_vs_live, p99 "
        "(absolute max_p99). Only the "
        "configured ones.",
    )
    evidence: Evidence | None = Field(
        default=None, description="The largest evidence of the tests."
    )
    recent: dict[str, dict[str, Any]] | None = Field(
        default=None, description="candidate and live over the judge's sliding window."
    )
    requests_needed: int | None = Field(
        default=None,
        description="Candidate requests still needed before the phase may pass (min_requests).",
    )
    eta_seconds: float | None = Field(
        default=None,
        description="When those requests should be in, at the candidate's recent rate; "
        "null: no estimate.",
    )
    no_active_users: bool = Field(
        default=False,
        description="The candidate's share holds no active user right now (sticky buckets "
        "and few users): no estimate until one comes.",
    )


class Judge(BaseModel):
    """The judge's latest verdict on the rollout (its last, once ended)."""

    verdict: Literal["pass", "hold", "fail"] = Field(
        description="pass: no alarm and enough requests; hold: too little evidence to pass "
        "yet; fail: an alarm (the rollout rolls back, or freezes)."
    )
    reason: str
    numbers: JudgeNumbers


class Rollout(BaseModel):
    """The current (or last) rollout; state "idle" when there has been none."""

    state: RolloutStateName = "idle"
    id: int | None = None
    candidate: Color | None = None
    previous: Color | None = Field(default=None, description="The live color it started from.")
    plan: str | None = None
    step: int | None = Field(default=None, description="1-based, while stepping.")
    steps: int | None = None
    plan_steps: list[PlanStep] = Field(
        default_factory=list,
        description="The plan's steps as the config has them now; empty when it has no such plan.",
    )
    bake: float | None = Field(default=None, description="Seconds of the plan's bake.")
    share: float | None = Field(
        default=None,
        description="The candidate's share now, percent; none for an older rollout than the last.",
    )
    reason: str = ""
    history: list[RolloutEntry] = Field(default_factory=list)
    judge: Judge | None = Field(
        default=None,
        description="The judge's latest verdict and its numbers; null before the judge had "
        "traffic to read, and for a rollout that ended before zdproxy restarted.",
    )


class RollingStart(Body):
    """POST /v1/rolling: update a pool's upstreams one by one with a hook of the config."""

    color: Color
    hook: str = Field(min_length=1, max_length=200, description="A [hooks.NAME] of the config.")
    max_unavailable: int = Field(default=1, ge=1, le=100, description="Upstreams out at once.")


class Rolling(BaseModel):
    """The current (or last) rolling update; state "idle" when there has been none."""

    state: Literal["idle", "running", "done", "failed"] = "idle"
    id: int | None = None
    color: Color | None = None
    hook: str | None = None
    max_unavailable: int | None = None
    updated: list[str] = Field(default_factory=list)
    pending: list[str] = Field(default_factory=list)
    reason: str = ""


class RolloutStart(Body):
    """POST /v1/rollouts: deploy a color with a plan of the config file."""

    color: Color
    plan: str | None = Field(
        default=None, max_length=200, description="Default: rollout.default_plan or the first."
    )


class PinFallback(BaseModel):
    """Pins that lead to the candidate of the last rollout, rolled back, aborted or
    failed: their users go to the live color until the next deploy."""

    rollout: int
    outcome: RolloutStateName
    color: Color = Field(description="The failed candidate.")
    live: Color
    rules: list[str] = Field(description="The rules that fall back to the live color.")
    staying: list[str] = Field(description='The rules with after_rollback = "stay".')
    reason: str


class Worker(BaseModel):
    """A data-plane worker process (proxy.workers above 1)."""

    index: int = Field(description="From 1; a replacement takes the place of the one it replaced.")
    pid: int | None = Field(description="None while the worker is being replaced.")
    snapshot_version: int = Field(
        description="The routing snapshot the worker routes by (-1 before it reported)."
    )
    current: bool = Field(description="True when that is the control plane's latest snapshot.")
    connections: int = Field(description="Client connections open.")
    requests: int = Field(description="Requests in flight.")
    restarts: int = Field(description="Processes that ended unasked here and were replaced.")
    lost_requests: int = Field(description="Requests in flight lost with them.")
    uptime_seconds: float = Field(description="Since the current process started.")


class Status(BaseModel):
    version: str = Field(description="zdproxy's own version.")
    uptime_seconds: float
    pools: dict[Color, PoolStatus]
    split: Split
    rules: list[PinSettings]
    pin_fallback: PinFallback | None = Field(
        default=None, description="None unless the last rollout failed (see PinFallback)."
    )
    rollout: Rollout
    journal: list[str] = Field(description="Items of the state journal that override the file.")
    workers: list[Worker] = Field(
        default_factory=list,
        description="The data-plane worker processes; empty when one process serves "
        "(proxy.workers = 1).",
    )
    fleet: Membership | None = Field(
        default=None, description="This member in its fleet; None without [fleet]."
    )


class Event(EventRecord):
    """One decision. The event file holds the same model, one per line: a line that does
    not fit it is skipped when zdproxy reads the file back (control/events.py)."""


class Events(BaseModel):
    events: list[Event]


class ReloadResult(BaseModel):
    """POST /v1/reload: the config file was read again and applied."""

    result: Literal["applied", "unchanged"] = Field(
        description="unchanged: the file gives the same values as the running ones."
    )
    source: str = Field(description="The config file read.")
    changed: list[str] = Field(description="Options whose value changed, e.g. split.live.")
    needs_restart: list[str] = Field(
        description="Of those, the ones read only at start: they take effect after a restart."
    )


class Health(BaseModel):
    status: Literal["ok", "ready"]
