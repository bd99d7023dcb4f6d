"""The rollout state machine in milliseconds: the real controller and control plane, the
in-memory data plane and a fake clock (the harness of tests/test_rollout_model.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.test_rollout_model import RolloutMachine
from zdproxy.control.phases import (
    ACTIVE,
    TRANSITIONS,
    IllegalTransition,
    Phase,
    check_transition,
)
from zdproxy.control.rollout.run import Rollout


def stepping(machine: RolloutMachine) -> None:
    machine.deploy("green")
    for _ in range(3):  # the preflight's job, then step 1
        machine.tick(0.1)
    assert machine.control.rollouts.last is not None
    assert machine.control.rollouts.last.state is Phase.STEP


def judged_failing(machine: RolloutMachine) -> None:
    """Green fails half of its requests; the judge rolls it back within a minute."""
    machine.verdict("green", failing=True)
    for _ in range(60):  # half of a few requests a second fail: evidence within seconds
        machine.tick(1.0)
        if machine.control.rollouts.active is None:
            break


def split(machine: RolloutMachine) -> tuple[str, int]:
    settings = machine.control.settings.split
    return settings.live, settings.candidate_weight


@pytest.mark.parametrize("end", sorted(set(Phase) - ACTIVE))
def test_an_ended_rollout_has_no_way_out(end: Phase) -> None:
    assert TRANSITIONS[end] == frozenset()
    for phase in Phase:
        with pytest.raises(IllegalTransition):
            check_transition(end, phase)


def test_every_active_phase_can_be_rolled_back_or_aborted() -> None:
    for phase in ACTIVE:
        assert {Phase.ROLLED_BACK, Phase.ABORTED, Phase.FAILED} <= TRANSITIONS[phase]


def test_a_forgotten_pause_rolls_back_after_the_pause_timeout(machine: RolloutMachine) -> None:
    stepping(machine)
    machine.steer("pause")
    assert split(machine) == ("blue", 1000)
    machine.tick(3.0)
    assert machine.control.rollouts.active is not None  # 3 s of a 30 s pause_timeout
    for _ in range(10):
        machine.tick(3.0)
    last = machine.control.rollouts.last
    assert last is not None and last.state is Phase.ROLLED_BACK
    assert "pause_timeout" in last.reason
    assert split(machine) == ("blue", 0)


def test_a_failing_candidate_is_rolled_back_and_its_rollout_stays_ended(
    machine: RolloutMachine,
) -> None:
    stepping(machine)
    judged_failing(machine)
    last = machine.control.rollouts.last
    assert last is not None and last.state is Phase.ROLLED_BACK, last
    assert "judge failed green" in last.reason
    ended_at = len(machine.events.history())
    machine.verdict("green", failing=False)
    for command in ("resume", "promote", "abort", "pause"):
        machine.steer(command)  # each refused: the rollout has ended
    for _ in range(10):
        machine.tick(1.0)
    assert machine.events.history()[ended_at:] == []
    assert split(machine) == ("blue", 0)


def test_a_crash_mid_step_resumes_the_step_with_its_split(machine: RolloutMachine) -> None:
    stepping(machine)
    machine.crash()
    active = machine.control.rollouts.active
    assert active is not None and active.record.state is Phase.STEP and active.record.step == 1
    assert split(machine) == ("blue", 1000)
    kinds = [e.kind for e in machine.events.history()]
    assert kinds[-1] == "rollout_resumed"


def deploy(machine: RolloutMachine, plan: str) -> Rollout:
    machine._inside(machine.control.rollouts.deploy("green", plan, "api"))
    rollout = machine.control.rollouts.active
    assert rollout is not None
    return rollout


def test_abort_during_a_hook_ignores_its_late_result(machine: RolloutMachine) -> None:
    rollout = deploy(machine, "hooked")
    machine.tick(0.1)  # the preflight starts its hook job
    assert rollout.job is not None
    machine.steer("abort")
    assert rollout.job is None and rollout.record.state is Phase.ABORTED
    machine.tick(0.1)
    assert rollout.record.state is Phase.ABORTED and rollout.record.step == 0


def settle_hooks(machine: RolloutMachine, rollout: Rollout) -> None:
    """Let the hook job's processes run to their end (bounded)."""
    for _ in range(200):
        if rollout.job is None or rollout.job.done():
            return
        machine._run(asyncio.sleep(0.01))
    raise AssertionError("the hooks did not end")


def test_by_default_no_hook_runs_before_the_candidate_is_healthy(
    machine: RolloutMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(machine.control, "routable", lambda upstream: "green" not in upstream)
    rollout = deploy(machine, "hooked")
    machine.tick(0.1)
    assert rollout.job is None and rollout.record.state is Phase.PREFLIGHT


def test_pre_rollout_first_runs_the_migration_before_health_and_verify_after(
    machine: RolloutMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that becomes ready only after its migration can deploy."""
    healthy = {"green": False}
    monkeypatch.setattr(
        machine.control, "routable", lambda upstream: healthy["green"] or "green" not in upstream
    )
    rollout = deploy(machine, "migrating")
    machine.tick(0.1)
    settle_hooks(machine, rollout)
    machine.tick(0.1)
    assert rollout.record.hooks_done == ["migrate"]  # verify waits for health
    assert rollout.job is None and rollout.record.state is Phase.PREFLIGHT
    healthy["green"] = True
    machine.tick(0.1)
    settle_hooks(machine, rollout)
    machine.tick(0.1)
    assert rollout.record.hooks_done == ["migrate", "smoke"]
    assert rollout.record.state is Phase.STEP


def test_a_candidate_left_with_nothing_routable_is_rolled_back_mid_step(
    machine: RolloutMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    stepping(machine)
    monkeypatch.setattr(machine.control, "routable", lambda upstream: "green" not in upstream)
    machine.tick(0.1)
    last = machine.control.rollouts.last
    assert last is not None and last.state is Phase.ROLLED_BACK
    assert "no routable upstream" in last.reason
    assert split(machine) == ("blue", 0)


def finishing(machine: RolloutMachine) -> None:
    stepping(machine)
    for _ in range(40):
        machine.tick(1.0)
        last = machine.control.rollouts.last
        assert last is not None and last.state.active, last
        if last.state is Phase.FINISHING:
            return
    raise AssertionError("never reached finishing")


def test_a_crash_while_finishing_drains_again_and_ends_done(machine: RolloutMachine) -> None:
    finishing(machine)
    assert split(machine) == ("green", 0)
    machine.crash()
    for _ in range(3):
        machine.tick(0.1)
    last = machine.control.rollouts.last
    assert last is not None and last.state is Phase.DONE, last
    assert machine.control.drained == set(machine.upstreams["blue"])


def test_an_abort_while_finishing_on_a_full_disk_puts_the_old_color_back(
    machine: RolloutMachine,
) -> None:
    finishing(machine)
    assert machine.control.drained == set(machine.upstreams["blue"])
    machine.disk(full=True)
    machine.steer("abort")
    last = machine.control.rollouts.last
    assert last is not None and last.state is Phase.ABORTED, last
    assert split(machine) == ("blue", 0)
    assert machine.control.drained == set()  # in the same write as the swap
    assert machine.control.rollouts.active is None


def test_a_restart_keeps_a_resumed_rollouts_split_over_a_file_edited_meanwhile(
    machine: RolloutMachine,
) -> None:
    finishing(machine)
    split_edited = machine.config.split.model_copy(update={"candidate_weight": 500})
    machine.config = machine.config.model_copy(update={"split": split_edited})
    machine.crash()  # a restart with the file's [split] edited while zdproxy was down
    active = machine.control.rollouts.active
    assert active is not None and active.record.state is Phase.FINISHING
    assert split(machine) == ("green", 0)
    held = [e for e in machine.events.history() if e.kind == "config_held"]
    assert held and held[-1].data["item"] == "split"


def test_a_restart_with_a_plan_that_lost_the_current_step_fails_the_rollout(
    machine: RolloutMachine,
) -> None:
    """The config file changed under a running rollout: its plan has fewer steps than
    the journaled step. The restart ends it as failed, naming why, and goes on."""
    stepping(machine)
    while machine.control.rollouts.last is not None and machine.control.rollouts.last.step < 2:
        machine.tick(0.5)
    plan = machine.config.plans["canary"]
    shorter = plan.model_copy(update={"steps": plan.steps[:1]})
    machine.config = machine.config.model_copy(
        update={"plans": {**machine.config.plans, "canary": shorter}}
    )
    machine.crash()
    last = machine.control.rollouts.last
    assert last is not None and last.state is Phase.FAILED
    assert last.reason == "plan 'canary' has no step 2 any more"
    assert machine.control.rollouts.active is None
