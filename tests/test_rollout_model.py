"""The rollout controller, driven through random sequences of commands, ticks, judge
verdicts and crashes, against the in-memory data plane and a fake clock.

The real control plane and rollout controller run here; only the data plane is
fake, the clock moves when a rule says so, and a crash rebuilds everything from
the journal's bytes on disk (nothing of the old process survives). After every
step the invariants of docs/rollouts.md are checked.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.fakes import FakeClock, FakeDataPlane, FullDisk
from zdproxy.config.loader import settings_from_mapping
from zdproxy.config.settings import Settings
from zdproxy.control.desired import Refused
from zdproxy.control.events import EventLog
from zdproxy.control.phases import Phase
from zdproxy.control.plane import ControlPlane
from zdproxy.routing.histogram import index
from zdproxy.routing.records import IntervalRecord

STEPS = (10.0, 50.0, 100.0)
ROOMY = 1 << 30
ENDS = {f"rollout_{phase}" for phase in Phase if not phase.active}


def _config(addresses: list[str]) -> Settings:
    pool = {"health": {"enabled": False}}
    return settings_from_mapping(
        {
            "pools": {
                "blue": {**pool, "upstreams": [{"address": a} for a in addresses[:2]]},
                "green": {**pool, "upstreams": [{"address": a} for a in addresses[2:]]},
            },
            "plans": {
                "canary": {
                    "steps": [{"weight": w, "hold": "1s"} for w in STEPS],
                    "bake": "2s",
                    "pause_timeout": "30s",
                    # Its few requests a second are the state machine's, not a test of
                    # the judge's power: a bad color answers half its requests with 500s.
                    "judge": {
                        "window": "5s",
                        "min_requests": 5,
                        "max_error_rate": 0.25,
                        "max_error_rate_over_live": 1.0,
                    },
                },
                # Deployed by name only, by the unit tests of the preflight's order.
                "hooked": {"steps": [{"weight": 10}], "pre_rollout": ["wait"]},
                "migrating": {
                    "steps": [{"weight": 10}],
                    "pre_rollout": ["migrate"],
                    "verify": ["smoke"],
                    "pre_rollout_first": True,
                },
            },
            "hooks": {
                "wait": {"command": ["sleep", "5"]},
                "migrate": {"command": ["true"]},
                "smoke": {"command": ["true"]},
            },
        }
    )


def _record(upstream: str, ok: int, errors: int) -> IntervalRecord:
    """One tick of traffic on one upstream: `ok` 200s and `errors` 500s, all fast."""
    by_class = (0, 0, ok, 0, 0, errors)
    n = ok + errors
    return IntervalRecord(upstream, by_class, {}, {index(0.001): n}, 0.001 * n, (n, 0, 0, 0))


class RolloutMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="zdproxy-model-"))
        # Listening sockets, never accepted from: a deploy's "does anything answer" probe
        # connects to them (the kernel completes the handshake), nothing else does.
        self.sockets = [socket.create_server(("127.0.0.1", 0), backlog=64) for _ in range(4)]
        addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in self.sockets]
        self.config = _config(addresses)
        self.upstreams = {
            color: [f"{color}/{a}" for a in pair]
            for color, pair in (("blue", addresses[:2]), ("green", addresses[2:]))
        }
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.bad: set[str] = set()  # colors answering 500s
        self.ids: list[int] = []  # every rollout id handed out, in order
        self.since_crash: list[int] = []
        self.expected: tuple[str, int] = ("blue", 0)  # the split when no rollout holds it
        self.free = ROOMY  # bytes the state dir's disk has left
        self.tracked: set[int] = set()  # ended rollouts whose last split is in `expected`
        self._boot()

    def _boot(self) -> None:
        self.events = EventLog(self.dir / "events.jsonl")
        self.plane = FakeDataPlane()
        self.journal = FullDisk(self.dir / "state.json", free=self.free)
        self.control = ControlPlane(
            self.config, self.plane, self.events, self.journal, self.clock, drive=False
        )
        self._run(self._restore())

    async def _restore(self) -> None:
        self.control.restore()

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _settle(self) -> None:
        """Let the rollout's jobs (hooks, the drain) take their next steps."""
        for _ in range(3):
            self._run(asyncio.sleep(0))

    def teardown(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self._settle()
        self.loop.close()
        self.events.close()
        for sock in self.sockets:
            sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- commands ------------------------------------------------------------------------

    def _inside(self, command: Any) -> Any:
        """Run a call or a coroutine inside the loop (as the daemon would), then let the
        jobs it started take their next steps."""

        async def inside_the_loop() -> Any:
            return await command if asyncio.iscoroutine(command) else command()

        result = self._run(inside_the_loop())
        self._settle()
        return result

    def _command(self, command: Any) -> Any:
        """An operator's command: a refusal is an answer (None), not a failure."""
        try:
            return self._inside(command)
        except Refused:
            return None

    @rule(color=st.sampled_from(["blue", "green"]))
    def deploy(self, color: str) -> None:
        before = self.control.rollouts.active
        record = self._command(self.control.rollouts.deploy(color, None, "api"))  # type: ignore[arg-type]
        if record is None:  # refused: no ghost rollout, nothing changed
            assert self.control.rollouts.active is before
        else:
            assert not self.ids or record.id > self.ids[-1], (record.id, self.ids)
            self.ids.append(record.id)
            self.since_crash.append(record.id)

    @rule(action=st.sampled_from(["pause", "resume", "promote", "abort"]))
    def steer(self, action: str) -> None:
        self._command(lambda: getattr(self.control.rollouts, action)("cli"))

    @rule()
    def retry(self) -> None:
        record = self._command(self.control.rollouts.retry("cli"))
        if record is not None:
            assert record.id > self.ids[-1]
            self.ids.append(record.id)
            self.since_crash.append(record.id)

    @rule(weight=st.sampled_from([0, 2500, 10000]))
    def shift(self, weight: int) -> None:
        self._track_end()
        try:
            self.control.set_split(weight)
        except Refused as exc:
            holds = self.control.rollouts.active is not None
            assert holds or "routable" in exc.reason or exc.field == "state.dir", exc
            return
        assert self.control.rollouts.active is None, "a shift got past the rollout's hold"
        self.expected = (self.control.settings.split.live, weight)

    @rule(color=st.sampled_from(["blue", "green"]), failing=st.booleans())
    def verdict(self, color: str, failing: bool) -> None:
        """From now on this color answers well, or with 500s."""
        (self.bad.add if failing else self.bad.discard)(color)

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 3.0]))
    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)
        share = {c: self.control.share(c) for c in ("blue", "green")}
        for color, ids in self.upstreams.items():
            served = max(0, round(20 * seconds * share[color] / 10000))
            for uid in ids:
                errors = served // 2 if color in self.bad else 0
                self.plane.pending.append(_record(uid, served - errors, errors))
        now = self.clock()
        self.control.tick(now)
        self._inside(lambda: self.control.rollouts.tick(now))  # a tick never raises
        self._track_end()
        last = self.control.rollouts.last
        if currently_in_test_context():  # --hypothesis-show-statistics: phases reached
            event(f"a rollout reached {last.state if last else 'nothing'}")

    @rule(full=st.sampled_from([False, False, True]))
    def disk(self, full: bool) -> None:
        """The state dir's disk fills up (the reserve file still holds its room), or has
        room again."""
        self.journal.free = 0 if full else ROOMY
        self.free = self.journal.free

    @precondition(lambda self: not self.control.desired.stale)
    @rule()
    def crash(self) -> None:
        """kill -9: nothing runs on, nothing is closed; a new process reads the disk. (With
        a journal behind memory, a crash loses what only memory had: by design, and
        covered by tests/test_journal_full.py; the model does not follow that case.)"""
        self._track_end()
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self._settle()
        self.events.close()
        self.since_crash = []
        self._boot()

    # -- the model -----------------------------------------------------------------------

    def _track_end(self) -> None:
        """When no rollout holds the split, it stays where the last one left it."""
        rollouts = self.control.rollouts
        last = rollouts.last
        if rollouts.active is None and last is not None and last.id not in self.tracked:
            self.tracked.add(last.id)
            if last.state in (Phase.ROLLED_BACK, Phase.ABORTED, Phase.FAILED):
                self.expected = (last.previous, 0)
            elif last.state is Phase.DONE:
                self.expected = (last.candidate, 0)
            elif last.state is Phase.FROZEN:
                split = self.control.settings.split
                self.expected = (split.live, split.candidate_weight)

    @invariant()
    def one_active_rollout_holds_the_split(self) -> None:
        rollouts = self.control.rollouts
        ended = [r for r in rollouts.recent.values() if r.state.active]
        assert not ended, ended
        split = self.control.settings.split
        snapshot = self.plane.snapshot
        assert (snapshot.live, snapshot.candidate_weight) == (split.live, split.candidate_weight)
        active = rollouts.active
        if active is None:
            self._track_end()
            assert (split.live, split.candidate_weight) == self.expected
            return
        record = active.record
        assert record.state.active
        if record.state is Phase.PREFLIGHT:
            want = (record.previous, 0)
        elif record.state in (Phase.STEP, Phase.PAUSED):
            want = (record.previous, round(STEPS[record.step - 1] * 100))
        else:
            want = (record.candidate, 0)
        assert (split.live, split.candidate_weight) == want, (record, split)

    @invariant()
    def an_ended_rollout_never_writes(self) -> None:
        ended: set[int] = set()
        for logged in self.events.history():
            rollout = logged.data.get("rollout")
            if rollout in ended:
                assert logged.kind == "hook", f"rollout {rollout} wrote after its end: {logged}"
            if logged.kind in ENDS:
                ended.add(rollout)

    @invariant()
    def every_rollout_answers_for_its_id(self) -> None:
        rollouts = self.control.rollouts
        for rollout_id in self.since_crash:
            record = rollouts.get(rollout_id)
            assert record is not None and record.id == rollout_id
        if self.ids and rollouts.last is not None:
            assert rollouts.last.id == self.ids[-1]


class CountingMachine(RolloutMachine):
    steps = 0  # across every generated example

    @invariant()
    def count(self) -> None:
        CountingMachine.steps += 1  # invariants run once per step (and once at the start)


def test_the_rollout_controller_keeps_its_invariants_over_5000_steps() -> None:
    CountingMachine.steps = 0
    run_state_machine_as_test(
        CountingMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert CountingMachine.steps >= 5000, CountingMachine.steps
