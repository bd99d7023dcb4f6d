"""Fleet mode's brain, in milliseconds: real control planes and fleet members over the
in-memory store (tests/fakes_store.py), fake data planes and one fake clock.

What a lost race keeps (control/shared.py), a change made on one member applied on
the other, two changes at once (one is refused to its caller, both members end on the
same state), a state in the store that does not fit (refused, naming the item; the
running state stays), and etcd lost mid-rollout: changes refused, a rollback made
meanwhile wins once etcd is back, and the rollout never advanced without it."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeClock, FakeDataPlane
from tests.fakes_store import MemoryCluster, MemoryStore
from tests.test_rollout_model import _record as traffic
from zdproxy.config.fleet import FleetSettings
from zdproxy.config.loader import settings_from_mapping
from zdproxy.config.overrides import PinSettings
from zdproxy.config.settings import PoolMembers, Settings
from zdproxy.control.desired import Refused
from zdproxy.control.events import EventLog
from zdproxy.control.journal import Journal
from zdproxy.control.phases import HistoryEntry, Phase, RolloutRecord
from zdproxy.control.plane import ControlPlane
from zdproxy.control.shared import SharedView, checked, rebase
from zdproxy.fleet.election import campaign
from zdproxy.fleet.member import Member, encode
from zdproxy.fleet.store import StoreUnavailable


def _record(state: Phase, rollout: int = 4) -> dict[str, Any]:
    entry = HistoryEntry(time=0.0, state=state, step=1, reason="", actor="auto")
    record = RolloutRecord(
        id=rollout, candidate="green", previous="blue", plan="canary", state=state, step=1,
        history=[entry],
    )  # fmt: skip
    return record.model_dump(mode="json")


RUNNING = {"split": {"live": "blue", "candidate_weight": 1000}, "rollout": _record(Phase.STEP)}


def test_a_rollback_of_the_rollout_the_other_write_runs_wins_the_race() -> None:
    rolled_back = {"split": {"live": "blue", "candidate_weight": 0}}
    ours = {**RUNNING, **rolled_back, "rollout": _record(Phase.ROLLED_BACK)}
    theirs = {**RUNNING, "rules": [{"header": "x-tenant", "values": ["a"], "to": "blue"}]}
    assert rebase(ours, theirs) == {**theirs, **rolled_back, "rollout": ours["rollout"]}
    aborted = {**ours, "rollout": _record(Phase.ABORTED)}
    assert rebase(aborted, RUNNING) == {**RUNNING, **rolled_back, "rollout": aborted["rollout"]}


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        # Not an end: the first write stands.
        ({**RUNNING, "split": {"live": "blue", "candidate_weight": 5000}}, RUNNING),
        # An end of another rollout than theirs.
        ({**RUNNING, "rollout": _record(Phase.ROLLED_BACK, rollout=3)}, RUNNING),
        # Theirs already ended it (done first: the first end stands).
        ({**RUNNING, "rollout": _record(Phase.ROLLED_BACK)}, {"rollout": _record(Phase.DONE)}),
        # Theirs has no rollout at all.
        ({**RUNNING, "rollout": _record(Phase.ROLLED_BACK)}, {"split": RUNNING["split"]}),
    ],
)
def test_any_other_lost_change_is_dropped(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert rebase(ours, theirs) is None


def test_a_shared_value_that_does_not_fit_is_refused_naming_its_item() -> None:
    with pytest.raises(ValueError, match=r"^split: "):
        checked({"split": {"live": "purple", "candidate_weight": 0}})
    with pytest.raises(ValueError, match=r"^rollout: "):
        checked({"rollout": {"id": 0}})
    assert checked({"salt": "s", "pools.blue": "ignored"}) == {"salt": "s"}  # not shared


class Gate:
    """A member's store, passed through, but for what a test asks of its writes of
    the fleet's state: wait at a gate, or be applied with the answer lost."""

    def __init__(self, store: MemoryStore, state_key: str) -> None:
        self.store = store
        self.state_key = state_key
        self.gate: asyncio.Event | None = None  # set: state writes wait until it opens
        self.waiting = asyncio.Event()  # a state write waits at the gate
        self.lose_answers = 0  # state writes applied whose answer is lost

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def put_if(self, key: str, value: bytes, expected: int, **options: Any) -> int | None:
        if key == self.state_key and self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        revision = await self.store.put_if(key, value, expected, **options)
        if key == self.state_key and self.lose_answers and revision is not None:
            self.lose_answers -= 1
            raise StoreUnavailable("etcd: the answer was lost (test)")
        return revision


@dataclass
class Node:
    control: ControlPlane
    member: Member
    events: EventLog
    store: Gate

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.events.history(kind=kind)]


@dataclass
class Fleet:
    cluster: MemoryCluster
    clock: FakeClock
    config: Settings
    root: Path
    nodes: list[Node] = field(default_factory=list)

    @property
    def settings(self) -> FleetSettings:
        return self.nodes[0].member.fleet

    @property
    def leader(self) -> Node:
        [leader] = [node for node in self.nodes if node.member.leads()]
        return leader

    @property
    def follower(self) -> Node:
        return next(node for node in self.nodes if not node.member.leads())

    async def boot(self, name: str) -> Node:
        """A member as the daemon starts one: its control plane restored from its
        journal, then its fleet membership (with its cache) joined."""
        settings = FleetSettings(endpoints=["http://127.0.0.1:1"], name=name, publish_interval=0.1)
        events = EventLog(self.root / f"events-{name}.jsonl")
        events.member = name
        journal = Journal(self.root / f"state-{name}.json")
        control = ControlPlane(
            self.config, FakeDataPlane(), events, journal, self.clock, drive=False
        )
        control.restore()

        def notify(kind: str, reason: str, **data: Any) -> None:
            data.pop("level", None)
            events.emit(kind, reason, by="fleet", **data)

        store = Gate(self.cluster.store(), settings.key("state"))
        cache = self.root / f"fleet-{name}.json"
        member = Member(store, settings, SharedView(control), notify, self.clock, cache)  # type: ignore[arg-type]
        control.join_fleet(member)
        await member.start(within=1.0)
        return Node(control, member, events, store)

    async def stop(self, node: Node) -> None:
        await node.member.close()
        await node.control.close()
        node.events.close()


async def until(condition: Callable[[], bool], within: float = 2.0) -> None:
    """Let the members' tasks run (the store answers at once) until `condition`."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - polls state the members' tasks change
            await asyncio.sleep(0.001)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    # Listening sockets never accepted from: a deploy's "does anything answer" probe.
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    blue, green = (f"127.0.0.1:{s.getsockname()[1]}" for s in sockets)
    unchecked = {"health": {"enabled": False}}
    config = settings_from_mapping(
        {
            "pools": {
                "blue": {**unchecked, "upstreams": [{"address": blue}]},
                "green": {**unchecked, "upstreams": [{"address": green}]},
            },
            "plans": {
                "canary": {
                    "steps": [{"weight": 10, "hold": "1s"}, {"weight": 50}],
                    "preflight_timeout": "10s",
                }
            },
        }
    )
    clock = FakeClock()
    running = Fleet(MemoryCluster(clock), clock, config, tmp_path)
    for name in ("a", "b"):
        running.nodes.append(await running.boot(name))
    await until(lambda: sum(n.member.leads() for n in running.nodes) == 1)
    yield running
    for node in running.nodes:
        await running.stop(node)
    for sock in sockets:
        sock.close()


async def rollout_at_step_one(fleet: Fleet) -> tuple[Node, Node]:
    """A rollout of green deployed on the leader and at its first step on both members:
    (leader, follower)."""
    leader, follower = fleet.leader, fleet.follower
    await leader.control.rollouts.deploy("green", "canary", "api")
    leader.control.rollouts.tick()  # preflight passed: step 1
    await until(lambda: follower.control.rollouts.active is not None)
    return leader, follower


async def test_a_change_on_one_member_is_applied_on_the_other(fleet: Fleet) -> None:
    a, b = fleet.nodes
    assert a.control.settings.split.salt == b.control.settings.split.salt  # one bucket per user
    b.control.set_split(2500)
    assert await b.control.fleet.committed() is None
    await until(lambda: a.control.settings.split.candidate_weight == 2500)
    assert a.control.routing.candidate_weight == 2500  # routed, not only recorded
    [applied] = [e for e in a.kinds("fleet_applied") if e["data"]["items"] == ["split"]]
    assert applied["actor"] == "fleet" and applied["by"] == "member b"
    assert applied["data"]["member"] == "a"
    assert a.member.applied == b.member.applied > 0
    # A rollout's judges share its false rollback rate: each member's of its own slice
    # (each publishes itself) and the leader's of the whole.
    await until(lambda: a.control.judges() == b.control.judges() == 3)


async def test_of_two_changes_at_once_one_is_refused_and_both_members_agree(
    fleet: Fleet,
) -> None:
    a, b = fleet.nodes
    a.control.set_split(1000)
    settled_a = a.control.settled()  # what each API call waits for before it answers
    b.control.set_split(9000)  # before either member's write: a race
    settled_b = b.control.settled()
    outcomes = await asyncio.gather(settled_a, settled_b, return_exceptions=True)
    [refused] = [o for o in outcomes if o is not None]
    assert isinstance(refused, Refused), outcomes
    assert refused.status == 409 and refused.field == "fleet"
    assert "changed it first" in refused.reason
    lost = fleet.nodes[outcomes.index(refused)]
    assert lost.kinds("fleet_conflict")
    await until(lambda: a.member.applied == b.member.applied)
    weights = {n.control.settings.split.candidate_weight for n in fleet.nodes}
    assert len(weights) == 1 and weights <= {1000, 9000}


async def test_a_state_in_the_store_that_does_not_fit_is_refused_and_the_running_one_stays(
    fleet: Fleet,
) -> None:
    a, _ = fleet.nodes
    store = fleet.cluster.store()
    key = fleet.settings.key("state")
    read = await store.get(key)
    bad = {"split": {"live": "purple", "candidate_weight": 0}, "salt": "x"}
    assert await store.put_if(key, encode(bad, "someone"), read.mod_revision) is not None
    await until(lambda: bool(a.kinds("fleet_rejected")))
    [rejected] = a.kinds("fleet_rejected")
    assert "split:" in rejected["reason"] and "someone" in rejected["reason"]
    assert a.control.settings.split.live == "blue"
    assert a.control.settings.split.salt != "x"  # all or nothing
    garbage = await store.get(key)
    assert await store.put_if(key, b"not json", garbage.mod_revision) is not None
    await until(lambda: len(a.kinds("fleet_rejected")) == 2)
    assert json.loads(encode({}, "a"))["format"] == 1


async def test_without_etcd_changes_are_refused_and_a_rollback_made_meanwhile_wins_after(
    fleet: Fleet,
) -> None:
    leader, follower = await rollout_at_step_one(fleet)
    await until(lambda: follower.control.settings.split.candidate_weight == 1000)

    fleet.cluster.lose_quorum()
    await until(lambda: not follower.member.available and not leader.member.available)
    with pytest.raises(Refused) as refused:
        follower.control.set_rules([])
    assert refused.value.status == 503 and "etcd is unavailable" in refused.value.reason
    assert not leader.member.leads()
    fleet.clock.advance(5.0)  # past the step's hold: the leader does not advance alone
    leader.control.rollouts.tick()
    assert leader.control.rollouts.active is not None
    assert leader.control.rollouts.active.record.step == 1
    follower.control.rollouts.abort("cli")  # a rollout's end is never refused
    assert follower.control.routing.candidate_weight == 0  # at once, on this member

    fleet.cluster.regain_quorum()
    await until(lambda: leader.control.rollouts.active is None, within=3.0)
    record = leader.control.rollout_record()
    assert record is not None and record.state is Phase.ABORTED
    assert leader.control.routing.candidate_weight == 0
    await until(lambda: leader.member.applied == follower.member.applied)
    assert not follower.kinds("fleet_conflict")


async def test_a_watch_that_hangs_silently_is_made_again(fleet: Fleet) -> None:
    a, b = fleet.nodes
    fleet.cluster.hang_watches()
    b.control.set_split(4000)
    assert await b.control.fleet.committed() is None
    # Found by this member's own writes (every publish_interval, 0.1 s here) not coming
    # back for a while (on the fake clock, moved here): the watch is made again from
    # where it was, and misses nothing.
    async with asyncio.timeout(5.0):
        while a.control.settings.split.candidate_weight != 4000:
            fleet.cluster.advance(0.1)
            await asyncio.sleep(0.02)
    assert a.kinds("fleet_watch_restarted")


async def test_the_leader_waits_for_every_members_candidate_and_names_those_not_ready(
    fleet: Fleet,
) -> None:
    leader, follower = fleet.leader, fleet.follower
    follower.control.set_pool("green", PoolMembers(), force=True)  # no green there
    await until(
        lambda: (
            leader.member.reports.get("b", {}).get("pools", {}).get("green", {}).get("upstreams")
            == 0
        )
    )
    await leader.control.rollouts.deploy("green", "canary", "api")
    leader.control.rollouts.tick()
    assert leader.control.rollouts.active is not None
    assert leader.control.rollouts.active.record.state is Phase.PREFLIGHT  # no user on green
    fleet.clock.advance(10.0)
    leader.control.rollouts.tick()
    record = leader.control.rollout_record()
    assert record is not None and record.state is Phase.ABORTED
    assert record.reason.startswith("members b have fewer than 1 healthy green upstreams")
    await until(lambda: follower.control.rollouts.active is None)  # aborted everywhere


async def test_a_member_that_sees_a_rollout_done_without_its_finish_drains_its_old_color(
    fleet: Fleet,
) -> None:
    _, follower = await rollout_at_step_one(fleet)
    active = follower.control.rollouts.active
    assert active is not None
    # As if the watch brought the end only (the finishing's revision was missed).
    done = active.record.model_copy(update={"state": Phase.DONE})
    follower.control.rollouts.follow(done, "member a")
    assert follower.control.rollouts.active is None
    await until(lambda: follower.control.drained == set(follower.control.resolve("blue")))


async def test_a_rollback_made_while_this_members_write_waits_wins_over_the_write_that_won(
    fleet: Fleet,
) -> None:
    leader, follower = await rollout_at_step_one(fleet)
    # The follower's change is on its way to etcd, held there; the leader writes first.
    follower.store.gate = asyncio.Event()
    follower.control.set_rules([PinSettings(header="x-tenant", values=["a"], to="blue")])
    await until(follower.store.waiting.is_set)
    leader.control.rollouts.pause("api")
    await until(lambda: leader.member.applied > follower.member.applied)
    follower.control.rollouts.abort("api")  # meanwhile, here: a rollout's end
    follower.store.gate.set()
    # The held write loses to the pause, but the abort made since wins over it.
    await until(lambda: leader.control.rollouts.active is None)
    record = leader.control.rollout_record()
    assert record is not None and record.state is Phase.ABORTED
    assert follower.control.rollouts.active is None
    assert follower.control.routing.candidate_weight == 0


async def test_a_write_applied_whose_answer_was_lost_is_not_a_conflict(fleet: Fleet) -> None:
    a, b = fleet.nodes
    a.store.lose_answers = 1
    a.control.set_split(3000)
    await a.control.settled()  # no Refused (409): the write is in etcd
    await until(lambda: b.control.settings.split.candidate_weight == 3000)
    assert not a.kinds("fleet_conflict")
    await a.control.settled(changed=False)


async def test_a_campaign_whose_write_landed_unanswered_finds_its_own_key(
    fleet: Fleet,
) -> None:
    store = fleet.cluster.store()
    lease = await store.lease(5)
    key = fleet.settings.key("elsewhere")
    revision = await store.put_if(key, b"me", 0, lease=lease)  # as if its answer was lost
    leadership = await asyncio.wait_for(campaign(store, key, b"me", lease), 1.0)
    assert leadership.revision == revision and leadership.lease is lease


async def test_a_rollback_made_while_etcd_was_away_wins_after_a_restart_of_its_member(
    fleet: Fleet,
) -> None:
    leader, follower = await rollout_at_step_one(fleet)
    fleet.cluster.lose_quorum()
    await until(lambda: not follower.member.available)
    follower.control.rollouts.abort("api")  # journaled here; etcd has not seen it
    await fleet.stop(follower)
    fleet.cluster.regain_quorum()
    # The journal holds the abort, the cache the fleet's state it came from: the
    # restarted member tells its own change from a stale journal, and writes it.
    restarted = await fleet.boot(follower.member.name)
    fleet.nodes[fleet.nodes.index(follower)] = restarted
    await until(lambda: leader.control.rollouts.active is None)
    record = leader.control.rollout_record()
    assert record is not None and record.state is Phase.ABORTED
    assert restarted.control.routing.candidate_weight == 0


async def test_the_leader_rolls_back_on_its_own_slice_even_when_the_whole_fleet_looks_fine(
    fleet: Fleet,
) -> None:
    leader, follower = await rollout_at_step_one(fleet)
    blue, green = (next(iter(leader.control.resolve(color))) for color in ("blue", "green"))
    plane = leader.control._dataplane  # the fake: the test feeds its records
    assert isinstance(plane, FakeDataPlane)
    for _ in range(30):
        # Here, half of green's answers fail; the other member's plenty of good green
        # answers (as its records would arrive) keep the whole fleet's rate low.
        plane.pending += [traffic(green, 10, 10), traffic(blue, 200, 0)]
        leader.member._inbox += [traffic("green/10.0.0.2:80", 20_000, 0)]
        fleet.clock.advance(0.1)
        leader.control.tick(fleet.clock())
        leader.control.rollouts.tick()
        if leader.control.rollouts.active is None:
            break
    record = leader.control.rollout_record()
    assert record is not None and record.state is Phase.ROLLED_BACK, record
    assert "on this member:" in record.reason
    await until(lambda: follower.control.rollouts.active is None)  # everywhere
