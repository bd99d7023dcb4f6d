"""One rollout: its record, its deadlines and the work it has in flight.

A rollout is moved on by `advance(now)`, called on every judge tick by its own
task (or by a test with a fake clock): each call looks at the clock, the judge and
the work in flight, and makes at most one transition. Commands (pause, resume,
promote, abort) are transitions made at once. The slow work (hooks, the drain of
the old color) runs as this rollout's job, and its result is read by a later tick.

Once ended, a rollout never writes again: `TRANSITIONS` has no way out of an end,
an end cancels the job in flight (and every job checks `ended` after each await),
and the control plane refuses record and split writes from any rollout but the one
that holds the split.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

from zdproxy.config.plans import PlanSettings
from zdproxy.config.settings import Color
from zdproxy.control.availability import unroutable
from zdproxy.control.desired import Refused
from zdproxy.control.events import Actor
from zdproxy.control.hooks import HookResult, run_hook
from zdproxy.control.judge import Judge, Reference, Verdict
from zdproxy.control.phases import (
    HISTORY,
    HistoryEntry,
    Phase,
    RolloutRecord,
    check_transition,
)
from zdproxy.control.ports import ControlHost
from zdproxy.control.telemetry import Telemetry, WindowView
from zdproxy.routing.preview import mint_token

log = logging.getLogger("zdproxy.rollout")

PREVIEW_TTL = 3600  # seconds a verify hook's signed preview token is valid
# A phase in the words of a message ("cannot pause rollout 4 (...): it is not at a step").
STATE_WORDS = {
    Phase.PREFLIGHT: "in preflight",
    Phase.STEP: "at a step",
    Phase.PAUSED: "paused",
    Phase.BAKING: "baking",
    Phase.FINISHING: "finishing",
    Phase.DONE: "done",
    Phase.ROLLED_BACK: "rolled back",
    Phase.ABORTED: "aborted",
    Phase.FROZEN: "frozen",
    Phase.FAILED: "failed",
}
DRAIN_CUT_AFTER = 30.0  # seconds the old color's requests get to finish after promotion
DRAIN_TUNNEL_GRACE = 5.0
# After a rollback, requests in flight on the failed color that cannot be replayed
# (a POST that reached the app) get this long to finish before they are cut.
EVACUATE_GRACE = 3.0


class Rollout:
    def __init__(
        self, record: RolloutRecord, plan: PlanSettings, host: ControlHost, now: float
    ) -> None:
        self.record = record
        self.plan = plan
        self.host = host
        self.entered = now  # when the phase (or step) began: its deadline counts from here
        self.held_from = now  # the step's hold; starts again on resume
        self.judged_from = now  # the phase's judge reads only slices that began after this
        self.reference = Reference()  # the old live color's traffic, until promotion
        self.own_reference = Reference()  # the same on this member alone (a fleet's leader)
        self.judge = self._judge(now)
        self.verdict: Verdict | None = None  # the last; None until the judge has records
        self.job: asyncio.Task[str | None] | None = None  # hooks or the drain; None: idle
        # False on a fleet member whose config lacks the rollout's plan (or its step): it
        # follows the split, and leaves the judging to the members that have the plan.
        self.judging = True
        self.after: set[asyncio.Task[None]] = set()  # evacuation, on_rollback hooks: after the swap

    @property
    def id(self) -> int:
        return self.record.id

    @property
    def ended(self) -> bool:
        return not self.record.state.active

    # -- commands ------------------------------------------------------------------------

    def pause(self, actor: Actor, now: float) -> None:
        self._expect("pause", Phase.STEP)
        self._move(Phase.PAUSED, "paused", actor)
        self.entered = now

    def resume(self, actor: Actor, now: float) -> None:
        self._expect("resume", Phase.PAUSED)
        self._move(Phase.STEP, "resumed: the step's hold starts again", actor)
        self.held_from = now

    def promote(self, actor: Actor, now: float) -> None:
        self._expect("promote", Phase.STEP, Phase.PAUSED)
        self._promoted("promoted by hand", actor, now)

    def abort(self, actor: Actor) -> None:
        self.end(Phase.ABORTED, f"aborted by {actor}", actor)

    # -- ticks ---------------------------------------------------------------------------

    def advance(self, now: float, *, drive: bool = True) -> None:
        """Look at the clock, the judge and the job; make at most one transition.
        `drive=False` (a fleet member that does not lead): only judge this member's
        slice, and roll back on a breach; the leader makes every other move."""
        state = self.record.state
        if not drive:
            if self.job is not None:  # it led, and no longer does: the leader runs it now
                self.job.cancel()
                self.job = None
            if self.judging and state in (Phase.STEP, Phase.PAUSED, Phase.BAKING):
                self._judged(now)
            return
        if state is Phase.PREFLIGHT:
            self._preflight(now)
        elif state in (Phase.STEP, Phase.PAUSED):
            self._step(now)
        elif state is Phase.BAKING:
            self._bake(now)
        elif state is Phase.FINISHING:
            self._finishing()

    def _preflight(self, now: float) -> None:
        """Health, then the pre_rollout and verify hooks; with `pre_rollout_first`, the
        pre_rollout hooks (a migration the candidate needs to become ready) come before
        the wait for health. The hooks done are journaled, so each stage is known."""
        plan, done = self.plan, self.record.hooks_done
        if self.job is not None:
            if not self.job.done():
                return
            failure = self._take_job()
            if failure is not None:
                self.end(Phase.ABORTED, failure, "auto")
                return
        pre_rollout = [name for name in plan.pre_rollout if name not in done]
        if plan.pre_rollout_first and pre_rollout:
            self.job = asyncio.ensure_future(self._hooks(pre_rollout))
            return
        healthy = self._healthy()
        # In a fleet, every member's candidate must be ready too (as each published it).
        short = self.host.short_members(self.record.candidate, plan.min_healthy)
        if healthy < plan.min_healthy or short:
            if now - self.entered >= plan.preflight_timeout:
                reason = (
                    f"{self.record.candidate} has {healthy} healthy upstreams of "
                    f"{plan.min_healthy} needed after {plan.preflight_timeout:g}s"
                    if healthy < plan.min_healthy
                    else f"members {', '.join(short)} have fewer than {plan.min_healthy} "
                    f"healthy {self.record.candidate} upstreams after "
                    f"{plan.preflight_timeout:g}s"
                )
                self.end(Phase.ABORTED, reason, "auto", {"healthy": healthy, "short": short})
            return
        hooks = [name for name in [*plan.pre_rollout, *plan.verify] if name not in done]
        if hooks:
            self.job = asyncio.ensure_future(self._hooks(hooks))
        else:
            self._enter_step(1, "preflight passed", now)

    def _step(self, now: float) -> None:
        verdict = self._judged(now)
        if verdict is None:
            return
        plan = self.plan
        if self.record.state is Phase.PAUSED:
            if now - self.entered >= plan.pause_timeout:
                reason = f"paused for {plan.pause_timeout:g}s (pause_timeout)"
                if plan.on_pause_timeout == "resume":
                    self._move(Phase.STEP, f"{reason}: resumed", "auto", level=logging.WARNING)
                    self.held_from = now
                else:
                    self.end(Phase.ROLLED_BACK, f"{reason}: rolled back", "auto")
            return
        number = self.record.step
        held = now - self.held_from
        if held < plan.steps[number - 1].hold:
            return
        if verdict.outcome == "pass":
            if number < len(plan.steps):
                self._enter_step(number + 1, f"step {number} passed", now)
            else:
                self._promoted(f"step {number} passed", "auto", now)
        elif verdict.outcome == "hold" and plan.inconclusive == "fail":
            self._fail(verdict)
        elif held >= plan.step_deadline:
            reason = (
                f"step {number} has no verdict after {plan.step_deadline:g}s: {verdict.reason}; "
                "resume, promote or abort"
            )
            self._move(Phase.PAUSED, reason, "auto", level=logging.WARNING)
            self.entered = now

    def _bake(self, now: float) -> None:
        """The bake ends after its time with a pass, as a step does; without one (a
        low error rate not yet told apart from its limit) it goes on, up to
        step_deadline more, and then ends as `inconclusive` says."""
        verdict = self._judged(now)
        plan = self.plan
        baked = now - self.entered
        if verdict is None or baked < plan.bake:
            return
        if verdict.outcome == "pass":
            self._finish_after("bake passed", now)
        elif baked >= plan.bake + plan.step_deadline:
            if plan.inconclusive == "fail":
                self._fail(verdict)
            else:
                reason = f"bake has no verdict {plan.step_deadline:g}s past its time: "
                self._finish_after(reason + verdict.reason, now, level=logging.WARNING)

    def _finish_after(self, reason: str, now: float, level: int = logging.INFO) -> None:
        self._move(Phase.FINISHING, reason, "auto", level=level)
        self.entered = now
        self.job = asyncio.ensure_future(self._finish())

    def _finishing(self) -> None:
        """Past its bake the candidate has won: whatever the drain or the post_promote hooks
        say, the rollout ends done (a failure is in the reason and the level), never rolled
        back onto the color just drained."""
        if self.job is None:  # resumed after a restart: drain (again) and run what is left
            self.job = asyncio.ensure_future(self._finish())
        elif self.job.done():
            try:
                failure = self._take_job()
            except Refused as exc:
                failure = str(exc)
            record = self.record
            reason = f"{record.candidate} is live; {record.previous} drained"
            level = logging.WARNING if failure else logging.INFO
            self._move(
                Phase.DONE, reason + (f"; but {failure}" if failure else ""), "auto", level=level
            )

    # -- transitions ---------------------------------------------------------------------

    def _enter_step(self, number: int, reason: str, now: float) -> None:
        weight = round(self.plan.steps[number - 1].weight * 100)
        self._move(Phase.STEP, reason, "auto", step=number, split=(weight, self.record.previous))
        self.entered = self.held_from = self.judged_from = now
        self.judge = self._judge(now)

    def _promoted(self, reason: str, actor: Actor, now: float) -> None:
        """The candidate becomes live; the old live color stays warm for the bake."""
        candidate = self.record.candidate
        baking = f"{reason}: {candidate} is live, baking"
        self.reference.frozen = True  # the bake compares with the old color before the switch
        self.own_reference.frozen = True
        self._move(Phase.BAKING, baking, actor, split=(0, candidate))
        self.entered = self.judged_from = now
        self.judge = self._judge(now)

    def _fail(self, verdict: Verdict) -> None:
        reason = f"judge failed {self.record.candidate}: {verdict.reason}"
        if self.plan.on_failure == "freeze":
            reason += "; frozen (no rollback: its migrations are not backward compatible)"
            self.end(Phase.FROZEN, reason, "auto", verdict.numbers, by="judge")
        else:
            self.end(Phase.ROLLED_BACK, reason, "auto", verdict.numbers, by="judge")

    def end(
        self,
        phase: Phase,
        reason: str,
        actor: Actor,
        numbers: dict[str, Any] | None = None,
        *,
        by: str = "",
    ) -> None:
        """End the rollout. Unless frozen, the traffic goes back to the old live color in
        one snapshot swap, in memory first: a disk that cannot take the journal write
        does not stop a rollback (an event says the journal is stale). `by`: see
        `emit`."""
        record = self.record
        if self.ended:
            return
        host = self.host
        shifted = phase is not Phase.FROZEN and (
            host.share(record.candidate) > 0 or host.settings.split.live != record.previous
        )
        if self.job is not None:  # jobs never end a rollout themselves: they return why
            self.job.cancel()
            self.job = None
        # The old color was being drained: back in rotation, in the same write as the swap.
        undrain = record.previous if shifted and record.state is Phase.FINISHING else None
        split = (0, record.previous) if shifted else None
        self._move(
            phase,
            reason,
            actor,
            level=logging.ERROR,
            numbers=numbers,
            split=split,
            undrain=undrain,
            by=by,
        )
        if shifted:  # the swap is applied: what the failed color still holds moves too
            moved = host.evacuate(record.candidate, EVACUATE_GRACE)
            self._after(self._evacuated(moved, record.candidate, record.previous, actor, by))
        if shifted and self.plan.on_rollback:
            self._after(self._on_rollback())

    # -- fleet mode: moves made by another member ------------------------------------------

    def same(self, record: RolloutRecord) -> bool:
        """`record` is of this rollout (two members may start rollouts of one id at
        once: the fleet keeps the one written first)."""
        mine = self.record
        return (record.id, record.candidate, record.previous, record.plan) == (
            mine.id,
            mine.candidate,
            mine.previous,
            mine.plan,
        )

    def drop(self) -> None:
        """This rollout lost the race to the fleet's record: it never ran, nothing of
        it is left to undo (the fleet's split is applied already)."""
        if self.job is not None:
            self.job.cancel()
            self.job = None

    def take(self, record: RolloutRecord, now: float, by: str, *, joined: bool = False) -> None:
        """Another member moved this rollout (`joined`: it runs here from now on): take
        its record, and do what the move means on this member: its timers and judge
        for a new step or the bake, its own drains of a color, its requests in flight
        after a rollback. The split came with the record."""
        old, self.record = self.record, record
        state = record.state
        if not joined and state is old.state and record.step == old.step:
            return
        if self.job is not None and state is not old.state:  # the other member's move wins
            self.job.cancel()
            self.job = None
        if state in (Phase.PREFLIGHT, Phase.STEP, Phase.PAUSED, Phase.BAKING) and (
            joined or old.state is Phase.PREFLIGHT
        ):
            # A deploy wants traffic on the candidate: its drain marks go on every member
            # (one that joins the rollout late too: its judge would find none routable).
            self.host.undrain(color=record.candidate, actor="fleet")
        if not state.active:
            self._ended_elsewhere(old.state, by)
        elif state is Phase.STEP and old.state is Phase.PAUSED and not joined:
            self.held_from = now  # resumed: the step's hold starts again
        elif state is Phase.STEP:
            self.entered = self.held_from = self.judged_from = now
            self.judge = self._judge(now)
        elif state is Phase.PAUSED:
            self.entered = now
        elif state is Phase.BAKING:
            self.reference.frozen = self.own_reference.frozen = True
            self.entered = self.judged_from = now
            self.judge = self._judge(now)
        elif state is Phase.FINISHING:  # each member drains its own old color
            self._after(self._drain_old())
        failed = not state.active and state is not Phase.DONE
        level = logging.ERROR if failed else logging.INFO
        numbers = self.verdict.numbers if self.verdict is not None else {}
        self.emit(f"rollout_{state}", record.reason, "fleet", by=by, level=level, numbers=numbers)

    def _ended_elsewhere(self, was: Phase, by: str) -> None:
        """The rollout ended on another member. Done: the old color is drained here too
        (if this member did not see it finish). Else, unless frozen, the fleet's split
        already sends everything to the old color: what the failed color holds here
        moves too, and a drain of the old color begun here is lifted."""
        record = self.record
        if record.state is Phase.DONE and was is not Phase.FINISHING:
            self._after(self._drain_old())  # its finishing never reached this member
        if record.state in (Phase.FROZEN, Phase.DONE) or was is Phase.PREFLIGHT:
            return
        moved = self.host.evacuate(record.candidate, EVACUATE_GRACE)
        self._after(self._evacuated(moved, record.candidate, record.previous, "fleet", by))
        if was is Phase.FINISHING:
            self.host.undrain(color=record.previous, actor="fleet")

    def _after(self, work: Coroutine[Any, Any, None]) -> None:
        """Work that follows the ending transition, kept until it is done."""
        task = asyncio.ensure_future(work)
        self.after.add(task)
        task.add_done_callback(self.after.discard)

    async def _evacuated(
        self, moved: Awaitable[tuple[int, int]], failed: str, live: str, actor: Actor, by: str
    ) -> None:
        replayed, left = await moved
        if replayed or left:
            self.emit(
                "evacuated",
                f"requests in flight on {failed}: {replayed} replayed on "
                f"{live}, {left} given {EVACUATE_GRACE:g}s to finish",
                actor,
                by=by,
                replayed=replayed,
                left=left,
            )

    def _move(
        self,
        phase: Phase,
        reason: str,
        actor: Actor,
        *,
        step: int | None = None,
        level: int = logging.INFO,
        numbers: dict[str, Any] | None = None,
        split: tuple[int, Color] | None = None,
        undrain: Color | None = None,
        by: str = "",
    ) -> None:
        """One transition, journaled with the split it brings, all or nothing: a refused
        journal write leaves the record as it was (an end is kept in memory anyway)."""
        record = self.record
        check_transition(record.state, phase)
        moved = record.model_copy(deep=True)
        moved.state = phase
        moved.reason = reason
        if step is not None:
            moved.step = step
        entry = HistoryEntry(
            time=time.time(), state=phase, step=moved.step, reason=reason, actor=actor
        )
        moved.history = [*moved.history, entry][-HISTORY:]
        value = moved.model_dump(mode="json")
        durable = phase.active  # an end happens whatever the disk says
        if split is None:
            self.host.save_rollout(value, durable=durable, undrain=undrain)
        else:
            self.host.steer(split[0], split[1], value, actor, durable=durable, undrain=undrain)
        self.record = moved
        if numbers is None:  # every rollout event carries the judge's latest numbers
            numbers = self.verdict.numbers if self.verdict is not None else {}
        self.emit(f"rollout_{phase}", reason, actor, by=by, level=level, numbers=numbers)

    # -- jobs: slow work of this rollout, fenced after every await ------------------------

    def _take_job(self) -> str | None:
        job, self.job = self.job, None
        assert job is not None
        return job.result()  # an exception here is a bug: the caller fails the rollout

    async def _hooks(self, names: list[str]) -> str | None:
        """Run the hooks not yet done (a restart skips those that passed); the reason
        of the first failure, or None."""
        for name in names:
            if name in self.record.hooks_done:
                continue
            result = await self._hook(name)
            if self.ended:
                return None
            if not result.ok:
                return f"hook {name} failed: {result.status}"
            done = self.record.model_copy(update={"hooks_done": [*self.record.hooks_done, name]})
            self.host.save_rollout(done.model_dump(mode="json"), durable=True)
            self.record = done
        return None

    async def _finish(self) -> str | None:
        await self._drain_old()
        if self.ended:
            return None
        return await self._hooks(self.plan.post_promote)

    async def _drain_old(self) -> None:
        """Drain the old live color of this member, and wait (bounded) for its requests."""
        host = self.host
        by = f"rollout {self.id}"
        ids = host.start_drain(color=self.record.previous, actor="auto", by=by)
        await host.wait_drained(
            ids, cut_after=DRAIN_CUT_AFTER, tunnel_grace=DRAIN_TUNNEL_GRACE, actor="auto", by=by
        )

    async def _on_rollback(self) -> None:
        """The ending transition's own hooks: they carry its id, after the swap."""
        for name in self.plan.on_rollback:
            await self._hook(name)

    async def _hook(self, name: str) -> HookResult:
        settings = self.host.settings
        result = await run_hook(name, settings.hooks[name], self._hook_env())
        level = logging.INFO if result.ok else logging.ERROR
        self.emit("hook", f"{name}: {result.status}", "auto", level=level, **result.to_dict())
        return result

    # -- helpers -------------------------------------------------------------------------

    def _judge(self, now: float) -> Judge:
        """A judge for a new phase: each judged phase (a step, the bake) gets an equal
        share of the rollout's false_rollback_rate."""
        plan, telemetry = self.plan, self.host.judged_telemetry()
        phases = len(plan.steps) + (1 if plan.bake else 0)
        self.seen = telemetry.latest or now  # records before this are not judged
        self.judged: Verdict | None = None  # this phase's last verdict (self.verdict: any)
        for reference, records in (
            (self.reference, telemetry),
            (self.own_reference, self.host.telemetry),
        ):
            if not reference.requests and not reference.frozen and self.seen:
                # Live's traffic from before the first step is the reference too: a plan
                # that starts at 100% leaves live no traffic to compare with afterwards.
                reference.add(records.view(self.record.previous, self.seen, plan.judge.window))
        # While live serves part of the traffic, errors can be compared by the color
        # they come from; at 100% and in the bake, only with the reference. (A step the
        # plan no longer has is a journaled record the restore fails at once.)
        step = self.record.step
        shared = (
            self.record.state is Phase.STEP
            and 0 < step <= len(plan.steps)
            and plan.steps[step - 1].weight < 100
        )
        # In a fleet, its judges (the leader's of the whole, each member's of its own
        # slice) share it too: any one of them rolls every member back.
        alpha = plan.judge.false_rollback_rate / phases / self.host.judges()
        # A fleet's leader judges the whole fleet (`judge`) and its own slice (`own`).
        self.own = Judge(plan.judge, alpha, self.own_reference, now, shared=shared)
        return Judge(plan.judge, alpha, self.reference, now, shared=shared)

    def _judged(self, now: float) -> Verdict | None:
        """Judge the candidate on the records that came since the last look; None when
        that failed it. No new records: the last verdict stands."""
        record, host = self.record, self.host
        if self._healthy() == 0:
            states = [host.upstream_state(t.id) for t in host.targets_of(record.candidate)]
            why = unroutable(record.candidate, states)
            reason = f"{record.candidate} has no routable upstream: {why}"
            self._fail(Verdict("fail", reason, self.verdict.numbers if self.verdict else {}))
            return None
        telemetry = host.judged_telemetry()
        latest = telemetry.latest
        if latest is None or latest <= self.seen:  # this phase's last verdict stands
            return self.judged or Verdict("hold", "waiting for this phase's first records")
        verdict = self.judge.assess(latest, *self._views(telemetry, latest))
        if telemetry is not host.telemetry and verdict.outcome != "fail":
            # A fleet's leader: its own slice can fail the candidate too, as any member's.
            own = self.own.assess(latest, *self._views(host.telemetry, latest))
            if own.outcome == "fail":
                verdict = Verdict("fail", f"on this member: {own.reason}", own.numbers)
        self.seen = latest
        verdict.numbers.update(self._progress(now))
        self.verdict = self.judged = verdict
        if verdict.outcome == "fail":
            self._fail(verdict)
            return None
        return verdict

    def _views(self, telemetry: Telemetry, latest: float) -> tuple[WindowView, ...]:
        """What the judge reads of one tick: each color's records since the last look,
        and over the judge's window in this phase."""
        record, window = self.record, self.plan.judge.window
        return (
            telemetry.view(record.candidate, latest, telemetry.retain, self.seen),
            telemetry.view(record.previous, latest, telemetry.retain, self.seen),
            telemetry.view(record.candidate, latest, window, self.judged_from),
            telemetry.view(record.previous, latest, window, self.judged_from),
        )

    def _progress(self, now: float) -> dict[str, Any]:
        """Where the phase stands in time, for the numbers."""
        record, plan = self.record, self.plan
        if record.state is Phase.BAKING:
            return {
                "phase": "bake",
                "hold_left_seconds": round(max(0.0, plan.bake - (now - self.entered)), 1),
            }
        hold = plan.steps[record.step - 1].hold if record.step else 0.0
        return {
            "phase": f"step {record.step}",
            "hold_left_seconds": round(max(0.0, hold - (now - self.held_from)), 1),
        }

    def _expect(self, verb: str, *states: Phase) -> None:
        if self.record.state not in states:
            allowed = " or ".join(STATE_WORDS[state] for state in states)
            raise Refused("state", f"cannot {verb} {self.describe()}: it is not {allowed}")

    def describe(self) -> str:
        """The rollout in a few words, for messages: "rollout 4 (green, step 2 of 4)"."""
        record = self.record
        of = f"step {record.step} of {len(self.plan.steps)}"
        where = {Phase.STEP: of, Phase.PAUSED: f"paused at {of}"}.get(
            record.state, STATE_WORDS[record.state]
        )
        return f"rollout {record.id} ({record.candidate}, {where})"

    def _healthy(self) -> int:
        host = self.host
        return sum(host.routable(t.id) for t in host.targets_of(self.record.candidate))

    def emit(
        self,
        kind: str,
        reason: str,
        actor: Actor,
        level: int = logging.INFO,
        *,
        by: str = "",
        **data: Any,
    ) -> None:
        """An event of this rollout. `by`, for an automatic one: "judge" when its verdict
        decided, else the rollout itself ("rollout 4": its plan's steps and timeouts)."""
        by = by or (actor if actor != "auto" else f"rollout {self.id}")
        ids = {"rollout": self.id, "candidate": self.record.candidate}
        self.host.events.emit(kind, reason, actor=actor, by=by, level=level, **ids, **data)

    def _hook_env(self) -> dict[str, str]:
        """What a hook needs to reach the candidate: its addresses and a preview."""
        record, host = self.record, self.host
        settings = host.settings
        preview = settings.preview
        expiry = int(time.time()) + PREVIEW_TTL
        value = mint_token(host.preview_secret(), record.candidate, expiry)
        upstreams = [str(t.address) for t in host.targets_of(record.candidate)]
        return {
            "ZDPROXY_ROLLOUT": str(record.id),
            "ZDPROXY_CANDIDATE": record.candidate,
            "ZDPROXY_CANDIDATE_UPSTREAMS": " ".join(upstreams),
            "ZDPROXY_CANDIDATE_VERSION": settings.pool(record.candidate).version,
            "ZDPROXY_LIVE": record.previous,
            "ZDPROXY_LIVE_VERSION": settings.pool(record.previous).version,
            "ZDPROXY_PREVIEW_HEADER": preview.header,
            "ZDPROXY_PREVIEW_VALUE": value,
            "ZDPROXY_PROXY": str(host.listeners[0]) if host.listeners else "",
        }
