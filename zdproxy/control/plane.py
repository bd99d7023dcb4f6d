"""The control plane's core: turn the desired state into routing snapshots for the data plane."""

from __future__ import annotations

import logging
from itertools import count

from zdproxy.config.settings import COLORS, Settings
from zdproxy.dataplane.server import ProxyServer
from zdproxy.routing.records import IntervalRecord
from zdproxy.routing.snapshot import RoutingSnapshot, StickyPolicy, UpstreamTarget, upstream_id

log = logging.getLogger("zdproxy.control")


class ControlPlane:
    """Holds the pools and the split, and pushes a fresh snapshot on every change.

    The data plane is reached only through `apply` (snapshots down) and `collect`
    (records up), the two calls that would cross a process boundary.
    """

    def __init__(self, settings: Settings, dataplane: ProxyServer) -> None:
        self._dataplane = dataplane
        self._versions = count(1)
        self.settings = settings

    def snapshot_from_settings(self) -> RoutingSnapshot:
        pools = {
            color: tuple(
                UpstreamTarget(upstream_id(color, e.address), color, e.address, e.weight)
                for e in getattr(self.settings.pools, color).upstreams
            )
            for color in COLORS
        }
        split = self.settings.split
        sticky = StickyPolicy(
            split.sticky_key, split.bucket_cookie, round(split.bucket_cookie_max_age), split.salt
        )
        return RoutingSnapshot(
            next(self._versions), split.live, split.candidate_weight, pools, sticky
        )

    def publish(self) -> RoutingSnapshot:
        snapshot = self.snapshot_from_settings()
        self._dataplane.apply(snapshot)
        log.info(
            "routing: live=%s candidate_weight=%d/10000 blue=%d green=%d upstreams",
            snapshot.live,
            snapshot.candidate_weight,
            len(snapshot.pools["blue"]),
            len(snapshot.pools["green"]),
        )
        return snapshot

    def collect(self) -> list[IntervalRecord]:
        return self._dataplane.collect()
