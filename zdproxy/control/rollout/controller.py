"""The rollout state machine: take a candidate from zero to live, and back the moment
it misbehaves.

    preflight (healthy upstreams, pre_rollout and verify hooks)
      -> step 1..n (weight, hold, judged every tick)
      -> baking (candidate live, the old live pool kept warm, still judged)
      -> finishing (drain the old pool, post_promote hooks) -> done

`paused` holds a step (the judge still runs); rolled_back, aborted, frozen and
failed end a rollout. Rollback wins over pauses and holds: it is one snapshot swap
(the old live color back, the candidate at 0) on the judge's tick. Every state has
a deadline and a declared outcome. The state is journaled on every transition, so
a restarted zdproxy resumes the rollout with the judge armed (the hold restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from zdproxy.config.plans import PlanSettings
from zdproxy.config.settings import Color
from zdproxy.control.desired import Refused
from zdproxy.control.events import Actor
from zdproxy.control.hooks import HookResult, run_hook
from zdproxy.control.judge import Judge, Verdict
from zdproxy.routing.preview import mint_token

if TYPE_CHECKING:
    from zdproxy.control.plane import ControlPlane

log = logging.getLogger("zdproxy.rollout")

ACTIVE = ("preflight", "step", "paused", "baking", "finishing")
FAILED = ("rolled_back", "aborted", "frozen", "failed")
PREVIEW_TTL = 3600  # seconds a verify hook's signed preview token is valid


@dataclass
class RolloutState:
    """What is journaled: enough to resume after a crash."""

    id: int
    candidate: Color
    previous: Color
    plan: str
    state: str = "preflight"
    step: int = 0  # 1-based while stepping; 0 before
    reason: str = ""
    hooks_done: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Ended(Exception):
    """The rollout left its active states (rolled back, aborted, frozen, failed)."""


class Rollouts:
    """Runs at most one rollout at a time on behalf of the control plane."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.current: RolloutState | None = None
        self.counts: dict[str, int] = dict.fromkeys(("done", *FAILED), 0)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # pause, resume, promote: look again now
        self._promote = False
        self._resumed = False
        self._hooks_after: set[asyncio.Task[None]] = set()  # on_rollback hooks, after the swap

    def active(self) -> RolloutState | None:
        """The running rollout, if any."""
        current = self.current
        return current if current is not None and current.state in ACTIVE else None

    # -- commands ----------------------------------------------------------------------

    def start(self, color: Color, plan_name: str | None, actor: Actor) -> RolloutState:
        settings = self.control.settings
        if self.current is not None and self.current.state in ACTIVE:
            raise Refused("color", f"rollout {self.current.id} is {self.current.state}")
        if not settings.plans:
            raise Refused("plan", "the config file declares no [plans]", 400)
        name = plan_name or settings.rollout.default_plan or next(iter(settings.plans))
        if name not in settings.plans:
            raise Refused("plan", f"no plan {name!r} (known: {', '.join(settings.plans)})", 400)
        live = settings.split.live
        if color == live:
            raise Refused("color", f"{color} is already live: deploy to the other color")
        rolling = self.control.rolling.current
        if rolling is not None and rolling.state == "running":
            raise Refused("color", f"rolling update {rolling.id} of {rolling.color} is running")
        number = (self.current.id if self.current else 0) + 1
        rollout = RolloutState(number, color, live, name)
        self.control.undrain(color=color, actor=actor)  # a deploy wants traffic there
        # No user request reaches the candidate before its preflight and hooks passed.
        weight = self.control.share(color)
        split = (0, live) if weight else None
        self._enter(rollout, "preflight", f"deploy {color} with plan {name}", actor, split=split)
        self._launch()
        return rollout

    def pause(self, actor: Actor) -> RolloutState:
        rollout = self._active("pause", ("step",))
        self._enter(rollout, "paused", "paused", actor)
        return rollout

    def resume(self, actor: Actor) -> RolloutState:
        rollout = self._active("resume", ("paused",))
        self._resumed = True  # even if the run never saw the pause (both within a tick)
        self._enter(rollout, "step", "resumed: the step's hold starts again", actor)
        return rollout

    def promote(self, actor: Actor) -> RolloutState:
        rollout = self._active("promote", ("step", "paused"))
        self._promote = True
        self._event("rollout_promote", "promote: skip the remaining steps", actor)
        self._wake.set()
        return rollout

    def abort(self, actor: Actor) -> RolloutState:
        rollout = self._active("abort", ACTIVE)
        self._rollback(rollout, "aborted", f"aborted by {actor}", actor, {})
        return rollout

    def retry(self, actor: Actor) -> RolloutState:
        if self.current is None or self.current.state not in FAILED:
            raise Refused("state", "retry needs a rolled back, aborted, frozen or failed rollout")
        return self.start(self.current.candidate, self.current.plan, actor)

    def resume_after_restart(self, journaled: dict[str, Any]) -> None:
        """At start: continue an active rollout from the journal (holds restart)."""
        rollout = RolloutState(**journaled)
        self.current = rollout
        if rollout.state not in ACTIVE:
            return
        if rollout.plan not in self.control.settings.plans:
            reason = f"plan {rollout.plan!r} is no longer in the config file"
            self._rollback(rollout, "failed", reason, "auto", {})
            return
        self._event("rollout_resumed", f"resumed in {rollout.state} after a restart", "auto")
        self._launch()

    async def close(self) -> None:
        for task in (self._task, *self._hooks_after):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- the run -------------------------------------------------------------------------

    def _launch(self) -> None:
        self._promote = False
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        rollout = self.current
        assert rollout is not None
        plan = self.control.settings.plans[rollout.plan]
        try:
            if rollout.state == "preflight":
                await self._preflight(rollout, plan)
            while rollout.state in ("step", "paused"):
                await self._step(rollout, plan)
            if rollout.state == "baking":
                await self._bake(rollout, plan)
            if rollout.state == "finishing":
                await self._finish(rollout, plan)
        except _Ended:
            return
        except Exception as exc:  # a bug must not leave traffic half-shifted in silence
            log.exception("rollout %d failed", rollout.id)
            self._rollback(rollout, "failed", f"internal error: {exc!r}", "auto", {})

    async def _preflight(self, rollout: RolloutState, plan: PlanSettings) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + plan.preflight_timeout
        while (healthy := self._healthy(rollout.candidate)) < plan.min_healthy:
            if loop.time() >= deadline:
                reason = (
                    f"{rollout.candidate} has {healthy} healthy upstreams of {plan.min_healthy} "
                    f"needed after {plan.preflight_timeout:g}s"
                )
                self._rollback(rollout, "aborted", reason, "auto", {"healthy": healthy})
            await asyncio.sleep(0.1)
        for name in (*plan.pre_rollout, *plan.verify):
            if name in rollout.hooks_done:
                continue  # ran before a restart
            result = await self._hook(rollout, name)
            if not result.ok:
                reason = f"hook {name} failed: {result.status}"
                self._rollback(rollout, "aborted", reason, "auto", result.to_dict())
            rollout.hooks_done.append(name)
            self._journal(rollout)
        self._enter(rollout, "step", "preflight passed", "auto", step=1)

    async def _step(self, rollout: RolloutState, plan: PlanSettings) -> None:
        step = plan.steps[rollout.step - 1]
        weight = round(step.weight * 100)
        split = self.control.settings.split
        if split.live != rollout.previous or split.candidate_weight != weight:
            self.control.set_split(
                weight, live=rollout.previous, force=True, actor="auto", rollout=rollout.to_dict()
            )
        loop = asyncio.get_running_loop()
        judged_from = held_from = loop.time()  # the judge's window, and the hold's start
        judge = Judge(plan.judge)
        while True:
            verdict = await self._judge_tick(rollout, plan, judge, since=judged_from)
            if self._promote:
                self._promote = False
                self._promoted(rollout, "promoted by hand")
                return
            if rollout.state == "paused" or self._resumed:
                self._resumed = False
                held_from = loop.time()  # still judged; the hold starts again on resume
                continue
            elapsed = loop.time() - held_from
            if elapsed < step.hold:
                continue
            if verdict.outcome == "pass":
                break
            if verdict.outcome == "inconclusive" and plan.inconclusive == "fail":
                self._fail(rollout, plan, verdict)
            if elapsed >= plan.step_deadline:
                self._enter(
                    rollout,
                    "paused",
                    f"step {rollout.step} has no verdict after {plan.step_deadline:g}s: "
                    f"{verdict.reason}; resume, promote or abort",
                    "auto",
                    level=logging.WARNING,
                )
        if rollout.step < len(plan.steps):
            passed = f"step {rollout.step} passed"
            self._enter(rollout, "step", passed, "auto", step=rollout.step + 1)
        else:
            self._promoted(rollout, f"step {rollout.step} passed")

    async def _bake(self, rollout: RolloutState, plan: PlanSettings) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        judge = Judge(plan.judge)
        while loop.time() - began < plan.bake:
            await self._judge_tick(rollout, plan, judge, since=began)
        self._enter(rollout, "finishing", "bake passed", "auto")

    async def _finish(self, rollout: RolloutState, plan: PlanSettings) -> None:
        ids = self.control.start_drain(color=rollout.previous, actor="auto")
        await self.control.wait_drained(ids, cut_after=30.0, tunnel_grace=5.0, actor="auto")
        for name in plan.post_promote:
            if name not in rollout.hooks_done:
                await self._hook(rollout, name)
                rollout.hooks_done.append(name)
                self._journal(rollout)
        self.counts["done"] += 1
        reason = f"{rollout.candidate} is live; {rollout.previous} drained"
        self._enter(rollout, "done", reason, "auto")

    async def _judge_tick(
        self, rollout: RolloutState, plan: PlanSettings, judge: Judge, since: float
    ) -> Verdict:
        """Wait one tick (or a command), then judge the candidate; a failure ends here."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), plan.judge.tick)
        now = asyncio.get_running_loop().time()
        telemetry = self.control.telemetry
        other = rollout.previous
        candidate = telemetry.view(rollout.candidate, now, plan.judge.window, since)
        live = telemetry.view(other, now, plan.judge.window, since)
        verdict = judge.assess(candidate, live)
        if verdict.outcome == "fail":
            self._fail(rollout, plan, verdict)
        return verdict

    # -- transitions ---------------------------------------------------------------------

    def _promoted(self, rollout: RolloutState, reason: str) -> None:
        """The candidate becomes live; the old live pool stays warm for the bake."""
        baking = f"{reason}: {rollout.candidate} is live, baking"
        self._enter(rollout, "baking", baking, "auto", split=(0, rollout.candidate))

    def _fail(self, rollout: RolloutState, plan: PlanSettings, verdict: Verdict) -> None:
        if plan.on_failure == "freeze":
            self.counts["frozen"] += 1
            self._enter(
                rollout,
                "frozen",
                f"judge failed {rollout.candidate}: {verdict.reason}; frozen (no rollback: "
                "its migrations are not backward compatible)",
                "auto",
                level=logging.ERROR,
                numbers=verdict.numbers,
            )
            raise _Ended
        reason = f"judge failed {rollout.candidate}: {verdict.reason}"
        self._rollback(rollout, "rolled_back", reason, "auto", verdict.numbers)

    def _rollback(
        self, rollout: RolloutState, state: str, reason: str, actor: Actor, numbers: dict[str, Any]
    ) -> None:
        """One snapshot swap: the old live color back, the candidate at 0. Raises _Ended
        when called from the run itself; a command (abort) stops the run instead."""
        control = self.control
        shifted = (
            control.share(rollout.candidate) > 0 or control.settings.split.live != rollout.previous
        )
        if shifted and rollout.state == "finishing":  # the old color was being drained
            control.undrain(color=rollout.previous, actor=actor)
        self.counts[state] += 1
        split = (0, rollout.previous) if shifted else None
        self._enter(
            rollout, state, reason, actor, level=logging.ERROR, numbers=numbers, split=split
        )
        plan = self.control.settings.plans.get(rollout.plan)
        if shifted and plan is not None and plan.on_rollback:
            hooks = asyncio.ensure_future(self._on_rollback(rollout, plan))
            self._hooks_after.add(hooks)
            hooks.add_done_callback(self._hooks_after.discard)
        task = self._task
        if task is not None and task is asyncio.current_task():
            raise _Ended
        if task is not None:
            task.cancel()

    async def _on_rollback(self, rollout: RolloutState, plan: PlanSettings) -> None:
        for name in plan.on_rollback:
            await self._hook(rollout, name)

    async def _hook(self, rollout: RolloutState, name: str) -> HookResult:
        result = await run_hook(name, self.control.settings.hooks[name], self._hook_env(rollout))
        level = logging.INFO if result.ok else logging.ERROR
        self._event("hook", f"{name}: {result.status}", "auto", level=level, **result.to_dict())
        return result

    def _enter(
        self,
        rollout: RolloutState,
        state: str,
        reason: str,
        actor: Actor,
        *,
        step: int | None = None,
        level: int = logging.INFO,
        numbers: dict[str, Any] | None = None,
        split: tuple[int, Color] | None = None,
    ) -> None:
        """Move to `state`; with `split` (weight, live color), the split changes in the
        same journal write."""
        rollout.state = state
        rollout.reason = reason
        if step is not None:
            rollout.step = step
        entry = {"time": time.time(), "state": state, "step": rollout.step, "reason": reason}
        rollout.history.append({**entry, "actor": actor})
        del rollout.history[:-100]  # bounded
        self.current = rollout
        if split is None:
            self._journal(rollout)
        else:
            weight, live = split
            self.control.set_split(
                weight, live=live, force=True, actor=actor, rollout=rollout.to_dict()
            )
        self._event(f"rollout_{state}", reason, actor, level=level, numbers=numbers or {})
        self._wake.set()

    def _journal(self, rollout: RolloutState) -> None:
        try:
            self.control.desired.change({"rollout": rollout.to_dict()}, "auto")
        except Refused as exc:  # the rollout goes on; a restart would not know it
            self.control.events.emit("journal_unwritable", str(exc), level=logging.ERROR)

    def _event(
        self, kind: str, reason: str, actor: Actor, level: int = logging.INFO, **data: Any
    ) -> None:
        rollout = self.current
        ids = {"rollout": rollout.id, "candidate": rollout.candidate} if rollout else {}
        self.control.events.emit(kind, reason, actor=actor, level=level, **ids, **data)

    def _active(self, verb: str, states: tuple[str, ...]) -> RolloutState:
        rollout = self.current
        if rollout is None or rollout.state not in states:
            now = "no rollout" if rollout is None else f"rollout {rollout.id} is {rollout.state}"
            raise Refused("state", f"cannot {verb}: {now}")
        return rollout

    def _healthy(self, color: Color) -> int:
        return sum(self.control.routable(t.id) for t in self.control.targets_of(color))

    def _hook_env(self, rollout: RolloutState) -> dict[str, str]:
        """What a hook needs to reach the candidate: its addresses and a preview."""
        settings = self.control.settings
        preview = settings.preview
        secret = preview.signing_secret
        expiry = int(time.time()) + PREVIEW_TTL
        value = mint_token(secret, rollout.candidate, expiry) if secret else rollout.candidate
        upstreams = [str(t.address) for t in self.control.targets_of(rollout.candidate)]
        listeners = [str(a) for a in self.control.listeners[:1]]
        return {
            "ZDPROXY_ROLLOUT": str(rollout.id),
            "ZDPROXY_CANDIDATE": rollout.candidate,
            "ZDPROXY_CANDIDATE_UPSTREAMS": " ".join(upstreams),
            "ZDPROXY_CANDIDATE_VERSION": settings.pool(rollout.candidate).version,
            "ZDPROXY_LIVE": rollout.previous,
            "ZDPROXY_PREVIEW_HEADER": preview.header,
            "ZDPROXY_PREVIEW_VALUE": value,
            "ZDPROXY_PROXY": listeners[0] if listeners else "",
        }
