"""Pins and rollouts in-process: the roles "live" and "candidate" during a rollout, the
rollout pins its steps turn on, and the fallback of pins to a rolled back candidate.

The snapshot is a function of the settings and the rollout record (control/snapshots.py),
tested as such; the control plane's part (publishing it at every transition, across a
restart) runs the real controller on the in-memory data plane with a fake clock (the
harness of tests/test_rollout_model.py). Where a request goes is asked of the data
plane's own Router and RoutingTable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest

from tests.test_rollout_model import RolloutMachine, _record
from zdproxy.config.loader import ConfigError, settings_from_mapping
from zdproxy.config.overrides import PinSettings
from zdproxy.config.settings import Settings
from zdproxy.control import snapshots
from zdproxy.control.desired import Refused
from zdproxy.control.phases import ACTIVE, Phase, RolloutRecord
from zdproxy.dataplane.balancer import RoutingTable
from zdproxy.dataplane.exchange import PoolSide
from zdproxy.dataplane.steering import bucket_of
from zdproxy.routing.snapshot import PinRule, Roles, RoutingSnapshot, UpstreamTarget

# Two rollout pins (steps 1 and 2 of the plan "pinned"), then always-on pins.
PINS: list[dict[str, Any]] = [
    {"name": "acme", "header": "X-Tenant", "values": ["acme"], "to": "candidate"},
    {"name": "eu", "header": "X-Region", "values": ["eu"], "to": "candidate"},
    {"name": "globex", "header": "X-Tenant", "values": ["globex"], "to": "green"},
    {
        "name": "initech",
        "header": "X-Tenant",
        "values": ["initech"],
        "to": "green",
        "after_rollback": "stay",
    },
    {"name": "canary", "header": "X-Group", "values": ["canary"], "to": "candidate"},
    {"name": "stable", "header": "X-Group", "values": ["stable"], "to": "live"},
    {"name": "old", "header": "X-Group", "values": ["old"], "to": "blue"},
]
ALWAYS = {"globex", "initech", "canary", "stable", "old"}
# One request per pin, by the pin's name.
REQUESTS = {
    "acme": {"X-Tenant": "acme"},
    "eu": {"X-Region": "eu"},
    "globex": {"X-Tenant": "globex"},
    "initech": {"X-Tenant": "initech"},
    "canary": {"X-Group": "canary"},
    "stable": {"X-Group": "stable"},
    "old": {"X-Group": "old"},
    "nobody": {},
}
JUDGE = {"window": "5s", "min_requests": 5}


def pinned_config(
    blue: list[str], green: list[str], *, live: str = "blue", weight: int = 0
) -> Settings:
    pool = {"health": {"enabled": False}}
    plan = {
        "steps": [
            {"pins": ["acme"], "hold": "1s"},
            {"pins": ["eu"], "hold": "1s"},
            {"weight": 10, "hold": "1s"},
            {"weight": 100, "hold": "1s"},
        ],
        "bake": "2s",
        "pause_timeout": "30s",
        "judge": JUDGE,
    }
    return settings_from_mapping(
        {
            "pools": {
                "blue": {**pool, "upstreams": [{"address": a} for a in blue]},
                "green": {**pool, "upstreams": [{"address": a} for a in green]},
            },
            "split": {"live": live, "candidate_weight": weight, "salt": SALT},
            "pins": PINS,
            "plans": {
                "pinned": plan,
                "plain": {"steps": [{"weight": 50, "hold": "1s"}], "judge": JUDGE},
                "frozen": {**plan, "on_failure": "freeze"},
            },
        }
    )


# -- where a request goes: the data plane's own decision --------------------------------


@dataclass
class Side:
    """An upstream as the balancer reads it: its target and what it has in flight."""

    target: UpstreamTarget
    outstanding: int = 0


SALT = "pins-rollout-test"
NOBODY = next(
    token
    for token in (b"user-%d" % i for i in range(100))
    if bucket_of(SALT.encode(), token) >= 1000
)


def routes(snapshot: RoutingSnapshot) -> dict[str, str]:
    """The color each request of REQUESTS gets under `snapshot`."""
    sides = {t.id: Side(t) for targets in snapshot.pools.values() for t in targets}
    table = RoutingTable(snapshot, cast("dict[str, PoolSide]", sides))
    router = table.router
    colors = {}
    for who, headers in REQUESTS.items():
        # As the client connection captures them: only the headers some rule reads.
        captured = {
            router.request_headers[name.lower().encode()]: value.encode()
            for name, value in headers.items()
            if name.lower().encode() in router.request_headers
        }
        cookie = b"zd_bucket=" + NOBODY  # a user whose bucket stays out of a 10% step
        side = table.pick(router.decide(b"h", b"/", cookie, captured, None, b"192.0.2.1"))
        assert side is not None
        colors[who] = side.target.color
    return colors


# -- the snapshot as a function of the settings and the record ---------------------------

BLUE, GREEN = ["127.0.0.1:9001"], ["127.0.0.1:9002"]


def record(state: Phase, step: int = 0, plan: str = "pinned") -> RolloutRecord:
    return RolloutRecord(
        id=7, candidate="green", previous="blue", plan=plan, state=state, step=step
    )


def built(record: RolloutRecord | None, *, live: str = "blue", weight: int = 0) -> RoutingSnapshot:
    settings = pinned_config(BLUE, GREEN, live=live, weight=weight)
    return snapshots.build(settings, 1, lambda _: True, record)


@pytest.mark.parametrize(
    ("state", "step", "on"),
    [
        (Phase.PREFLIGHT, 0, set()),
        (Phase.STEP, 1, {"acme"}),
        (Phase.STEP, 2, {"acme", "eu"}),
        (Phase.PAUSED, 2, {"acme", "eu"}),
        (Phase.STEP, 3, {"acme", "eu"}),
        (Phase.BAKING, 4, {"acme", "eu"}),
        (Phase.FINISHING, 4, {"acme", "eu"}),
        *((end, 4, set()) for end in sorted(set(Phase) - ACTIVE)),
    ],
)
def test_a_rollout_pin_is_on_from_its_step_to_the_rollouts_end(
    state: Phase, step: int, on: set[str]
) -> None:
    assert {pin.name for pin in built(record(state, step)).pins} == ALWAYS | on


def test_rollout_pins_are_off_without_a_rollout_and_in_another_plans_rollout() -> None:
    assert {pin.name for pin in built(None).pins} == ALWAYS
    assert {pin.name for pin in built(record(Phase.STEP, 1, plan="plain")).pins} == ALWAYS


def test_a_pin_step_sends_only_its_pinned_users_to_the_candidate() -> None:
    colors = routes(built(record(Phase.STEP, 1)))  # weight 0: the split keeps everyone live
    assert colors == {
        "acme": "green",
        "eu": "blue",
        "globex": "green",
        "initech": "green",
        "canary": "green",
        "stable": "blue",
        "old": "blue",
        "nobody": "blue",
    }


@pytest.mark.parametrize(
    ("state", "step", "live"),
    [
        (Phase.PREFLIGHT, 0, "blue"),
        (Phase.STEP, 3, "blue"),
        (Phase.PAUSED, 3, "blue"),
        (Phase.BAKING, 4, "green"),  # promoted: the split's live color flipped
        (Phase.FINISHING, 4, "green"),
    ],
)
def test_roles_are_the_rollouts_colors_in_every_phase(state: Phase, step: int, live: str) -> None:
    snapshot = built(record(state, step), live=live, weight=1000 if live == "blue" else 0)
    assert snapshot.roles == Roles("blue", "green")
    colors = routes(snapshot)
    assert (colors["canary"], colors["stable"]) == ("green", "blue")


def test_without_an_active_rollout_roles_are_the_splits_colors() -> None:
    done = built(record(Phase.DONE, 4), live="green")
    assert done.roles is None and done.fallen is None
    colors = routes(done)
    assert (colors["canary"], colors["stable"], colors["nobody"]) == ("blue", "green", "green")


@pytest.mark.parametrize("end", [Phase.ROLLED_BACK, Phase.ABORTED, Phase.FAILED])
def test_after_a_failed_rollout_pins_to_its_candidate_go_live(end: Phase) -> None:
    snapshot = built(record(end, 3))
    assert snapshot.fallen == "green"
    assert routes(snapshot) == {
        "acme": "blue",  # a rollout pin: off
        "eu": "blue",
        "globex": "blue",  # to the failed color
        "initech": "green",  # ... but it stays
        "canary": "blue",  # to the failed candidate
        "stable": "blue",
        "old": "blue",
        "nobody": "blue",
    }
    fallback = snapshots.fallback(snapshot, record(end, 3))
    assert fallback is not None
    assert (fallback.rules, fallback.staying) == (("globex", "canary"), ("initech",))


@pytest.mark.parametrize("end", [Phase.FROZEN, Phase.DONE])
def test_a_frozen_or_done_rollout_leaves_pins_where_they_lead(end: Phase) -> None:
    live = "green" if end is Phase.DONE else "blue"
    snapshot = built(record(end, 3), live=live, weight=1000 if live == "blue" else 0)
    assert snapshot.fallen is None
    assert snapshots.fallback(snapshot, record(end, 3)) is None
    assert routes(snapshot)["globex"] == "green"


def test_the_snapshot_round_trip_keeps_roles_fallback_and_the_opt_out() -> None:
    for rollout in (record(Phase.BAKING, 4), record(Phase.ROLLED_BACK, 2)):
        snapshot = built(rollout)
        again = RoutingSnapshot.from_dict(snapshot.to_dict())
        assert again == snapshot
    stay = PinRule("s", "green", path_prefixes=("/",), after_rollback="stay")
    assert PinRule.from_dict(stay.to_dict()) == stay
    with pytest.raises(ValueError, match="after_rollback"):
        PinRule("s", "green", path_prefixes=("/",), after_rollback="maybe")  # type: ignore[arg-type]


# -- config ------------------------------------------------------------------------------


def refusals(**changes: Any) -> list[str]:
    base: dict[str, Any] = {
        "pools": {"blue": {"upstreams": BLUE}, "green": {"upstreams": GREEN}},
        "pins": PINS,
        "plans": {"p": {"steps": [{"pins": ["acme"]}, {"weight": 100}]}},
    }
    with pytest.raises(ConfigError) as refused:
        settings_from_mapping({**base, **changes})
    return refused.value.errors


def test_a_step_naming_an_unknown_pin_is_refused_naming_the_field() -> None:
    steps = [{"weight": 5}, {"weight": 5, "pins": ["acme", "nope"]}]
    assert refusals(plans={"p": {"steps": steps}}) == [
        "plans.p.steps[1].pins: no [[pins]] named 'nope'"
    ]


def test_a_rollout_pin_must_lead_to_the_candidate_and_end_with_its_rollout() -> None:
    to_green = [{**PINS[0], "to": "green"}, *PINS[1:]]
    assert refusals(pins=to_green) == [
        'pins[0].to: plans.p.steps[0] names this pin: it must be "candidate"'
    ]
    staying = [{**PINS[0], "after_rollback": "stay"}, *PINS[1:]]
    assert refusals(pins=staying) == [
        "pins[0].after_rollback: plans.p.steps[0] names this pin: it is off once its rollout "
        "ends, whatever the end"
    ]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"hold": "1s"}], "step 1 changes nothing: give it a higher weight than 0 or pins"),
        ([{"weight": 10}, {"weight": 10}], "step 2 changes nothing"),
        ([{"weight": 10}, {"pins": ["acme"]}], "weights must not fall from step to step"),
        ([{"pins": ["acme"]}, {"pins": [""]}], "plans.p.steps[1].pins[0]: String should have"),
    ],
)
def test_every_step_gives_the_candidate_more(steps: list[dict[str, Any]], message: str) -> None:
    [error] = refusals(plans={"p": {"steps": steps}})
    assert message in error, error


def test_pin_steps_and_weight_steps_mix() -> None:
    steps = [{"pins": ["acme"]}, {"weight": 10, "pins": ["eu"]}, {"weight": 10, "pins": ["x"]}]
    pins = [*PINS, {"name": "x", "path_prefix": ["/x"], "to": "candidate"}]
    settings = settings_from_mapping(
        {
            "pools": {"blue": {"upstreams": BLUE}, "green": {"upstreams": GREEN}},
            "pins": pins,
            "plans": {"p": {"steps": steps}},
        }
    )
    assert settings.plans["p"].step_pins() == {"acme", "eu", "x"}


# -- the control plane: a snapshot at every transition, across restarts ------------------


@pytest.fixture
def machine() -> Iterator[RolloutMachine]:
    harness = RolloutMachine()
    blue = [uid.split("/", 1)[1] for uid in harness.upstreams["blue"]]
    green = [uid.split("/", 1)[1] for uid in harness.upstreams["green"]]
    harness.config = pinned_config(blue, green)
    harness.crash()  # boots again on the config with pins
    yield harness
    harness.teardown()


def deploy(machine: RolloutMachine, plan: str = "pinned") -> None:
    rollouts = machine.control.rollouts
    machine._inside(rollouts.deploy("green", plan, "api"))
    for _ in range(3):  # the preflight's job, then step 1
        machine.tick(0.1)
    assert rollouts.last is not None and rollouts.last.state is Phase.STEP


def colors(machine: RolloutMachine) -> dict[str, str]:
    return routes(machine.plane.snapshot)


def run(
    machine: RolloutMachine, until: Phase, *, pinned: int = 0
) -> dict[tuple[Phase, int], dict[str, str]]:
    """Tick until the rollout is in `until`, with `pinned` good requests per second from
    the candidate's pinned users (the split sends it none at a pin step); where each
    request went as each phase (and step) began."""
    seen: dict[tuple[Phase, int], dict[str, str]] = {}
    for _ in range(60):
        last = machine.control.rollouts.last
        assert last is not None
        seen.setdefault((last.state, last.step), colors(machine))
        if last.state is until:
            return seen
        assert last.state.active, last
        for uid in machine.upstreams["green"]:
            machine.plane.pending.append(_record(uid, pinned, 0))
        machine.tick(1.0)
    raise AssertionError(f"never reached {until}: {seen.keys()}")


def test_the_plane_publishes_each_steps_pins_and_keeps_the_roles_through_the_bake(
    machine: RolloutMachine,
) -> None:
    assert colors(machine)["acme"] == "blue"  # before any rollout: off
    deploy(machine)
    seen = run(machine, Phase.DONE, pinned=20)
    who = ("acme", "eu", "canary", "stable", "nobody")
    assert {phase: tuple(routed[w] for w in who) for phase, routed in seen.items()} == {
        (Phase.STEP, 1): ("green", "blue", "green", "blue", "blue"),
        (Phase.STEP, 2): ("green", "green", "green", "blue", "blue"),
        (Phase.STEP, 3): ("green", "green", "green", "blue", "blue"),
        (Phase.STEP, 4): ("green", "green", "green", "blue", "green"),
        # Promoted: green is live, yet "live" is still blue (warm) and "candidate" green.
        (Phase.BAKING, 4): ("green", "green", "green", "blue", "green"),
        # Blue is drained: what still leads to it goes to green.
        (Phase.FINISHING, 4): ("green", "green", "green", "green", "green"),
        (Phase.DONE, 4): ("green", "green", "green", "green", "green"),
    }
    snapshot = machine.plane.snapshot
    assert (snapshot.roles, snapshot.fallen) == (None, None)
    assert {pin.name for pin in snapshot.pins} == ALWAYS  # the rollout pins are off again


def test_pins_to_a_rolled_back_candidate_go_live_across_a_restart_until_the_next_deploy(
    machine: RolloutMachine,
) -> None:
    deploy(machine)
    assert colors(machine)["globex"] == "green"
    machine.steer("pause")
    for _ in range(12):  # past the 30 s pause_timeout: rolled back
        machine.tick(3.0)
    last = machine.control.rollouts.last
    assert last is not None and last.state is Phase.ROLLED_BACK
    fallen = colors(machine)
    assert (fallen["globex"], fallen["canary"], fallen["initech"]) == ("blue", "blue", "green")
    fallback = machine.control.pin_fallback()
    assert fallback is not None
    assert fallback.reason == (
        f"pins to green fall back to blue since rollout {last.id} rolled back "
        "(initech stay on green)"
    )
    machine.crash()
    assert colors(machine) == fallen
    again = machine.control.pin_fallback()
    assert again is not None and again.reason == fallback.reason
    deploy(machine)  # the next deploy: pins lead where they say again
    assert machine.control.pin_fallback() is None
    assert (colors(machine)["globex"], colors(machine)["canary"]) == ("green", "green")


def test_an_abort_falls_back_a_freeze_does_not(machine: RolloutMachine) -> None:
    deploy(machine)
    machine.steer("abort")
    fallback = machine.control.pin_fallback()
    assert fallback is not None and "aborted" in fallback.reason
    assert colors(machine)["globex"] == "blue"
    deploy(machine, "frozen")
    machine.steer("promote")  # the candidate takes every request: the judge sees them
    machine.verdict("green", failing=True)
    run(machine, Phase.FROZEN)
    assert machine.control.pin_fallback() is None
    assert machine.plane.snapshot.fallen is None
    assert colors(machine)["globex"] == "green"


def test_rules_cannot_drop_a_pin_a_plan_steps_through(machine: RolloutMachine) -> None:
    rules = [PinSettings.model_validate(p) for p in PINS if p["name"] != "eu"]
    with pytest.raises(Refused) as refused:
        machine.control.set_rules(rules)
    assert refused.value.field == "plans.pinned.steps[1].pins"


@pytest.mark.parametrize(
    ("state", "live", "weight"),
    [
        (Phase.STEP, "blue", 1000),
        (Phase.BAKING, "green", 0),  # promoted: the old color, still warm, answers for it
        (Phase.ROLLED_BACK, "blue", 0),
    ],
)
def test_the_candidates_failures_are_retried_on_the_old_color_in_every_phase(
    state: Phase, live: str, weight: int
) -> None:
    snapshot = built(record(state, 4), live=live, weight=weight)
    sides = {t.id: Side(t) for targets in snapshot.pools.values() for t in targets}
    table = RoutingTable(snapshot, cast("dict[str, PoolSide]", sides))
    fallback = table.fallback_pick()
    assert table.suspect == "green"
    assert fallback is not None and fallback.target.color == "blue"
