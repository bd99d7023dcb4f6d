"""The admin API's endpoints: thin views and commands over the control plane."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from aiohttp import web
from pydantic import BaseModel

from zdproxy import __version__
from zdproxy.admin import models as m
from zdproxy.admin.app import ApiError, Call, Route
from zdproxy.admin.feed import LiveFeed
from zdproxy.admin.fleet_models import Membership
from zdproxy.admin.stream import stream_events
from zdproxy.config.changes import ReloadOutcome
from zdproxy.config.settings import COLORS, Color
from zdproxy.config.spelling import did_you_mean
from zdproxy.control.availability import effective_shares
from zdproxy.control.desired import Refused
from zdproxy.control.events import Actor
from zdproxy.control.phases import RolloutRecord
from zdproxy.control.plane import ControlPlane

ROLLOUT_ACTIONS = {
    "pause": "Hold the current step (the judge still runs)",
    "resume": "Continue a paused step (its hold starts again)",
    "promote": "Skip the remaining steps: the candidate goes live now",
    "abort": "Roll back: the old live color takes all traffic again",
    "retry": "Start a failed or aborted rollout again from its first step",
}


@dataclass
class ServiceState:
    """What the daemon tells the admin API about itself."""

    started: float = field(default_factory=time.monotonic)
    ready: bool = False  # listening, and the first health verdicts are in
    stopping: bool = False
    reloads: dict[str, int] = field(default_factory=lambda: {"applied": 0, "refused": 0})
    # The daemon's one reload (also behind SIGHUP and the file watch); None: no config file.
    reload: Callable[[Actor], ReloadOutcome] | None = None


class AdminAPI:
    def __init__(self, control: ControlPlane, service: ServiceState) -> None:
        self.control = control
        self.service = service
        self.feed = LiveFeed(control, self.current_status)  # AdminServer starts and closes it

    def routes(self) -> list[Route]:
        return [
            Route(
                "GET", "/healthz", "zdproxy's process is alive", self.healthz, m.Health, auth=False
            ),
            Route(
                "GET",
                "/readyz",
                "zdproxy is listening and may take traffic (503 while starting or stopping)",
                self.readyz,
                m.Health,
                auth=False,
            ),
            Route(
                "GET",
                "/v1/status",
                "Pools, health, split, rules and windows",
                self.status,
                m.Status,
                query=m.StatusQuery,
                streams=True,
                description="With follow, a text/event-stream (the dashboard's): each "
                "second the status and each color's traffic over that second, after the "
                "last 15 minutes of it.",
            ),
            Route(
                "GET", "/v1/pools/{color}", "A pool's upstreams and version", self.get_pool, m.Pool
            ),
            Route(
                "PUT",
                "/v1/pools/{color}",
                "Replace a pool's upstreams and version label",
                self.put_pool,
                m.Pool,
                body=m.PoolChange,
                description="New upstreams receive traffic only after passing their health "
                "checks. Refused (409) when the color takes traffic and none of its healthy "
                "upstreams would remain, unless force.",
            ),
            Route(
                "GET",
                "/v1/split",
                "The live color and the candidate's share",
                self.get_split,
                m.Split,
            ),
            Route(
                "PUT",
                "/v1/split",
                "Move the split",
                self.put_split,
                m.Split,
                body=m.SplitChange,
                description="Refused (409) when a color that would get traffic has no healthy "
                "upstream, unless force.",
            ),
            Route(
                "POST",
                "/v1/drain",
                "Take a color or one upstream out of rotation",
                self.drain,
                m.DrainResult,
                body=m.DrainRequest,
                description="New requests go elsewhere at once; requests in flight finish. "
                "With wait, answers when nothing is left in flight, cutting what still runs "
                "after cut_after seconds.",
            ),
            Route(
                "POST",
                "/v1/undrain",
                "Put drained upstreams back into rotation",
                self.undrain,
                m.Undrained,
                body=m.Target,
            ),
            Route("GET", "/v1/rollout", "The current or last rollout", self.get_rollout, m.Rollout),
            Route(
                "GET",
                "/v1/rollouts/{id}",
                "One rollout by its id (the active one and the last 50 ended)",
                self.get_rollout_by_id,
                m.Rollout,
                description="404 when the id is unknown: `zdproxy wait --until done:ID` waits "
                "for this one rollout, not whichever is current.",
            ),
            Route(
                "POST",
                "/v1/rollouts",
                "Deploy a color: start a rollout with a plan of the config file",
                self.start_rollout,
                m.Rollout,
                body=m.RolloutStart,
                description="Refused (409) while another rollout is active, or when the color "
                "is already live. Hooks are the plan's, from the config file.",
            ),
            *(
                Route(
                    "POST",
                    f"/v1/rollout/{action}",
                    summary,
                    partial(self.rollout_action, action),
                    m.Rollout,
                )
                for action, summary in ROLLOUT_ACTIONS.items()
            ),
            Route(
                "GET",
                "/v1/rolling",
                "The current or last rolling update",
                self.get_rolling,
                m.Rolling,
            ),
            Route(
                "POST",
                "/v1/rolling",
                "Update a pool's upstreams one at a time with a hook of the config file",
                self.start_rolling,
                m.Rolling,
                body=m.RollingStart,
                description="Each upstream is drained, the hook runs with its address in "
                "ZDPROXY_UPSTREAM, and it comes back after passing its health checks; the "
                "first failure stops the update. Refused (409) while one runs, or when it "
                "would leave a color that takes traffic with no upstream.",
            ),
            Route("GET", "/v1/rules", "The pin rules", self.get_rules, m.Rules),
            Route(
                "PUT",
                "/v1/rules",
                "Replace the pin rules",
                self.put_rules,
                m.Rules,
                body=m.RulesChange,
            ),
            Route(
                "GET",
                "/v1/events",
                "The event history, or a live stream (follow)",
                self.events,
                m.Events,
                query=m.EventsQuery,
                streams=True,
                description="With follow, a text/event-stream: the matching history, then every "
                "new event as it happens; reconnect with Last-Event-ID to resume.",
            ),
            Route(
                "POST",
                "/v1/reload",
                "Read the config file again and apply it (as SIGHUP does)",
                self.reload,
                m.ReloadResult,
                description="All or nothing. Refused with 400 when the file is invalid (each "
                "field named in errors), or 409 when it conflicts with the running zdproxy: "
                "it would drop the admin token, or does not fit the journaled runtime "
                "changes. A refused reload changes nothing.",
            ),
        ]

    # -- zdproxy itself -----------------------------------------------------------------

    async def healthz(self, call: Call) -> BaseModel:
        return m.Health(status="ok")

    async def readyz(self, call: Call) -> BaseModel:
        if self.service.ready and not self.service.stopping:
            return m.Health(status="ready")
        raise ApiError(503, "starting" if not self.service.ready else "stopping")

    # -- views --------------------------------------------------------------------------

    def _pool(self, color: str) -> m.Pool:
        pool = self.control.settings.pool(color)
        return m.Pool(upstreams=pool.upstreams, version=pool.version)

    def _split(self) -> m.Split:
        split = self.control.settings.split
        effective = effective_shares(self.control.routing)
        return m.Split(
            live=split.live,
            candidate="green" if split.live == "blue" else "blue",
            candidate_weight=split.candidate_weight,
            shares={color: self.control.share(color) / 100 for color in COLORS},
            effective_shares={color: effective[color] / 100 for color in COLORS},
            sticky_key=split.sticky_key,
            salt_id=hashlib.sha256(split.salt.encode()).hexdigest()[:12],
        )

    def _upstreams(self, color: Color) -> list[m.Upstream]:
        control = self.control
        now = asyncio.get_running_loop().time()
        views = []
        configured = control.configured()
        for target in control.targets_of(color):
            health = control.health.state(target.id)
            check = configured[target.id][1]
            ejection = control.outliers.ejected.get(target.id)
            requests, tunnels = control.in_flight(target.id)
            views.append(
                m.Upstream(
                    id=target.id,
                    address=str(target.address),
                    weight=target.weight,
                    routable=control.routable(target.id),
                    health=control.health.verdict(target.id),
                    health_check=check.describe(),
                    health_reason="" if health is None else health.reason,
                    ejected_for=None if ejection is None else max(0.0, ejection.until - now),
                    drained=target.id in control.drained,
                    state=control.upstream_state(target.id),
                    in_flight=requests,
                    tunnels=tunnels,
                )
            )
        return views

    async def status(self, call: Call) -> BaseModel | web.StreamResponse:
        query: m.StatusQuery = call.query
        if query.follow:
            return await self.feed.stream(call.request)
        return self.current_status()

    def current_status(self) -> m.Status:
        control = self.control
        now = asyncio.get_running_loop().time()
        effective = effective_shares(control.routing)
        pools = {
            color: m.PoolStatus(
                version=control.settings.pool(color).version,
                share=control.share(color) / 100,
                effective_share=effective[color] / 100,
                upstreams=self._upstreams(color),
                window=m.Window.model_validate(control.telemetry.view(color, now).to_dict()),
            )
            for color in COLORS
        }
        return m.Status(
            version=__version__,
            uptime_seconds=round(time.monotonic() - self.service.started, 3),
            pools=pools,
            split=self._split(),
            rules=control.settings.pins,
            pin_fallback=self._pin_fallback(),
            rollout=self._rollout(),
            journal=sorted(control.desired.items),
            workers=self._workers(),
            fleet=Membership.model_validate(fleet) if (fleet := control.fleet.status()) else None,
        )

    def _workers(self) -> list[m.Worker]:
        current = self.control.routing.version
        return [
            m.Worker(
                index=worker.index,
                pid=worker.pid,
                snapshot_version=worker.version,
                current=worker.version == current,
                connections=worker.connections,
                requests=worker.requests,
                restarts=worker.restarts,
                lost_requests=worker.lost,
                uptime_seconds=worker.uptime,
            )
            for worker in self.control.workers()
        ]

    def _pin_fallback(self) -> m.PinFallback | None:
        fallback = self.control.pin_fallback()
        return m.PinFallback.model_validate(fallback.to_dict()) if fallback else None

    def _rollout(self, record: RolloutRecord | None = None) -> m.Rollout:
        rollouts = self.control.rollouts
        record = record or rollouts.last
        if record is None:
            return m.Rollout()
        plan = self.control.settings.plans.get(record.plan)
        verdict = rollouts.verdict(record.id)
        judge = None
        if verdict is not None:
            judge = {
                "verdict": verdict.outcome,
                "reason": verdict.reason,
                "numbers": verdict.numbers,
            }
        return m.Rollout.model_validate(
            {
                **record.model_dump(mode="json", exclude={"hooks_done"}),
                "step": record.step or None,
                "steps": len(plan.steps) if plan else None,
                "plan_steps": [{"weight": s.weight, "hold": s.hold} for s in plan.steps]
                if plan
                else [],
                "bake": plan.bake if plan else None,
                # Today's split says nothing of an older rollout's share.
                "share": self.control.share(record.candidate) / 100
                if record is rollouts.last
                else None,
                "judge": judge,
            },
            strict=False,
        )

    async def get_rollout(self, call: Call) -> BaseModel:
        return self._rollout()

    async def get_rollout_by_id(self, call: Call) -> BaseModel:
        text = call.param("id")
        record = self.control.rollouts.get(int(text)) if text.isdigit() else None
        if record is None:
            last = self.control.rollouts.last
            known = f"the last is {last.id}" if last is not None else "there has been none"
            raise Refused("id", f"no rollout {text} is known ({known})", 404)
        return self._rollout(record)

    async def start_rollout(self, call: Call) -> BaseModel:
        body: m.RolloutStart = call.body
        return self._rollout(await self.control.rollouts.deploy(body.color, body.plan, call.actor))

    async def rollout_action(self, action: str, call: Call) -> BaseModel:
        rollouts = self.control.rollouts
        if action == "retry":
            return self._rollout(await rollouts.retry(call.actor))
        commands = {
            "pause": rollouts.pause,
            "resume": rollouts.resume,
            "promote": rollouts.promote,
            "abort": rollouts.abort,
        }
        return self._rollout(commands[action](call.actor))

    def _rolling(self) -> m.Rolling:
        rolling = self.control.rolling.current
        return m.Rolling() if rolling is None else m.Rolling.model_validate(rolling.to_dict())

    async def get_rolling(self, call: Call) -> BaseModel:
        return self._rolling()

    async def start_rolling(self, call: Call) -> BaseModel:
        body: m.RollingStart = call.body
        self.control.rolling.start(body.color, body.hook, body.max_unavailable, call.actor)
        return self._rolling()

    async def get_pool(self, call: Call) -> BaseModel:
        return self._pool(call.param("color"))

    async def get_split(self, call: Call) -> BaseModel:
        return self._split()

    async def get_rules(self, call: Call) -> BaseModel:
        return m.Rules(rules=self.control.settings.pins)

    # -- commands -----------------------------------------------------------------------

    async def reload(self, call: Call) -> BaseModel:
        if self.service.reload is None:
            raise ApiError(409, "zdproxy runs without a config file: nothing to reload")
        outcome = self.service.reload(call.actor)
        if not outcome.applied:
            errors = [m.FieldError(field=p.field, reason=p.reason) for p in outcome.problems]
            detail = "; ".join(str(problem) for problem in outcome.problems)
            raise ApiError(outcome.status, f"{outcome.source}: refused: {detail}", errors)
        return m.ReloadResult(
            result="applied" if outcome.changed else "unchanged",
            source=outcome.source,
            changed=outcome.changed,
            needs_restart=outcome.needs_restart,
        )

    async def put_pool(self, call: Call) -> BaseModel:
        body: m.PoolChange = call.body
        color: Color = "blue" if call.param("color") == "blue" else "green"
        self.control.set_pool(color, body, force=body.force, actor=call.actor)
        return self._pool(color)

    async def put_split(self, call: Call) -> BaseModel:
        body: m.SplitChange = call.body
        self.control.set_split(
            body.candidate_weight,
            live=body.live,
            salt=body.salt,
            force=body.force,
            actor=call.actor,
        )
        return self._split()

    async def put_rules(self, call: Call) -> BaseModel:
        body: m.RulesChange = call.body
        self.control.set_rules(body.rules, actor=call.actor)
        return m.Rules(rules=self.control.settings.pins)

    def _resolve(self, target: m.Target) -> None:
        try:
            self.control.resolve(target.color, target.upstream)
        except ValueError as exc:
            field = "upstream" if target.upstream is not None else "color"
            reason = str(exc)
            if target.upstream is not None:
                known = self.control.configured()
                reason += did_you_mean(target.upstream, known) or (
                    " (an upstream is COLOR/ADDRESS, as `zdproxy status` lists them)"
                )
            raise ApiError(404, reason, [m.FieldError(field=field, reason=reason)]) from None

    async def drain(self, call: Call) -> BaseModel:
        body: m.DrainRequest = call.body
        self._resolve(body)
        ids = self.control.start_drain(
            color=body.color, upstream=body.upstream, force=body.force, actor=call.actor
        )
        if not body.wait:
            return m.DrainResult(upstreams=sorted(ids), finished=False, drained=True)
        result = await self.control.wait_drained(
            ids, cut_after=body.cut_after, tunnel_grace=body.tunnel_grace, actor=call.actor
        )
        return m.DrainResult(finished=True, **{**result.to_dict(), "upstreams": sorted(ids)})

    async def undrain(self, call: Call) -> BaseModel:
        body: m.Target = call.body
        self._resolve(body)
        ids = self.control.undrain(color=body.color, upstream=body.upstream, actor=call.actor)
        return m.Undrained(upstreams=sorted(ids))

    # -- events -------------------------------------------------------------------------

    async def events(self, call: Call) -> BaseModel | web.StreamResponse:
        query: m.EventsQuery = call.query
        if query.follow:
            return await stream_events(call.request, self.control.events, query)
        history = self.control.events.history(query.since, query.kind)[-query.limit :]
        return m.Events(events=[m.Event(**e.to_dict()) for e in history])
