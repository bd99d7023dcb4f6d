"""Choosing an upstream for a request's Route from the current routing snapshot.

The table is rebuilt only when a snapshot arrives; `pick` runs per request and
does two random draws and a comparison, nothing more.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from itertools import accumulate
from random import choice, random

from zdproxy.dataplane.exchange import PoolSide
from zdproxy.dataplane.route import Route, Router
from zdproxy.routing.records import OverrideCounters
from zdproxy.routing.snapshot import BASIS_POINTS, RoutingSnapshot
from zdproxy.routing.vocabulary import PIN_TARGETS, other


class ColorPool:
    """The routable upstreams of one color, balanced by least outstanding of two choices."""

    __slots__ = ("_cumulative", "_total", "members")

    def __init__(self, members: tuple[PoolSide, ...]) -> None:
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

    def pick_other(self, failed: PoolSide) -> PoolSide | None:
        """Another member than `failed` (after a failure; not on the hot path)."""
        others = [m for m in self.members if m is not failed]
        if not others:
            return None
        first, second = choice(others), choice(others)
        return min(first, second, key=lambda m: (m.outstanding + 1) / m.target.weight)

    def pick(self) -> PoolSide:
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
        "_routes",
        "all_to_candidate",
        "candidate",
        "candidate_weight",
        "fallback",
        "live",
        "router",
        "snapshot",
        "suspect",
    )

    def __init__(
        self,
        snapshot: RoutingSnapshot,
        pools: Mapping[str, PoolSide],
        counters: OverrideCounters | None = None,
    ) -> None:
        self.snapshot = snapshot
        live = tuple(pools[t.id] for t in snapshot.pools.get(snapshot.live, ()))
        candidate = tuple(pools[t.id] for t in snapshot.pools.get(snapshot.candidate, ()))
        self.live = ColorPool(live) if live else None
        self.candidate = ColorPool(candidate) if candidate else None
        self.candidate_weight = weight = snapshot.candidate_weight
        self.all_to_candidate = weight >= BASIS_POINTS
        self.router = Router(snapshot, counters or OverrideCounters())
        # What a pin's or preview's target means in this snapshot, roles resolved to
        # colors once here: (first choice, fallback).
        pool_of = {snapshot.live: self.live, snapshot.candidate: self.candidate}
        self._routes = {
            target: (pool_of[color], pool_of[other(color)])
            for target in PIN_TARGETS
            for color in (snapshot.color_of(target),)
        }
        # Whose failures a retry may take elsewhere, and where: the rollout's candidate
        # and its old live color, through every phase (during the bake the candidate is
        # already live and the old color still warm); with no rollout, the split's.
        roles = snapshot.roles
        self.suspect = roles.candidate if roles is not None else snapshot.candidate
        self.fallback = pool_of[other(self.suspect)]

    def pick(self, route: Route) -> PoolSide | None:
        """An upstream for the request's route: the color or role a pin or preview chose,
        else by its bucket; None when neither color has a routable one."""
        if route.to is not None:
            return _either(*self._routes[route.to])
        bucket = route.bucket
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

    def fallback_pick(self) -> PoolSide | None:
        """An upstream of the color that answers for the suspect's failures (the live
        color, or during a bake the old one), for a retry of a request the split sent
        to the suspect."""
        return self.fallback.pick() if self.fallback is not None else None

    def alternative(self, failed: PoolSide) -> PoolSide | None:
        """Another routable upstream of the failed one's color, for a safe retry."""
        color = self.live if failed.target.color == self.snapshot.live else self.candidate
        return color.pick_other(failed) if color is not None else None


def _either(first: ColorPool | None, second: ColorPool | None) -> PoolSide | None:
    """Fail safe for a pinned color: an empty color's requests go to the other."""
    if first is not None:
        return first.pick()
    if second is not None:
        return second.pick()
    return None
