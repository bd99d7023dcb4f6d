"""The control plane's core: turn the desired state into routing snapshots for the data plane.

The desired state (control/desired.py) is the config file overlaid with the
runtime changes made through the API. Every command here checks that it is safe,
has the change journaled, raises an event, and publishes one snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from itertools import count
from typing import Any

from zdproxy.config.overrides import PinSettings
from zdproxy.config.settings import (
    COLORS,
    Color,
    OutlierSettings,
    PoolMembers,
    Settings,
)
from zdproxy.config.units import Address
from zdproxy.control import snapshots
from zdproxy.control.availability import UpstreamState, unroutable, upstream_state
from zdproxy.control.desired import DesiredState, Refused
from zdproxy.control.drain import DrainResult, wait_drained
from zdproxy.control.events import Actor, EventLog
from zdproxy.control.health import HealthChecker, UpstreamHealth
from zdproxy.control.journal import Journal
from zdproxy.control.outliers import OutlierDetector
from zdproxy.control.phases import RolloutRecord
from zdproxy.control.rolling import RollingUpdates
from zdproxy.control.rollout.controller import Rollouts
from zdproxy.control.shared import SHARED, FleetLink, Solo, ends_rollout, short_of
from zdproxy.control.telemetry import Telemetry
from zdproxy.routing.local import LocalErrorKind, LocalErrorSite
from zdproxy.routing.plane import DataPlane, WorkerState
from zdproxy.routing.records import OverrideCounters
from zdproxy.routing.snapshot import (
    BASIS_POINTS,
    RoutingSnapshot,
    UpstreamTarget,
    upstream_id,
)

log = logging.getLogger("zdproxy.control")

TICK_SECONDS = 0.1  # how often the control plane reads the data plane's records and streaks


class ControlPlane:
    """Holds the pools, the split and their health, and pushes a fresh snapshot on every
    change. An upstream of a pool with health checks is in the snapshot only while up.

    The data plane is reached only through the `DataPlane` Protocol (routing/plane.py):
    plain values that could cross a process boundary. `clock` is the one time base of
    the records, the judge and the deadlines (a test passes a fake one).
    """

    def __init__(
        self,
        config: Settings,
        dataplane: DataPlane,
        events: EventLog,
        journal: Journal,
        clock: Callable[[], float] = time.monotonic,
        *,
        drive: bool = True,
    ) -> None:
        self._dataplane = dataplane
        self.clock = clock
        self._versions = count(1)
        self._preview_key = secrets.token_bytes(32)  # see _rollout_key
        self.desired = DesiredState(config, journal, events)
        self.events = events
        self.health = HealthChecker(self._health_changed)
        self.outliers = OutlierDetector(dataplane, self.health, events)
        self.telemetry = Telemetry(config.admin.status_window)
        self.listeners: list[Address] = []  # zdproxy's own bound addresses: never upstreams
        self.rollouts = Rollouts(self, clock, drive=drive)
        self.rolling = RollingUpdates(self)
        self._ticker: asyncio.Task[None] | None = None
        self.fleet: FleetLink = Solo()  # fleet mode: see join_fleet
        self.fleet_telemetry: Telemetry | None = None
        self.desired.on_change = lambda: self.fleet.changed()
        self.desired.refusal = self._fleet_refusal

    @property
    def settings(self) -> Settings:
        """The running settings: the config file overlaid with the runtime changes."""
        return self.desired.settings

    @property
    def drained(self) -> set[str]:
        return self.desired.drained

    def share(self, color: str) -> int:
        return self.desired.share(color)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the control plane's tick (records, outlier ejection)."""
        self._ticker = asyncio.ensure_future(self._tick_forever())

    async def close(self) -> None:
        await self.rollouts.close()
        await self.rolling.close()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.health.close()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self.tick(self.clock())

    def tick(self, now: float) -> None:
        """Read the data plane's records and streaks (every TICK_SECONDS)."""
        records = self._dataplane.collect()
        self.telemetry.add(now, records)
        if self.fleet_telemetry is not None:  # the fleet's, for its leader's judge
            self.fleet.offer(records if self.rollouts.active is not None else [])
            self.fleet_telemetry.add(now, [*records, *self.fleet.take_remote()])
        settings_of: dict[str, OutlierSettings] = {
            color: self.settings.pool(color).outlier for color in COLORS
        }
        if self.outliers.tick(now, settings_of, self.targets_of):
            self.publish()

    def restore(self) -> RoutingSnapshot:
        """At start: the config file overlaid with the journal (see control/state.py)."""
        items = self.desired.read_journal()
        journaled = items.get("rollout")
        active = (
            journaled is not None and RolloutRecord.model_validate(journaled.value).state.active
        )
        # A rollout that resumes holds the split, even against a file edited while down.
        hold = ("split",) if active else ()
        self.desired.take_config(self.desired.config, items, hold=hold)
        snapshot = self._reconfigured()
        record = self.rollout_record()
        seen = (e.data.get("rollout") for e in self.events.history())
        last_id = max((n for n in seen if isinstance(n, int)), default=0)
        self.rollouts.restore(record, last_id)
        return snapshot

    def apply_settings(self, config: Settings) -> RoutingSnapshot:
        """Take a reloaded config file: the runtime changes it overrides give way, health
        checks start or stop, a snapshot is published. Refused if the file does not fit
        the runtime changes that remain (nothing changes then)."""
        kept = snapshots.kept_by_reload(self.settings, config, self.desired.items)
        if self._leaves_nothing(self._serving() - kept):
            raise Refused(
                "pools",
                "the file replaces every upstream that serves now, and new upstreams serve only "
                "after passing their health checks: every request would get 503 (add the new "
                "upstreams first, reload, wait until they are healthy, then remove the old)",
            )
        hold = ("split",) if self.rollouts.active is not None else ()
        self.desired.take_config(config, reload=True, hold=hold)
        return self._reconfigured()

    def _reconfigured(self) -> RoutingSnapshot:
        settings = self.settings
        self.telemetry.window = settings.admin.status_window
        judged = [plan.judge.window for plan in settings.plans.values()]
        self.telemetry.retain = max([settings.admin.status_window, *judged])
        if self.fleet_telemetry is not None:
            self.fleet_telemetry.retain = self.telemetry.retain
        self._sync_upstreams()
        return self.publish()

    def _sync_upstreams(self) -> None:
        """Probe the configured upstreams (those of pools with checks off are routable
        unchecked); forget removed ones."""
        configured = self.configured()
        self.health.sync(configured)
        self.outliers.forget(set(configured))
        self.telemetry.forget(set(configured))

    async def first_checks(self) -> None:
        """Wait (bounded) for the first verdict on every checked upstream (the default
        TCP checks too: nothing is routable before it), so that a starting proxy does not
        answer 503 while its upstreams are already fine."""
        longest = self.health.longest_first_verdict()
        if longest:
            await self.health.settle(longest + 1.0)

    # -- views --------------------------------------------------------------------------

    def targets_of(self, color: str) -> list[UpstreamTarget]:
        return [target for target, _ in self.configured().values() if target.color == color]

    def configured(self) -> snapshots.Configured:
        """Every configured upstream with its pool's health settings."""
        return snapshots.configured(self.settings)

    def routable(self, upstream: str) -> bool:
        """Up by its checks (or in a pool with checks off), not drained, not ejected. An
        upstream whose first check has not passed yet is "unknown", not routable."""
        return self.upstream_state(upstream).routable

    def upstream_state(self, upstream: str) -> UpstreamState:
        """What keeps an upstream out of rotation, if anything (control/availability.py)."""
        drained, ejected = upstream in self.drained, upstream in self.outliers.ejected
        return upstream_state(self.health.verdict(upstream), drained=drained, ejected=ejected)

    @property
    def routing(self) -> RoutingSnapshot:
        """The snapshot the data plane routes by right now."""
        return self._dataplane.snapshot

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
        return self._dataplane.counters()

    def workers(self) -> list[WorkerState]:
        """The data-plane worker processes; empty when this process serves the traffic."""
        return self._dataplane.workers()

    def settled(self, changed: bool = True) -> Awaitable[None]:
        """Done once every data-plane worker routes by the latest snapshot and, after a
        call that `changed` something, in fleet mode, once the changes made here so far
        are in the fleet's state (not those made while it waits); Refused (409) when
        one was dropped for another member's change, made at the same time."""
        return self._settled(self.fleet.committed() if changed else None)

    async def _settled(self, committed: Awaitable[str | None] | None) -> None:
        await self._dataplane.settled()
        if committed is not None and (lost := await committed) is not None:
            raise Refused(
                "fleet",
                f"{lost}: this change was not made, and the fleet's state runs here; "
                "look at it and try again",
            )

    def join_fleet(self, link: FleetLink) -> None:
        """Fleet mode: share through `link`; the records of every member are summed
        for the judge of the member that leads."""
        self.fleet = link
        self.fleet_telemetry = Telemetry(self.telemetry.window)
        self.fleet_telemetry.retain = self.telemetry.retain

    def judged_telemetry(self) -> Telemetry:
        """What a rollout's judge reads: the whole fleet's records on its leader, this
        member's own elsewhere (a follower judges its own slice)."""
        if self.fleet_telemetry is not None and self.leads():
            return self.fleet_telemetry
        return self.telemetry

    def short_members(self, color: str, need: int) -> list[str]:
        """In a fleet, the other members that have fewer than `need` routable upstreams
        of `color`, as they last published it (this member counts its own itself)."""
        others = {n: r for n, r in self.fleet.reports.items() if n != self.fleet.name}
        return short_of(others, color, need)

    def judges(self) -> int:
        """A rollout's judges: this process's; in a fleet, each member's of its own
        slice (those that published their state) and the leader's of the whole."""
        if self.fleet_telemetry is None:
            return 1
        return 2 + sum(name != self.fleet.name for name in self.fleet.reports)

    def leads(self) -> bool:
        """This process drives rollouts: always, but in a fleet only its leader does."""
        return self.fleet.leads()

    def _fleet_refusal(self, changes: dict[str, Any], actor: Actor) -> str | None:
        """In a fleet that cannot reach etcd, an operator's change of the shared state is
        refused, except a rollout's end (a rollback always runs). zdproxy's own moves
        are not: a rollout does not advance without etcd (see leads), and what a
        member does meanwhile is written when etcd is back (control/shared.py)."""
        operator = actor in ("api", "cli")
        if not operator or not changes.keys() & set(SHARED) or ends_rollout(changes):
            return None
        return self.fleet.refusal()

    def local_errors(self) -> dict[tuple[LocalErrorSite, LocalErrorKind], int]:
        """Local resource errors since start, by site and kind: the data plane's upstream
        connects and the health checks' (each site has one owner, so nothing overlaps)."""
        return {**self._dataplane.local_errors(), **self.health.local_errors.counts}

    # -- commands (each journaled, then published) --------------------------------------

    def set_split(
        self,
        candidate_weight: int,
        *,
        live: Color | None = None,
        salt: str | None = None,
        force: bool = False,
        actor: Actor = "api",
    ) -> None:
        """Move the split. Refused while a rollout holds it (`force` does not bypass a
        rollout: abort does), and when a color that would get traffic has nothing
        routable, unless `force` (its share then goes to the other color, or 503)."""
        if (holder := self.rollouts.active) is not None:
            raise Refused(
                "candidate_weight",
                f"{holder.describe()} holds the split: use zdproxy rollout pause|promote|abort",
            )
        live = live or self.settings.split.live
        candidate: Color = "green" if live == "blue" else "blue"
        routable = self._dataplane.snapshot.pools
        for color, share in (
            (live, BASIS_POINTS - candidate_weight),
            (candidate, candidate_weight),
        ):
            if share and not routable[color] and not force:
                states = [self.upstream_state(t.id) for t in self.targets_of(color)]
                raise Refused(
                    "candidate_weight" if color == candidate else "live",
                    f"{color} would get {share / 100:g}% of the traffic but has no routable "
                    f"upstream: {unroutable(color, states)} (or pass force: its share then "
                    "goes to the other color)",
                )
        changes: dict[str, Any] = {"split": {"live": live, "candidate_weight": candidate_weight}}
        if salt is not None:
            changes["salt"] = salt
        self._write_split(changes, actor, durable=True, note=" (forced)" if force else "")

    def steer(
        self,
        weight: int,
        live: Color,
        rollout: dict[str, Any],
        actor: Actor,
        *,
        durable: bool,
        undrain: Color | None = None,
    ) -> None:
        """The split as the rollout holding it says, in one journal write with its record
        (and the undrain of a color it needs back): a crash never leaves one without the
        other. Any other rollout is fenced off."""
        changes, back = self._rollout_changes(rollout, undrain)
        changes["split"] = {"live": live, "candidate_weight": weight}
        note = f" (rollout {rollout['id']})"
        by = actor if actor != "auto" else f"rollout {rollout['id']}"
        self._write_split(changes, actor, durable=durable, note=note, by=by, rollout=rollout["id"])
        self._undrained(back, actor, by)

    def save_rollout(
        self, rollout: dict[str, Any], *, durable: bool, undrain: Color | None = None
    ) -> None:
        """A rollout's record without a split change; the snapshot follows it (its pins
        depend on the record: see control/snapshots.py)."""
        changes, back = self._rollout_changes(rollout, undrain)
        self.desired.change(changes, "auto", durable=durable)
        self._undrained(back, "auto", f"rollout {rollout['id']}")
        self.publish()

    def _rollout_changes(
        self, rollout: dict[str, Any], undrain: Color | None
    ) -> tuple[dict[str, Any], set[str]]:
        """A rollout's record (and the drain marks of `undrain` lifted), fenced by its id."""
        if self.rollouts.holder() != rollout["id"]:
            raise RuntimeError(f"rollout {rollout['id']} does not hold the split")
        changes: dict[str, Any] = {"rollout": rollout}
        back = self.drained & self.resolve(undrain) if undrain is not None else set()
        if back:
            changes["drained"] = sorted(self.drained - back)
        return changes, back

    def unsafe_to_start(self) -> str | None:
        journal = self.desired.journal
        if journal.reserved or journal.make_reserve():
            return None
        return (
            f"no room for the journal's reserve file {journal.reserve}: a rollback could not "
            "be journaled on a full disk; free some space"
        )

    def active_rollout(self) -> str | None:
        active = self.rollouts.active
        return active.describe() if active is not None else None

    def rolling_update(self) -> str | None:
        rolling = self.rolling.current
        if rolling is not None and rolling.state == "running":
            return f"rolling update {rolling.id} of {rolling.color}"
        return None

    def _write_split(
        self,
        changes: dict[str, Any],
        actor: Actor,
        *,
        durable: bool,
        note: str,
        by: str = "",
        **data: Any,
    ) -> None:
        before = {color: self.share(color) for color in COLORS}
        self.desired.change(changes, actor, durable=durable)
        split = self.settings.split
        live, weight = split.live, split.candidate_weight
        candidate = "green" if live == "blue" else "blue"
        self.events.emit(
            "split_changed",
            f"live {live}, candidate {candidate} at {weight / 100:g}%{note}",
            actor=actor,
            by=by,
            before=before,
            after={color: self.share(color) for color in COLORS},
            salt_changed="salt" in changes,
            **data,
        )
        self.publish()

    def set_pool(
        self, color: Color, members: PoolMembers, *, force: bool = False, actor: Actor = "api"
    ) -> None:
        """Replace a color's upstreams and version label. New upstreams of a checked pool
        are routable after their health checks pass. Refused when an upstream is one of
        zdproxy's own listeners (a loop), and, unless `force`, when the color takes
        traffic and none of its routable upstreams would remain."""
        for i, entry in enumerate(members.upstreams):
            if any(entry.address.reaches(own) for own in self.listeners):
                raise Refused(
                    f"upstreams[{i}].address", f"{entry.address} is zdproxy's own listener", 400
                )
        keep = {upstream_id(color, e.address) for e in members.upstreams}
        serving = {t.id for t in self._dataplane.snapshot.pools[color]}
        starved = self.share(color) and serving and not keep & serving
        if (starved or self._leaves_nothing(serving - keep)) and not force:
            raise Refused(
                "upstreams",
                f"{color} takes {self.share(color) / 100:g}% of the traffic and none of its "
                "serving upstreams would remain; new upstreams serve only after passing their "
                "health checks (set the idle color, or pass force)",
            )
        before = self.settings.pool(color).members()
        # Drain marks go with the upstreams they mark: one added back later starts fresh.
        changes: dict[str, Any] = {f"pools.{color}": members.members()}
        others = {uid for uid in self.drained if not uid.startswith(f"{color}/")}
        if (drained := others | (self.drained & keep)) != self.drained:
            changes["drained"] = sorted(drained)
        self.desired.change(changes, actor)
        self._sync_upstreams()
        self.events.emit(
            "pool_changed",
            f"{color}: {len(members.upstreams)} upstreams, version {members.version or '-'}",
            actor=actor,
            color=color,
            before=before,
            after=members.members(),
        )
        self.publish()

    def _leaves_nothing(self, removed: set[str]) -> bool:
        """The one safety rule of every control action: traffic that has somewhere to go
        keeps somewhere to go (a color with nothing routable falls back to the other)."""
        serving = self._serving()
        return bool(serving) and not serving - removed

    def _serving(self) -> set[str]:
        return {t.id for targets in self._dataplane.snapshot.pools.values() for t in targets}

    def set_rules(self, pins: list[PinSettings], *, actor: Actor = "api") -> None:
        value = [pin.model_dump(mode="json", exclude_defaults=True) for pin in pins]
        try:
            self.desired.change({"rules": value}, actor)
        except Refused as exc:  # the file calls them pins, the API rules
            field = exc.field
            if field.startswith("pins"):  # not a plan's step naming a pin: plans.NAME...
                field = "rules" + field.removeprefix("pins")
            raise Refused(field, exc.reason, exc.status) from None
        self.events.emit("rules_changed", f"{len(pins)} pin rules", actor=actor, rules=value)
        self.publish()

    def start_drain(
        self,
        *,
        color: str | None = None,
        upstream: str | None = None,
        force: bool = False,
        actor: Actor = "api",
        by: str = "",
    ) -> set[str]:
        """Mark upstreams drained (journaled) and take them out of rotation at once.
        Refused, unless `force`, when no routable upstream of either color would remain.
        `by`: who drains, for an automatic drain (see EventRecord.by)."""
        ids = self.resolve(color, upstream)
        if not force and self._leaves_nothing(ids):
            raise Refused(
                "upstream" if upstream is not None else "color",
                f"draining {', '.join(sorted(ids))} leaves no routable upstream in either color: "
                "every request would get 503 (pass force to do it anyway)",
            )
        if ids - self.drained:
            self.desired.change({"drained": sorted(self.drained | ids)}, actor)
            self.events.emit(
                "drain_started",
                f"draining {', '.join(sorted(ids))}",
                actor=actor,
                by=by,
                upstreams=sorted(ids),
            )
            self.publish()
        return ids

    async def wait_drained(
        self,
        ids: set[str],
        *,
        cut_after: float,
        tunnel_grace: float,
        actor: Actor = "api",
        by: str = "",
    ) -> DrainResult:
        result = await wait_drained(
            self._dataplane, ids, cut_after=cut_after, tunnel_grace=tunnel_grace
        )
        if ids:
            self.events.emit(
                "drained" if result.drained else "drain_cut",
                f"{', '.join(result.upstreams)} "
                + ("drained" if result.drained else f"timed out: {result.cut} cut")
                + f" in {result.seconds:.2f}s",
                actor=actor,
                by=by,
                level=logging.INFO if result.drained else logging.WARNING,
                **result.to_dict(),
            )
        return result

    def evacuate(self, color: str, grace: float) -> Awaitable[tuple[int, int]]:
        ids = {t.id for t in self.targets_of(color)}
        return self._dataplane.evacuate(ids, grace)

    def undrain(
        self, *, color: str | None = None, upstream: str | None = None, actor: Actor = "api"
    ) -> set[str]:
        """Put drained upstreams back into rotation (health checks still apply)."""
        ids = self.resolve(color, upstream) & self.drained
        if ids:
            self.desired.change({"drained": sorted(self.drained - ids)}, actor)
            self._undrained(ids, actor)
            self.publish()
        return ids

    def _undrained(self, ids: set[str], actor: Actor, by: str = "") -> None:
        if ids:
            self.events.emit(
                "undrained", f"back in rotation: {', '.join(sorted(ids))}", actor=actor, by=by
            )

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
            by="health",
            level=logging.INFO if health.up else logging.WARNING,
            upstream=target.id,
        )
        self.publish()

    def rollout_record(self) -> RolloutRecord | None:
        """The record last written: the active rollout's, else the last one's. Read from
        the desired state, not from `rollouts`: a transition is written (and published)
        before its Rollout object takes the new record, and an ended rollout's record
        stays there until the next deploy replaces it, across restarts too."""
        journaled = self.desired.items.get("rollout")
        return RolloutRecord.model_validate(journaled.value) if journaled is not None else None

    def snapshot_from_settings(self) -> RoutingSnapshot:
        record = self.rollout_record()
        return snapshots.build(
            self.settings, next(self._versions), self.routable, record, self._rollout_key(record)
        )

    def preview_secret(self) -> bytes:
        """What the verify hooks' preview tokens are signed with: the configured secret,
        else the active rollout's own key (b"" with neither)."""
        return self.settings.preview.signing_secret or self._rollout_key(self.rollout_record())

    def _rollout_key(self, record: RolloutRecord | None) -> bytes:
        """An active rollout's preview key: derived from a key this process drew at
        start, so it is never on disk, and ends with the rollout (or the process)."""
        if record is None or not record.state.active:
            return b""
        return hmac.new(self._preview_key, b"rollout %d" % record.id, hashlib.sha256).digest()

    def pin_fallback(self) -> snapshots.PinFallback | None:
        """The pins that go to the live color since the last rollout failed, if any."""
        return snapshots.fallback(self._dataplane.snapshot, self.rollout_record())

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
