"""A full disk, in-process: the journal's reserve file keeps room for a rollback's record.

The disk is a model (`FullDisk`): a journal write needs as many free bytes as the
document has, and deleting the reserve file gives its bytes back. The control plane is
built as the daemon builds it, on the in-memory data plane; "kill -9" is dropping every
object and building a new control plane from the bytes left in the state dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import in_process_settings, pools
from tests.fakes import FakeDataPlane, FullDisk
from zdproxy.config.settings import Settings
from zdproxy.control import state
from zdproxy.control.desired import Refused
from zdproxy.control.events import EventLog
from zdproxy.control.journal import RESERVE_BYTES, Journal, JournalItem
from zdproxy.control.plane import ControlPlane

BLUE, GREEN = "127.0.0.1:9", "127.0.0.1:10"  # never dialled: the plane is a fake


def settings_in(tmp_path: Path) -> Settings:
    return in_process_settings(
        tmp_path, {"pools": pools([BLUE], [GREEN]), "split": {"salt": "file-salt"}}
    )


def rollout_at_step_1(config: Settings, state_dir: Path) -> None:
    """The journal of a canary at 10% of green: what a crash mid-rollout leaves."""
    record = {
        "id": 7,
        "candidate": "green",
        "previous": "blue",
        "plan": "canary",
        "state": "step",
        "step": 1,
    }
    items = {
        "split": state.item(config, "split", {"live": "blue", "candidate_weight": 1000}, "auto"),
        "rollout": JournalItem(state.checked("rollout", record), "", 1.0, "auto"),
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    Journal(state_dir / "state.json").save(items)


def control_plane(config: Settings, journal: Journal) -> tuple[ControlPlane, FakeDataPlane]:
    """What Daemon.start does with the state dir: the plane over the journal, restored.
    Not resumed: the rollout's owner does that, and the state is what is tested here."""
    dataplane = FakeDataPlane()
    events = EventLog(journal.path.parent / "events.jsonl")
    control = ControlPlane(config, dataplane, events, journal)
    control.desired.take_config(config, control.desired.read_journal())
    control.publish()
    return control, dataplane


def rollback(control: ControlPlane) -> None:
    """What the rollout's owner does when the candidate fails: swap the traffic in memory
    first, then journal the ended record, whatever the disk says (durable=False)."""
    record: dict[str, Any] = dict(control.desired.items["rollout"].value)
    record.update(state="rolled_back", reason="error rate 40% > 5%")
    control.desired.change(
        {"split": {"live": "blue", "candidate_weight": 0}, "rollout": record},
        "auto",
        durable=False,
    )
    control.publish()


def kinds(control: ControlPlane) -> list[str]:
    return [event.kind for event in control.events.history()]


def test_a_rollback_on_a_full_disk_is_journaled_with_the_reserve_and_a_restart_keeps_it(
    tmp_path: Path,
) -> None:
    config = settings_in(tmp_path)
    state_dir = Path(config.state.dir)
    rollout_at_step_1(config, state_dir)
    first = Journal(state_dir / "state.json")
    control, dataplane = control_plane(config, first)
    assert first.reserved  # laid at start, while there was room
    assert dataplane.snapshot.candidate_weight == 1000

    # The disk fills up: an operator's change is refused, naming the fault; nothing moves.
    full = FullDisk(first.path, free=0)
    control.desired.journal = full
    with pytest.raises(Refused) as refused:
        control.set_pool("blue", control.settings.pool("blue"), actor="api")
    assert refused.value.status == 503
    assert str(refused.value) == (
        f"state.dir: cannot write the journal {full.path}: No space left on device"
    )
    assert dataplane.snapshot.candidate_weight == 1000

    rollback(control)
    assert dataplane.snapshot.candidate_weight == 0  # users are off the candidate at once
    assert full.refused == 2  # the operator's change, then the rollback's first try
    assert "journal_reserve_spent" in kinds(control)
    assert "journal_stale" not in kinds(control)
    assert not full.reserved  # spent, and no room to lay it again

    # kill -9, and a start from what is on the disk.
    again, dataplane = control_plane(config, Journal(state_dir / "state.json"))
    assert again.desired.items["rollout"].value["state"] == "rolled_back"
    assert again.settings.split.candidate_weight == 0
    assert dataplane.snapshot.candidate_weight == 0  # nothing sent back to the candidate


def test_without_the_reserve_the_rollback_still_happens_and_says_the_journal_is_stale(
    tmp_path: Path,
) -> None:
    config = settings_in(tmp_path)
    state_dir = Path(config.state.dir)
    rollout_at_step_1(config, state_dir)
    full = FullDisk(state_dir / "state.json", free=0)
    full.reserve.unlink()  # the disk filled up before there was a reserve
    control, dataplane = control_plane(config, full)
    assert not full.reserved  # a disk full from the start: no room to lay it
    assert "journal_reserve_missing" in kinds(control)

    rollback(control)
    assert dataplane.snapshot.candidate_weight == 0  # in memory, whatever the disk says
    assert control.desired.items["rollout"].value["state"] == "rolled_back"
    assert control.desired.stale
    [stale] = [e for e in control.events.history() if e.kind == "journal_stale"]
    assert "No space left on device" in stale.reason
    assert stale.data == {"items": ["rollout", "split"]}

    # Room again: the next write brings the journal up to date, and says so.
    full.free = 10 * RESERVE_BYTES
    assert control.desired.flush()
    assert not control.desired.stale
    assert "journal_caught_up" in kinds(control)
    assert full.reserved  # laid again
    again, dataplane = control_plane(config, Journal(state_dir / "state.json"))
    assert again.desired.items["rollout"].value["state"] == "rolled_back"
    assert dataplane.snapshot.candidate_weight == 0
