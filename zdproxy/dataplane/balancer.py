"""Choosing an upstream for a request from the current routing snapshot.

The table is rebuilt only when a snapshot arrives; `pick` runs per request and
does two random draws and a comparison, nothing more.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from random import random

from zdproxy.dataplane.steering import Steering
from zdproxy.dataplane.upstream import UpstreamPool
from zdproxy.routing.snapshot import BASIS_POINTS, RoutingSnapshot


class ColorPool:
    """The routable upstreams of one color, balanced by least outstanding of two choices."""

    __slots__ = ("_cumulative", "_total", "members")

    def __init__(self, members: tuple[UpstreamPool, ...]) -> None:
        self.members = members
        weights = [m.target.weight for m in members]
        if len(set(weights)) > 1:
            self._cumulative: list[int] | None = list(accumulate(weights))
            self._total = self._cumulative[-1]
        else:
            self._cumulative = None
            self._total = len(members)

    def _draw(self) -> int:
        if self._cumulative is None:
            return int(random() * self._total)
        return bisect_right(self._cumulative, random() * self._total)

    def pick(self) -> UpstreamPool:
        members = self.members
        if len(members) == 1:
            return members[0]
        first = members[self._draw()]
        second = members[self._draw()]
        if second is first:
            return first
        # Fewer requests in flight per unit of weight wins (P2C, as in Envoy's least_request).
        if (first.outstanding + 1) * second.target.weight <= (
            second.outstanding + 1
        ) * first.target.weight:
            return first
        return second


class RoutingTable:
    """The data plane's view of one snapshot: live and candidate pools and the split."""

    __slots__ = (
        "all_to_candidate",
        "candidate",
        "candidate_weight",
        "live",
        "snapshot",
        "steering",
    )

    def __init__(self, snapshot: RoutingSnapshot, pools: dict[str, UpstreamPool]) -> None:
        self.snapshot = snapshot
        live = tuple(pools[t.id] for t in snapshot.pools.get(snapshot.live, ()))
        candidate = tuple(pools[t.id] for t in snapshot.pools.get(snapshot.candidate, ()))
        self.live = ColorPool(live) if live else None
        self.candidate = ColorPool(candidate) if candidate else None
        self.candidate_weight = weight = snapshot.candidate_weight
        self.all_to_candidate = weight >= BASIS_POINTS
        self.steering = Steering(snapshot.sticky, 0 < weight < BASIS_POINTS)

    def pick(self, bucket: int) -> UpstreamPool | None:
        """An upstream for a request in `bucket` (-1: no bucket, the split is 0 or 100%);
        None when neither color has a routable one."""
        if bucket >= 0:  # noqa: SIM108 - reads as the rule it implements
            to_candidate = bucket < self.candidate_weight
        else:
            to_candidate = self.all_to_candidate
        if to_candidate:
            first, second = self.candidate, self.live
        else:
            first, second = self.live, self.candidate
        if first is not None:
            return first.pick()
        if second is not None:  # fail safe: an empty color's share goes to the other
            return second.pick()
        return None
