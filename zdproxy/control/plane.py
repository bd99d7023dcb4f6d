"""The control plane's core: turn the desired state into routing snapshots for the data plane.

The desired state is the config file overlaid with the runtime changes made
through the API (control/state.py says which wins). Every change is journaled
before it takes effect, becomes an event, and is published as one snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from itertools import count
from typing import Any

from pydantic import ValidationError

from zdproxy.config.loader import format_validation_error
from zdproxy.config.overrides import PinSettings
from zdproxy.config.settings import (
    COLORS,
    Color,
    HealthSettings,
    OutlierSettings,
    PoolMembers,
    Settings,
)
from zdproxy.control import state
from zdproxy.control.drain import DrainResult, wait_drained
from zdproxy.control.events import Actor, EventLog
from zdproxy.control.health import HealthChecker, UpstreamHealth
from zdproxy.control.journal import Journal, JournalCorrupt, JournalItem
from zdproxy.control.outliers import OutlierDetector
from zdproxy.control.telemetry import Telemetry
from zdproxy.dataplane.pins import OverrideCounters
from zdproxy.dataplane.server import ProxyServer
from zdproxy.routing.snapshot import (
    BASIS_POINTS,
    PinRule,
    PreviewPolicy,
    RoutingSnapshot,
    StickyPolicy,
    UpstreamTarget,
    upstream_id,
)

log = logging.getLogger("zdproxy.control")

TICK_SECONDS = 0.1  # how often the control plane reads the data plane's records and streaks


class Refused(Exception):
    """A change the control plane will not make. Nothing changed."""

    def __init__(self, field: str, reason: str, status: int = 409) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.status = status


class ControlPlane:
    """Holds the pools, the split and their health, and pushes a fresh snapshot on every
    change. An upstream of a pool with health checks is in the snapshot only while up.

    The data plane is reached only through `apply` (snapshots down) and `collect`
    (records up), the two calls that would cross a process boundary.
    """

    def __init__(
        self, config: Settings, dataplane: ProxyServer, events: EventLog, journal: Journal
    ) -> None:
        self._dataplane = dataplane
        self._versions = count(1)
        self.config = config  # the file, as last loaded
        self.settings = config  # the file overlaid with the journaled runtime changes
        self.items: dict[str, JournalItem] = {}
        self.events = events
        self.journal = journal
        self.health = HealthChecker(self._health_changed)
        self.outliers = OutlierDetector(dataplane, self.health, events)
        self.telemetry = Telemetry(config.admin.status_window)
        self.drained: set[str] = set()  # upstream ids the operator took out of rotation
        self._ticker: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the control plane's tick (records, outlier ejection)."""
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
            now = loop.time()
            self.telemetry.add(now, self._dataplane.collect())
            settings_of: dict[str, OutlierSettings] = {
                color: self.settings.pool(color).outlier for color in COLORS
            }
            if self.outliers.tick(now, settings_of, self.targets_of):
                self.publish()

    def restore(self) -> RoutingSnapshot:
        """At start: read the journal and apply the config file overlaid with it. A journal
        that cannot be read is moved aside, with an event, and the file alone applies."""
        try:
            items = self.journal.load()
        except JournalCorrupt as exc:
            aside = self.journal.quarantine()
            self.events.emit(
                "journal_corrupt",
                f"{exc}; moved to {aside.name}, starting from the config file",
                level=logging.ERROR,
                path=str(aside),
            )
            items = {}
        return self.apply_settings(self.config, items)

    def apply_settings(
        self, config: Settings, items: dict[str, JournalItem] | None = None
    ) -> RoutingSnapshot:
        """Take a (re)loaded config file: drop the runtime changes it overrides, start or
        stop health checks, publish."""
        items = dict(self.items if items is None else items)
        for key in state.stale(config, items):
            del items[key]
            self.events.emit(
                "config_takes_over",
                f"the config file's {key} changed; its value replaces the runtime one",
                actor="config",
                item=key,
            )
        if "salt" not in items and (salt := state.generated_salt(config)) is not None:
            items["salt"] = salt
        try:
            settings = state.overlay(config, items)
        except (ValidationError, ValueError) as exc:
            self.events.emit(
                "journal_rejected",
                f"the journaled changes do not fit the config file ({exc}); using the file",
                level=logging.ERROR,
                actor="config",
            )
            items = {"salt": items["salt"]} if not config.split.salt else {}
            settings = state.overlay(config, items)
        if items != self.items:
            self._save(items)
        self.config = config
        self.items = items
        self.drained = state.drained_of(items)
        self.settings = settings
        configured = self.configured()
        self.health.sync({uid: entry for uid, entry in configured.items() if entry[1].enabled})
        self.outliers.forget(set(configured))
        return self.publish()

    async def first_checks(self) -> None:
        """Wait (bounded) for the first verdict on every checked upstream, so that a
        starting proxy does not answer 503 while its upstreams are already fine."""
        pools = [self.settings.pool(color).health for color in COLORS]
        longest = max((h.rise * h.timeout for h in pools if h.enabled), default=0.0)
        if longest:
            await self.health.settle(longest + 1.0)

    # -- views --------------------------------------------------------------------------

    def targets_of(self, color: str) -> list[UpstreamTarget]:
        return [target for target, _ in self.configured().values() if target.color == color]

    def configured(self) -> dict[str, tuple[UpstreamTarget, HealthSettings]]:
        """Every configured upstream with its pool's health settings."""
        return {
            target.id: (target, pool.health)
            for color in COLORS
            for pool in (self.settings.pool(color),)
            for target in (
                UpstreamTarget(upstream_id(color, e.address), color, e.address, e.weight)
                for e in pool.upstreams
            )
        }

    def routable(self, upstream: str) -> bool:
        if upstream in self.drained or upstream in self.outliers.ejected:
            return False
        health = self.health.state(upstream)
        return health is None or health.up

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

    def in_flight(self, upstream: str) -> tuple[int, int]:
        """(requests in flight, open tunnels) on one upstream."""
        return self._dataplane.in_flight({upstream})

    def counters(self) -> tuple[dict[str, int], OverrideCounters]:
        """The data plane's running counts: retries by kind, and pin and preview outcomes."""
        return self._dataplane.retries, self._dataplane.override_counts

    def share(self, color: str) -> int:
        """The color's share of the split, in basis points."""
        split = self.settings.split
        weight = split.candidate_weight
        return BASIS_POINTS - weight if color == split.live else weight

    # -- commands (each journaled, then published) --------------------------------------

    def _save(self, items: dict[str, JournalItem]) -> None:
        try:
            self.journal.save(items)
        except OSError as exc:
            raise Refused(
                "state.dir", f"cannot write the journal {self.journal.path}: {exc.strerror}", 503
            ) from None

    def _change(self, changes: dict[str, Any], actor: Actor) -> Settings:
        """Journal items and make them the running state, all or none; Refused changes
        nothing."""
        items = dict(self.items)
        for key, value in changes.items():
            items[key] = state.item(self.config, key, value, actor)
        try:
            settings = state.overlay(self.config, items)
        except ValidationError as exc:
            first = format_validation_error(exc)[0]
            field, _, reason = first.partition(": ")
            raise Refused(field, reason, 400) from None
        except ValueError as exc:
            field, _, reason = str(exc).partition(": ")
            raise Refused(field, reason, 400) from None
        self._save(items)
        self.items = items
        self.settings = settings
        self.drained = state.drained_of(items)
        return settings

    def set_split(
        self,
        candidate_weight: int,
        *,
        live: Color | None = None,
        salt: str | None = None,
        force: bool = False,
        actor: Actor = "api",
    ) -> None:
        """Move the split. Refused when a color that would get traffic has nothing
        routable, unless `force` (its share then goes to the other color, or 503)."""
        live = live or self.settings.split.live
        candidate: Color = "green" if live == "blue" else "blue"
        shares: dict[Color, int] = {
            live: BASIS_POINTS - candidate_weight,
            candidate: candidate_weight,
        }
        routable = self._dataplane.snapshot.pools
        for color, share in shares.items():
            if share and not routable[color] and not force:
                raise Refused(
                    "candidate_weight" if color == candidate else "live",
                    f"{color} would get {share / 100:g}% of the traffic but has no healthy "
                    "upstream (pass force to do it anyway)",
                )
        before = {color: self.share(color) for color in COLORS}
        changes: dict[str, Any] = {"split": {"live": live, "candidate_weight": candidate_weight}}
        if salt is not None:
            changes["salt"] = salt
        self._change(changes, actor)
        self.events.emit(
            "split_changed",
            f"live {live}, candidate {candidate} at {candidate_weight / 100:g}%"
            + (" (forced)" if force else ""),
            actor=actor,
            before=before,
            after=shares,
            salt_changed=salt is not None,
        )
        self.publish()

    def set_pool(
        self, color: Color, members: PoolMembers, *, force: bool = False, actor: Actor = "api"
    ) -> None:
        """Replace a color's upstreams and version label. New upstreams are routable after
        their health checks pass. Refused, unless `force`, when the color takes traffic
        and none of its routable upstreams would remain."""
        keep = {upstream_id(color, e.address) for e in members.upstreams}
        serving = {t.id for t in self._dataplane.snapshot.pools[color]}
        if self.share(color) and serving and not keep & serving and not force:
            raise Refused(
                "upstreams",
                f"{color} takes {self.share(color) / 100:g}% of the traffic and none of its "
                "healthy upstreams would remain; new upstreams serve only after passing their "
                "health checks (set the idle color, or pass force)",
            )
        before = self.settings.pool(color).members()
        self._change({f"pools.{color}": members.members()}, actor)
        self.health.sync(
            {uid: entry for uid, entry in self.configured().items() if entry[1].enabled}
        )
        self.outliers.forget(set(self.configured()))
        self.events.emit(
            "pool_changed",
            f"{color}: {len(members.upstreams)} upstreams, version {members.version or '-'}",
            actor=actor,
            color=color,
            before=before,
            after=members.members(),
        )
        self.publish()

    def set_rules(self, pins: list[PinSettings], *, actor: Actor = "api") -> None:
        value = [pin.model_dump(mode="json", exclude_defaults=True) for pin in pins]
        self._change({"rules": value}, actor)
        self.events.emit("rules_changed", f"{len(pins)} pin rules", actor=actor, rules=value)
        self.publish()

    async def drain(
        self,
        *,
        color: str | None = None,
        upstream: str | None = None,
        cut_after: float = 30.0,
        tunnel_grace: float = 5.0,
        actor: Actor = "api",
    ) -> DrainResult:
        """Take a color or one upstream out of rotation and wait until its work is done.

        New requests go elsewhere at once; requests in flight finish; tunnels get
        `tunnel_grace`; anything still running after `cut_after` seconds is cut and counted.
        """
        ids = self.start_drain(color=color, upstream=upstream, actor=actor)
        return await self.wait_drained(ids, cut_after=cut_after, tunnel_grace=tunnel_grace)

    def start_drain(
        self, *, color: str | None = None, upstream: str | None = None, actor: Actor = "api"
    ) -> set[str]:
        """Mark upstreams drained (journaled) and take them out of rotation at once."""
        ids = self.resolve(color, upstream)
        self._change({"drained": sorted(self.drained | ids)}, actor)
        self.events.emit(
            "drain_started",
            f"draining {', '.join(sorted(ids))}",
            actor=actor,
            upstreams=sorted(ids),
        )
        self.publish()
        return ids

    async def wait_drained(
        self, ids: set[str], *, cut_after: float, tunnel_grace: float
    ) -> DrainResult:
        result = await wait_drained(
            self._dataplane, ids, cut_after=cut_after, tunnel_grace=tunnel_grace
        )
        self.events.emit(
            "drained" if result.drained else "drain_cut",
            f"{', '.join(result.upstreams)} "
            + ("drained" if result.drained else f"timed out: {result.cut} cut")
            + f" in {result.seconds:.2f}s",
            level=logging.INFO if result.drained else logging.WARNING,
            **result.to_dict(),
        )
        return result

    def undrain(
        self, *, color: str | None = None, upstream: str | None = None, actor: Actor = "api"
    ) -> set[str]:
        """Put drained upstreams back into rotation (health checks still apply)."""
        ids = self.resolve(color, upstream) & self.drained
        if ids:
            self._change({"drained": sorted(self.drained - ids)}, actor)
            self.events.emit(
                "undrained", f"back in rotation: {', '.join(sorted(ids))}", actor=actor
            )
            self.publish()
        return ids

    # -- snapshots ----------------------------------------------------------------------

    def _health_changed(self, target: UpstreamTarget, health: UpstreamHealth) -> None:
        self.events.emit(
            "upstream_up" if health.up else "upstream_down",
            f"{target.id} "
            + (
                f"up after {health.passes} passing checks"
                if health.up
                else f"down after {health.failures} failed checks: {health.reason}"
            ),
            level=logging.INFO if health.up else logging.WARNING,
            upstream=target.id,
        )
        self.publish()

    def snapshot_from_settings(self) -> RoutingSnapshot:
        configured = self.configured()
        pools = {
            color: tuple(
                target
                for uid, (target, _) in configured.items()
                if target.color == color and self.routable(uid)
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
        log.debug(
            "routing: live=%s candidate_weight=%d/10000 blue=%d green=%d upstreams",
            snapshot.live,
            snapshot.candidate_weight,
            len(snapshot.pools["blue"]),
            len(snapshot.pools["green"]),
        )
        return snapshot
