"""Why an upstream is routable or not, and what the data plane really routes.

An upstream gets new requests only when nothing keeps it out: an operator's drain
mark, an outlier ejection, or its health checks (failing, or no verdict yet). Its
state names the first of these that applies, so that the status tells a drained
upstream from a failing one, and a refusal that needs a routable upstream says what
keeps them out and what to do about it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from enum import StrEnum

from zdproxy.control.health import Verdict
from zdproxy.routing.snapshot import BASIS_POINTS, RoutingSnapshot
from zdproxy.routing.vocabulary import Color


class UpstreamState(StrEnum):
    UP = "up"  # passing its health checks
    UNCHECKED = "unchecked"  # its pool has health.enabled = false: routable, never checked
    UNKNOWN = "unknown"  # checked, but without a verdict yet
    DOWN = "down"  # failing its health checks
    DRAINED = "drained"  # an operator took it out (zdproxy drain)
    EJECTED = "ejected"  # outlier ejection: it failed too often in a row

    @property
    def routable(self) -> bool:
        return self in (UpstreamState.UP, UpstreamState.UNCHECKED)


def upstream_state(verdict: Verdict, *, drained: bool, ejected: bool) -> UpstreamState:
    """An operator's drain mark first, then an ejection, then the health checks."""
    if drained:
        return UpstreamState.DRAINED
    if ejected:
        return UpstreamState.EJECTED
    return UpstreamState(verdict)


# What keeps upstreams out, and what brings them back ({color} is filled in).
_WHY: dict[UpstreamState, tuple[str, str]] = {
    UpstreamState.DRAINED: ("drained", "`zdproxy undrain {color}`"),
    UpstreamState.EJECTED: (
        "ejected after failing in a row",
        "they return when their ejection ends (`zdproxy status` shows when)",
    ),
    UpstreamState.DOWN: (
        "down by their health checks",
        "`zdproxy status` shows why; fix or start the app",
    ),
    UpstreamState.UNKNOWN: (
        "not checked yet (no health verdict)",
        "wait for their first checks: `zdproxy wait --until healthy:{color}`",
    ),
}


def unroutable(color: Color, states: Sequence[UpstreamState]) -> str:
    """Why none of a color's upstreams is routable, and what to do, in one phrase."""
    if not states:
        return f"{color} has no upstreams: `zdproxy pool set {color} ADDRESS...`"
    counts = Counter(state for state in states if not state.routable)
    if not counts:  # routable since the routing this refusal read was published
        return f"{color}'s upstreams are routable again: try again"
    if len(counts) == 1:
        (state,) = counts
        why, remedy = _WHY[state]
        return f"all of {color}'s upstreams are {why}: {remedy.format(color=color)}"
    parts = []
    for state, number in counts.items():
        why, remedy = _WHY[state]
        parts.append(f"{number} {why} ({remedy.format(color=color)})")
    return f"none of {color}'s upstreams is routable: " + "; ".join(parts)


def effective_shares(snapshot: RoutingSnapshot) -> dict[Color, int]:
    """Each color's share of the split in basis points as the data plane applies it: a
    color with no routable upstream gives its share to the other; with neither, nothing
    is served."""
    live, candidate = snapshot.live, snapshot.candidate
    serving = {color for color in (live, candidate) if snapshot.pools.get(color)}
    if serving == {live, candidate}:
        weight = snapshot.candidate_weight
        return {live: BASIS_POINTS - weight, candidate: weight}
    return {color: BASIS_POINTS if color in serving else 0 for color in (live, candidate)}
