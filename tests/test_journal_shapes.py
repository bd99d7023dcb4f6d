"""Journals of every shape through the daemon's start path, in-process: the control plane
built as ops/daemon.py builds it, on the in-memory data plane, then `restore()`.

Whatever the journal holds, zdproxy starts; every item it keeps is valid; every item it
leaves out is named by an event; `GET /v1/status` can be answered.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import in_process_settings, pools
from tests.fakes import FakeDataPlane
from zdproxy.admin.handlers import AdminAPI, ServiceState
from zdproxy.config.settings import Settings
from zdproxy.control import state
from zdproxy.control.events import EventLog
from zdproxy.control.journal import Journal
from zdproxy.control.phases import Phase
from zdproxy.control.plane import ControlPlane

BLUE, GREEN = "127.0.0.1:9", "127.0.0.1:10"  # never dialled: the plane is a fake
DEEP = "<<deep>>"  # replaced by an array nested past json.loads' recursion limit
NESTING = 100_000
GENERATED_AT = 1.5  # when the generated items were "made": a kept one that differs is new


def config(state_dir: Path) -> Settings:
    # The file sets the salt: none is drawn, so the kept items are exactly the journal's.
    return in_process_settings(
        state_dir.parent,
        {"pools": pools([BLUE], [GREEN]), "split": {"salt": "file-salt"}},
    )


# -- journals ---------------------------------------------------------------------------


@dataclass
class Journaled:
    """A generated journal document, and the keys made invalid on purpose."""

    document: Any
    invalid: set[str] = field(default_factory=set)
    corrupt: bool = False  # not a journal at all: every item goes

    def text(self) -> str:
        return json.dumps(self.document).replace(json.dumps(DEEP), "[" * NESTING + "]" * NESTING)


json_values = st.recursive(
    st.sampled_from([None, True, 0, -1, 2.5, "", "blue", "127.0.0.1:1"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["live", "value", "id", "x"]), inner, max_size=3)
    ),
    max_leaves=6,
)
colors = st.sampled_from(["blue", "green"])
members = st.fixed_dictionaries(
    {
        "upstreams": st.lists(
            st.builds(
                lambda port, weight: {"address": f"127.0.0.1:{port}", "weight": weight},
                st.integers(1, 65535),
                st.integers(1, 100),
            ),
            max_size=3,
            unique_by=lambda entry: entry["address"],
        ),
        "version": st.sampled_from(["", "v2", "x" * 200]),
    }
)
rollouts = st.fixed_dictionaries(
    {
        "id": st.integers(1, 10**6),
        "candidate": colors,
        "previous": colors,
        "plan": st.sampled_from(["canary", "gone"]),
        "state": st.sampled_from(list(Phase)),
        "step": st.integers(0, 10),
    }
)
VALID: dict[str, st.SearchStrategy[Any]] = {
    "pools.blue": members,
    "pools.green": members,
    "split": st.fixed_dictionaries({"live": colors, "candidate_weight": st.integers(0, 10_000)}),
    "salt": st.sampled_from(["s", "0123456789abcdef" * 2, "x" * 200]),
    "rules": st.lists(
        st.fixed_dictionaries(
            {
                "header": st.just("X-Team"),
                "values": st.lists(st.sampled_from(["qa", "ops"]), min_size=1),
                "to": st.sampled_from(["blue", "green", "candidate", "live"]),
            }
        ),
        max_size=2,
    ),
    "drained": st.lists(st.sampled_from([f"blue/{BLUE}", f"green/{GREEN}", "blue/1.2.3.4:5"])),
    "rollout": rollouts,
}
# The repros of the issue, and their kin: each is wrong whatever else the journal holds.
WRONG: list[tuple[str, Any]] = [
    ("drained", 5),
    ("split", ["blue", 1000]),
    ("rollout", {}),
    ("split", {"live": "blue", "candidate_weight": 1000, "extra": True}),
    ("split", {"live": "red", "candidate_weight": 1000}),
    ("split", {"live": "blue", "candidate_weight": 10_001}),
    ("pools.green", {"upstreams": "127.0.0.1:1"}),
    ("rules", [{"header": "X-Team", "values": ["qa"], "to": "nowhere"}]),
    ("rules", DEEP),
    ("salt", 5),
    ("salt", ""),
    ("rollout", {"id": 0, "candidate": "green", "previous": "blue", "plan": "p"}),
    ("nonsense", {"value": 1}),
]


@st.composite
def items(draw: st.DrawFn, config: Settings) -> tuple[dict[str, Any], set[str]]:
    chosen: dict[str, Any] = {}
    invalid: set[str] = set()
    for key in draw(st.lists(st.sampled_from([*state.KEYS, "nonsense"]), unique=True)):
        kind = draw(st.sampled_from(["valid", "valid", "wrong", "random", "envelope"]))
        wrong = [value for k, value in WRONG if k == key]
        if kind == "wrong" and wrong:
            value, invalid_now = draw(st.sampled_from(wrong)), True
        elif kind == "random":
            value, invalid_now = draw(json_values), key not in state.KEYS
        else:
            strategy = VALID.get(key, json_values)
            value, invalid_now = draw(strategy), key not in state.KEYS
        basis = state.basis_of(config, key) if key in state.KEYS else "x"
        entry: dict[str, Any] = {
            "value": value,
            "basis": draw(st.sampled_from([basis, basis, "0123456789abcdef"])),
            "at": GENERATED_AT,
            "actor": "api",
        }
        if kind == "envelope":  # the item's own fields: one extra, missing or mistyped
            broken = draw(st.sampled_from(["extra", "missing", "at", "actor"]))
            if broken == "extra":
                entry["why"] = "hand edit"
            elif broken == "missing":
                del entry["basis"]
            else:
                entry[broken] = [1] if broken == "at" else "root"
            invalid_now = True
        chosen[key] = entry
        if invalid_now:
            invalid.add(key)
    return chosen, invalid


@st.composite
def journals(draw: st.DrawFn, config: Settings) -> Journaled:
    chosen, invalid = draw(items(config))
    shape = draw(st.sampled_from(["journal"] * 8 + ["extra field", "format", "list", "items"]))
    if shape == "list":
        return Journaled(list(chosen.values()), corrupt=True)
    document: dict[str, Any] = {"format": 1, "written": 1.0, "items": chosen}
    if shape == "format":
        document["format"] = draw(st.sampled_from([0, 2, "1", None]))
    elif shape == "items":
        document["items"] = list(chosen)
    elif shape == "extra field":
        document["note"] = "hand edit"
    return Journaled(document, invalid, corrupt=shape in ("format", "items"))


# -- the start path ---------------------------------------------------------------------


@dataclass
class Started:
    control: ControlPlane
    events: EventLog
    dataplane: FakeDataPlane
    status: dict[str, Any]


async def start(settings: Settings, state_dir: Path) -> Started:
    """What Daemon.start does with the state dir, on the fake data plane."""
    events = EventLog(state_dir / "events.jsonl")
    dataplane = FakeDataPlane()
    control = ControlPlane(settings, dataplane, events, Journal(state_dir / "state.json"))
    try:
        control.restore()
        api = AdminAPI(control, ServiceState())
        status = api.current_status().model_dump(mode="json")
    finally:
        await control.close()
    return Started(control, events, dataplane, status)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A scratch directory in memory when there is one: a thousand starts fsync a lot."""
    shm = Path("/dev/shm")
    path = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else None))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for all the examples (a loop per start would be most of the time)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def named(events: EventLog, key: str) -> list[str]:
    """The kinds of the events that say the item `key` was left out."""
    return [
        e.kind
        for e in events.history()
        if e.kind in ("journal_rejected", "config_takes_over") and e.data.get("item") == key
    ]


EXAMPLE = config(Path("/nonexistent/state"))  # for the bases; the dir is per example


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(journal=journals(EXAMPLE))
def test_any_journal_starts_keeps_only_valid_items_and_names_each_one_dropped(
    scratch: Path, loop: asyncio.AbstractEventLoop, journal: Journaled
) -> None:
    state_dir = Path(tempfile.mkdtemp(dir=scratch)) / "state"
    settings_ = EXAMPLE.model_copy(
        update={"state": EXAMPLE.state.model_copy(update={"dir": str(state_dir)})}
    )
    state_dir.mkdir()
    (state_dir / "state.json").write_text(journal.text())

    started = loop.run_until_complete(start(settings_, state_dir))  # it starts: no exception

    kept = started.control.desired.items
    for key, item in kept.items():
        assert key in state.KEYS
        assert state.checked(key, item.value) == item.value  # valid, in canonical form
    assert started.status["journal"] == sorted(kept)
    snapshot = started.dataplane.snapshot
    split = started.control.settings.split
    assert (snapshot.live, snapshot.candidate_weight) == (split.live, split.candidate_weight)
    if journal.corrupt:
        assert kept == {}
        assert [e.kind for e in started.events.history(kind="journal_corrupt")]
        return
    for key in journal.document["items"]:
        if key not in kept:
            assert named(started.events, key), key  # every dropped item has its event
    for key in journal.invalid:
        assert "journal_rejected" in named(started.events, key), key
        # Gone, or written anew since (a rollout failed at start moves the split).
        assert key not in kept or kept[key].at != GENERATED_AT, key
    # What the start wrote back is a journal that loads whole.
    again = Journal(state_dir / "state.json").load(state.checked)
    assert again.rejected == []
    assert {k: i.value for k, i in again.items.items()} == {k: i.value for k, i in kept.items()}
    before = journal.document["items"].get("rollout", {}).get("value")
    # Kept: it was a valid record. Of an ended rollout, it is still ended after the start.
    if "rollout" in kept and isinstance(before, dict) and not Phase(before["state"]).active:
        assert not Phase(kept["rollout"].value["state"]).active  # an end stays an end
