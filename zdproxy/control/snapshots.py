"""From the running settings to what the data plane routes by: the configured upstreams
and the routing snapshot, as plain functions of the settings."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from zdproxy.config.settings import COLORS, HealthSettings, Settings
from zdproxy.control import state
from zdproxy.control.journal import JournalItem
from zdproxy.routing.snapshot import RoutingSnapshot, StickyPolicy, UpstreamTarget, upstream_id

Configured = dict[str, tuple[UpstreamTarget, HealthSettings]]


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


def build(settings: Settings, version: int, routable: Callable[[str], bool]) -> RoutingSnapshot:
    """The snapshot of `settings`, with only the routable upstreams in each color."""
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
    pins = tuple(pin.rule(i) for i, pin in enumerate(settings.pins))
    preview = settings.preview.policy()
    return RoutingSnapshot(
        version, split.live, split.candidate_weight, pools, sticky, pins, preview
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
