"""The rollout state machine in milliseconds: the real controller and control plane, the
in-memory data plane and a fake clock (the harness of tests/test_rollout_model.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.test_rollout_model import RolloutMachine
from zdproxy.control.phases import (
    ACTIVE,
    TRANSITIONS,
    IllegalTransition,
    Phase,
    check_transition,
)


@pytest.fixture
def machine() -> Iterator[RolloutMachine]:
    harness = RolloutMachine()
    yield harness
    harness.teardown()


def stepping(machine: RolloutMachine) -> None:
    machine.deploy("green")
    for _ in range(3):  # the preflight's job, then step 1
        machine.tick(0.1)
    assert machine.control.rollouts.last is not None
    assert machine.control.rollouts.last.state is Phase.STEP


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
    machine.verdict("green", failing=True)
    for _ in range(5):
        machine.tick(1.0)
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


def test_abort_during_a_hook_ignores_its_late_result(machine: RolloutMachine) -> None:
    machine.deploy("green")
    rollout = machine.control.rollouts.active
    assert rollout is not None
    machine.tick(0.1)  # the preflight starts its (empty) hook job
    assert rollout.job is not None
    machine.steer("abort")
    assert rollout.job is None and rollout.record.state is Phase.ABORTED
    machine.tick(0.1)
    assert rollout.record.state is Phase.ABORTED and rollout.record.step == 0


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
