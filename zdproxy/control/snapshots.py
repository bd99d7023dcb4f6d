"""From the running settings to what the data plane routes by: the configured upstreams
and the routing snapshot, as plain functions of the settings and the rollout record.

The record (the active rollout's, else the last one's) decides three things of the
pins: the colors "live" and "candidate" name (the rollout's, through every phase), the
rollout pins that are on (those its steps reached), and the fallback of the pins that
lead to a rolled back candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zdproxy.config.settings import COLORS, Color, HealthSettings, Settings
from zdproxy.control import state
from zdproxy.control.journal import JournalItem
from zdproxy.control.phases import Phase, RolloutRecord
from zdproxy.routing.snapshot import (
    Roles,
    RoutingSnapshot,
    StickyPolicy,
    UpstreamTarget,
    upstream_id,
)
from zdproxy.routing.vocabulary import other

Configured = dict[str, tuple[UpstreamTarget, HealthSettings]]

# The ends that send the traffic back to the old live color, and the pins leading to the
# candidate with it, until the next deploy. Not frozen (the traffic stays where it is),
# not done (the candidate is live).
FALLS_BACK = frozenset({Phase.ROLLED_BACK, Phase.ABORTED, Phase.FAILED})


def configured(settings: Settings) -> Configured:
    """Every configured upstream with its pool's health settings."""
    return {
        target.id: (target, pool.health)
        for color in COLORS
        for pool in (settings.pool(color),)
        for target in (
            UpstreamTarget(upstream_id(color, e.address), color, e.address, e.weight)
            for e in pool.upstreams
        )
    }


def build(
    settings: Settings,
    version: int,
    routable: Callable[[str], bool],
    rollout: RolloutRecord | None = None,
    rollout_key: bytes = b"",
) -> RoutingSnapshot:
    """The snapshot of `settings` and of `rollout` (the active rollout's record, else the
    last one's), with only the routable upstreams in each color."""
    pools = {
        color: tuple(
            target
            for uid, (target, _) in configured(settings).items()
            if target.color == color and routable(uid)
        )
        for color in COLORS
    }
    split = settings.split
    sticky = StickyPolicy(
        split.sticky_key, split.bucket_cookie, round(split.bucket_cookie_max_age), split.salt
    )
    off = rollout_pins_off(settings, rollout)
    pins = tuple(pin.rule(i) for i, pin in enumerate(settings.pins) if pin.name not in off)
    preview = settings.preview.policy(rollout_key)
    roles: Roles | None = None
    fallen: Color | None = None
    if rollout is not None:
        # Its "live" is the color it started from: the other one (`previous` too, in any
        # record a deploy wrote; a journal is a file, and a file can say anything).
        candidate = rollout.candidate
        roles = Roles(other(candidate), candidate) if rollout.state.active else None
        fallen = candidate if rollout.state in FALLS_BACK else None
    return RoutingSnapshot(
        version, split.live, split.candidate_weight, pools, sticky, pins, preview, roles, fallen
    )


def rollout_pins_off(settings: Settings, rollout: RolloutRecord | None) -> set[str]:
    """The rollout pins (those a plan's step names) that match nothing now: all of them,
    but those the active rollout's steps have reached, in its plan as configured now."""
    off = {name for plan in settings.plans.values() for name in plan.step_pins()}
    if rollout is not None and rollout.state.active:
        plan = settings.plans.get(rollout.plan)
        reached = plan.steps[: rollout.step] if plan is not None else []
        off -= {name for step in reached for name in step.pins}
    return off


@dataclass(frozen=True, slots=True)
class PinFallback:
    """Pins that lead to the candidate of a rolled back, aborted or failed rollout send
    their users to the live color instead, until the next deploy."""

    rollout: int
    outcome: Phase
    color: Color  # the failed candidate
    live: Color
    rules: tuple[str, ...]  # the rules that fall back
    staying: tuple[str, ...]  # the rules that lead to it with after_rollback = "stay"

    @property
    def reason(self) -> str:
        ended = self.outcome.replace("_", " ")
        staying = f" ({', '.join(self.staying)} stay on {self.color})" if self.staying else ""
        return (
            f"pins to {self.color} fall back to {self.live} since rollout {self.rollout} "
            f"{ended}{staying}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout": self.rollout,
            "outcome": str(self.outcome),
            "color": self.color,
            "live": self.live,
            "rules": list(self.rules),
            "staying": list(self.staying),
            "reason": self.reason,
        }


def fallback(snapshot: RoutingSnapshot, rollout: RolloutRecord | None) -> PinFallback | None:
    """What the fallback of `snapshot` (built from `rollout`) does, None without one."""
    fallen = snapshot.fallen
    if fallen is None or rollout is None or fallen == snapshot.color_of("live"):
        return None  # none, or moot: the failed candidate was made live by hand since
    leading = [pin for pin in snapshot.pins if snapshot.color_of(pin.to) == fallen]
    return PinFallback(
        rollout.id,
        rollout.state,
        fallen,
        snapshot.color_of("live"),
        tuple(pin.name for pin in leading if pin.after_rollback == "live"),
        tuple(pin.name for pin in leading if pin.after_rollback == "stay"),
    )


def kept_by_reload(
    running: Settings, config: Settings, items: Mapping[str, JournalItem]
) -> set[str]:
    """The upstream ids a reload of `config` keeps: a journaled pool stays unless the file
    changed it (see control/state.py)."""
    taken_over = set(state.stale(config, items))
    kept: set[str] = set()
    for color in COLORS:
        key = f"pools.{color}"
        pool = (running if key in items and key not in taken_over else config).pool(color)
        kept |= {upstream_id(color, e.address) for e in pool.upstreams}
    return kept
