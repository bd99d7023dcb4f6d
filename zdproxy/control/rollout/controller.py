"""The owner of rollouts: at most one active at a time, each with its own id and task.

    preflight (healthy upstreams, pre_rollout and verify hooks)
      -> step 1..n (weight, hold, judged every tick)
      -> baking (candidate live, the old live color kept warm, still judged)
      -> finishing (drain the old color, post_promote hooks) -> done

`paused` holds a step (the judge still runs, and a pause has its own timeout);
rolled_back, aborted, frozen and failed end a rollout. Rollback wins over pauses
and holds: it is one snapshot swap (the old live color back, the candidate at 0).
The active rollout holds the split: nobody else may move it until it ends. Its
record is journaled on every transition, so a restarted zdproxy resumes it (the
hold restarts); an ended rollout is never resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from zdproxy.config.plans import PlanSettings, StepSettings
from zdproxy.config.settings import Color
from zdproxy.config.spelling import did_you_mean
from zdproxy.control.desired import Refused
from zdproxy.control.events import Actor
from zdproxy.control.judge import Verdict
from zdproxy.control.phases import FAILED, HistoryEntry, Phase, RolloutRecord
from zdproxy.control.ports import ControlHost
from zdproxy.control.probe import answering
from zdproxy.control.rollout.run import STATE_WORDS, Rollout

log = logging.getLogger("zdproxy.rollout")

RECENT = 50  # ended rollouts kept in memory for `wait --until done:ID`
OUTCOMES = (Phase.DONE, *sorted(FAILED))
# Stands in for a plan that left the config file, only to end its rollout.
_GONE = PlanSettings(steps=[StepSettings(weight=100)])


class Rollouts:
    def __init__(
        self, host: ControlHost, clock: Callable[[], float], *, drive: bool = True
    ) -> None:
        """`drive=False` gives no task per rollout: a test moves it with `tick(now)`."""
        self.host = host
        self.clock = clock
        self.drive = drive
        self.active: Rollout | None = None
        self.recent: OrderedDict[int, RolloutRecord] = OrderedDict()  # newest last
        self.verdicts: dict[int, Verdict] = {}  # the judge's last word on each of `recent`
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_id = 0

    @property
    def last(self) -> RolloutRecord | None:
        """The active rollout's record, else the last one's."""
        if self.active is not None:
            return self.active.record
        return next(reversed(self.recent.values()), None)

    def holder(self) -> int | None:
        """The id of the rollout that holds the split, if any."""
        return self.active.id if self.active is not None else None

    def verdict(self, rollout_id: int) -> Verdict | None:
        """The judge's latest verdict on a rollout (its last, once ended); None before
        the judge had records, and for a rollout ended before a restart."""
        if self.active is not None and self.active.id == rollout_id:
            return self.active.verdict
        return self.verdicts.get(rollout_id)

    def get(self, rollout_id: int) -> RolloutRecord | None:
        if self.active is not None and self.active.id == rollout_id:
            return self.active.record
        return self.recent.get(rollout_id)

    # -- commands ----------------------------------------------------------------------

    async def deploy(self, color: Color, plan_name: str | None, actor: Actor) -> RolloutRecord:
        """Start a rollout of `color`; refused (nothing changes) while one is active, when
        the color is live, or when none of its upstreams answers at all."""
        name = self._check_start(color, plan_name)
        targets = self.host.targets_of(color)
        if targets and not await answering([t.address for t in targets]):
            listed = ", ".join(str(t.address) for t in targets)
            raise Refused(
                "color", f"none of {color}'s upstreams answers ({listed}): start them first"
            )
        name = self._check_start(color, plan_name)  # again: the probe awaited
        return self._start(color, name, actor)

    def _check_start(self, color: Color, plan_name: str | None) -> str:
        settings = self.host.settings
        if self.active is not None:
            active = self.active
            raise Refused(
                "color",
                f"{active.describe()} is running: abort it or wait for it to end (`zdproxy "
                f"rollout abort`, `zdproxy wait --until done:{active.id}`)",
            )
        name = plan_name or settings.rollout.plan_in(settings.plans)
        if name not in settings.plans:
            known = f"no plan {name!r} (known: {', '.join(settings.plans)})"
            raise Refused("plan", known + did_you_mean(name, settings.plans), 400)
        if color == settings.split.live:
            raise Refused("color", f"{color} is already live: deploy to the other color")
        if (rolling := self.host.rolling_update()) is not None:
            raise Refused("color", f"{rolling} is running: wait for it to end")
        if (unsafe := self.host.unsafe_to_start()) is not None:
            raise Refused("state.dir", unsafe, 503)
        return name

    def _start(self, color: Color, name: str, actor: Actor) -> RolloutRecord:
        host = self.host
        live = host.settings.split.live
        reason = f"deploy {color} with plan {name}"
        entry = HistoryEntry(
            time=time.time(), state=Phase.PREFLIGHT, step=0, reason=reason, actor=actor
        )
        record = RolloutRecord(
            id=self._last_id + 1,
            candidate=color,
            previous=live,
            plan=name,
            reason=reason,
            history=[entry],
        )
        rollout = Rollout(record, host.settings.plans[name], host, self.clock())
        value = record.model_dump(mode="json")
        # No user request reaches the candidate before its preflight and hooks passed; a
        # deploy wants traffic there later, so its drain marks go, in the same write. A
        # refused write leaves no ghost rollout and nothing changed.
        self.active = rollout  # it holds the split from this write on
        try:
            if host.share(color):
                host.steer(0, live, value, actor, durable=True, undrain=color)
            else:
                host.save_rollout(value, durable=True, undrain=color)
        except Refused:
            self.active = None
            raise
        self._last_id = record.id
        rollout.emit("rollout_preflight", record.reason, actor, plan=name)
        self._launch(rollout)
        return record

    def pause(self, actor: Actor) -> RolloutRecord:
        rollout = self._running("pause")
        rollout.pause(actor, self.clock())
        return rollout.record

    def resume(self, actor: Actor) -> RolloutRecord:
        rollout = self._running("resume")
        rollout.resume(actor, self.clock())
        return rollout.record

    def promote(self, actor: Actor) -> RolloutRecord:
        rollout = self._running("promote")
        rollout.promote(actor, self.clock())
        return rollout.record

    def abort(self, actor: Actor) -> RolloutRecord:
        rollout = self._running("abort")
        rollout.abort(actor)
        self._settle(rollout)
        return rollout.record

    async def retry(self, actor: Actor) -> RolloutRecord:
        last = self.last
        if last is None or last.state not in FAILED:
            raise Refused("state", "retry needs a rolled back, aborted, frozen or failed rollout")
        return await self.deploy(last.candidate, last.plan, actor)

    def restore(self, record: RolloutRecord | None, last_id: int = 0) -> None:
        """At start: the journaled record. An active one goes on (its hold restarts); an
        ended one is only remembered. `last_id`: the highest id the events have seen."""
        self._last_id = max(last_id, record.id if record is not None else 0)
        if record is None:
            return
        if not record.state.active:
            self._remember(record)
            return
        plan = self.host.settings.plans.get(record.plan)
        rollout = Rollout(record, plan or _GONE, self.host, self.clock())
        self.active = rollout
        reason = None
        if plan is None:
            reason = f"plan {record.plan!r} is no longer in the config file"
        elif record.step > len(plan.steps):
            reason = f"plan {record.plan!r} has no step {record.step} any more"
        if reason is not None:
            rollout.end(Phase.FAILED, reason, "auto")
            self._settle(rollout)
            return
        rollout.emit("rollout_resumed", f"resumed in {record.state} after a restart", "auto")
        self._launch(rollout)

    def follow(self, record: RolloutRecord, by: str) -> None:
        """Fleet mode: another member wrote the fleet's rollout record (`by`: "member
        NAME"); the split it brings is already applied. The rollout runs here too: this
        member judges its own slice, rolls the fleet back on a breach, and drives the
        rollout once it leads (see Rollout.advance); an end is only taken."""
        self._last_id = max(self._last_id, record.id)
        active = self.active
        if active is not None and not active.same(record):
            # Another rollout won the race to the fleet's record: this one never ran.
            active.drop()
            self.active = active = None
        if active is not None:
            active.take(record, self.clock(), by)
            self._settle(active)
            return
        if not record.state.active:
            self._remember(record)
            return
        plan = self.host.settings.plans.get(record.plan)
        rollout = Rollout(record, plan or _GONE, self.host, self.clock())
        if plan is None or record.step > len(plan.steps):
            rollout.judging = False
            log.warning(
                "rollout %d: plan %r (step %d) is not in this member's config: it follows "
                "the split and does not judge",
                record.id,
                record.plan,
                record.step,
            )
        self.active = rollout
        rollout.take(record, self.clock(), by, joined=True)
        self._launch(rollout)

    async def close(self) -> None:
        tasks: list[asyncio.Task[Any]] = [*self._tasks]
        if self.active is not None:
            tasks += [t for t in (self.active.job, *self.active.after) if t is not None]
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- ticks ---------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Move the active rollout on: every judge tick from its task, or from a test."""
        rollout = self.active
        if rollout is None:
            return
        try:
            rollout.advance(self.clock() if now is None else now, drive=self.host.leads())
        except Refused as exc:  # the journal refused the next transition: stop safely
            rollout.end(Phase.FAILED, f"cannot journal its next step: {exc}", "auto")
        except Exception as exc:  # a bug must not leave traffic half-shifted in silence
            log.exception("rollout %d failed", rollout.id)
            rollout.end(Phase.FAILED, f"internal error: {exc!r}", "auto")
        self._settle(rollout)

    def _launch(self, rollout: Rollout) -> None:
        if self.drive:
            task = asyncio.ensure_future(self._run(rollout))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, rollout: Rollout) -> None:
        """The rollout's own task: it stops by itself once the rollout has ended (or
        was dropped for another: see follow)."""
        while not rollout.ended and self.active is rollout:
            await asyncio.sleep(rollout.plan.judge.tick)
            if self.active is rollout:
                try:
                    self.tick()
                except Exception:  # a bug in an end: logged, and the next tick tries again
                    log.exception("rollout %d: tick failed", rollout.id)

    def _settle(self, rollout: Rollout) -> None:
        """An ended rollout lets go of the split and joins the recent ones."""
        if not rollout.ended or self.active is not rollout:
            return
        self.active = None
        for task in rollout.after:  # its on_rollback hooks: close() still stops them
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        record = rollout.record
        self.counts[record.state] += 1
        if rollout.verdict is not None:
            self.verdicts[record.id] = rollout.verdict
        self._remember(record)

    def _remember(self, record: RolloutRecord) -> None:
        """An ended rollout's record, among the RECENT kept."""
        self.recent[record.id] = record
        while len(self.recent) > RECENT:
            gone, _ = self.recent.popitem(last=False)
            self.verdicts.pop(gone, None)

    def _running(self, verb: str) -> Rollout:
        if self.active is None:
            last = self.last
            ended = f" (rollout {last.id} has ended: {STATE_WORDS[last.state]})" if last else ""
            raise Refused("state", f"cannot {verb}: no rollout is running{ended}")
        return self.active
