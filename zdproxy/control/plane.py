"""The control plane's core: turn the desired state into routing snapshots for the data plane."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from itertools import count

from zdproxy.config.settings import COLORS, HealthSettings, OutlierSettings, Settings
from zdproxy.control.drain import DrainResult, wait_drained
from zdproxy.control.health import HealthChecker, UpstreamHealth
from zdproxy.control.outliers import OutlierDetector
from zdproxy.dataplane.server import ProxyServer
from zdproxy.routing.records import IntervalRecord
from zdproxy.routing.snapshot import (
    PinRule,
    PreviewPolicy,
    RoutingSnapshot,
    StickyPolicy,
    UpstreamTarget,
    upstream_id,
)

log = logging.getLogger("zdproxy.control")

TICK_SECONDS = 0.1  # how often the control plane looks at the data plane's streaks


class ControlPlane:
    """Holds the pools, the split and their health, and pushes a fresh snapshot on every
    change. An upstream of a pool with health checks is in the snapshot only while up.

    The data plane is reached only through `apply` (snapshots down) and `collect`
    (records up), the two calls that would cross a process boundary.
    """

    def __init__(self, settings: Settings, dataplane: ProxyServer) -> None:
        self._dataplane = dataplane
        self._versions = count(1)
        self.settings = settings
        self.health = HealthChecker(self._health_changed)
        self.outliers = OutlierDetector(dataplane, self.health)
        self.drained: set[str] = set()  # upstream ids the operator took out of rotation
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the control plane's tick (outlier ejection)."""
        self._ticker = asyncio.ensure_future(self._tick_forever())

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.health.close()

    async def _tick_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_SECONDS)
            settings_of: dict[str, OutlierSettings] = {
                color: getattr(self.settings.pools, color).outlier for color in COLORS
            }
            if self.outliers.tick(loop.time(), settings_of, self.targets_of):
                self.publish()

    def targets_of(self, color: str) -> list[UpstreamTarget]:
        return [target for target, _ in self.configured().values() if target.color == color]

    def configured(self) -> dict[str, tuple[UpstreamTarget, HealthSettings]]:
        """Every configured upstream with its pool's health settings."""
        return {
            target.id: (target, pool.health)
            for color in COLORS
            for pool in (getattr(self.settings.pools, color),)
            for target in (
                UpstreamTarget(upstream_id(color, e.address), color, e.address, e.weight)
                for e in pool.upstreams
            )
        }

    def apply_settings(self, settings: Settings) -> RoutingSnapshot:
        """Take new settings: start or stop health checks, then publish."""
        self.settings = settings
        configured = self.configured()
        self.health.sync({uid: entry for uid, entry in configured.items() if entry[1].enabled})
        self.outliers.forget(set(configured))
        return self.publish()

    async def first_checks(self) -> None:
        """Wait (bounded) for the first verdict on every checked upstream, so that a
        starting proxy does not answer 503 while its upstreams are already fine."""
        pools = [getattr(self.settings.pools, color).health for color in COLORS]
        longest = max((h.rise * h.timeout for h in pools if h.enabled), default=0.0)
        if longest:
            await self.health.settle(longest + 1.0)

    def _health_changed(self, target: UpstreamTarget, state: UpstreamHealth) -> None:
        self.publish()

    def _routable(self, upstream: str) -> bool:
        if upstream in self.drained or upstream in self.outliers.ejected:
            return False
        state = self.health.state(upstream)
        return state is None or state.up

    def resolve(self, color: str | None = None, upstream: str | None = None) -> set[str]:
        """The upstream ids of a color, or the one upstream id given; ValueError if unknown."""
        configured = self.configured()
        if upstream is not None:
            if upstream not in configured:
                raise ValueError(f"unknown upstream {upstream!r}")
            return {upstream}
        if color not in COLORS:
            raise ValueError(f"unknown color {color!r}: expected blue or green")
        return {uid for uid, (target, _) in configured.items() if target.color == color}

    async def drain(
        self,
        *,
        color: str | None = None,
        upstream: str | None = None,
        cut_after: float = 30.0,
        tunnel_grace: float = 5.0,
    ) -> DrainResult:
        """Take a color or one upstream out of rotation and wait until its work is done.

        New requests go elsewhere at once; requests in flight finish; tunnels get
        `tunnel_grace`; anything still running after `cut_after` seconds is cut and counted.
        """
        ids = self.resolve(color, upstream)
        self.drained |= ids
        self.publish()
        result = await wait_drained(
            self._dataplane, ids, cut_after=cut_after, tunnel_grace=tunnel_grace
        )
        log.info(
            "drain: %s %s in %.2fs (%d cut, %d tunnels closed)",
            ", ".join(result.upstreams),
            "drained" if result.drained else "timed out",
            result.seconds,
            result.cut,
            result.tunnels_closed,
        )
        return result

    def undrain(self, *, color: str | None = None, upstream: str | None = None) -> set[str]:
        """Put drained upstreams back into rotation (health checks still apply)."""
        ids = self.resolve(color, upstream) & self.drained
        self.drained -= ids
        self.publish()
        return ids

    def snapshot_from_settings(self) -> RoutingSnapshot:
        configured = self.configured()
        pools = {
            color: tuple(
                target
                for uid, (target, _) in configured.items()
                if target.color == color and self._routable(uid)
            )
            for color in COLORS
        }
        split = self.settings.split
        sticky = StickyPolicy(
            split.sticky_key, split.bucket_cookie, round(split.bucket_cookie_max_age), split.salt
        )
        pins = tuple(PinRule.from_settings(i, pin) for i, pin in enumerate(self.settings.pins))
        preview = PreviewPolicy.from_settings(self.settings.preview)
        return RoutingSnapshot(
            next(self._versions), split.live, split.candidate_weight, pools, sticky, pins, preview
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
