"""Fleet mode, the control plane's side: what the members share, and which of two
racing changes wins.

The members of a fleet share the split, the salt, the pin rules and the rollout's
record (`SHARED`): so a user's bucket gives the same color on every member, and one
rollout runs on all. Each member keeps its own pools (its local app servers, with
their health) and its drain marks (upstream ids are its own); a rollout's drains of a
color (undrained at a deploy, drained when the old color finishes) happen on every
member as it follows the record.

zdproxy/fleet/member.py moves the shared values between this member and etcd. The
control plane reaches it only through `FleetLink`; it reaches the control plane only
through its `SharedState` Protocol, which `SharedView` meets; neither imports the
other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from zdproxy.config.settings import COLORS, Settings
from zdproxy.config.units import Address
from zdproxy.control import state
from zdproxy.control.desired import DesiredState, Refused
from zdproxy.control.events import EventLog
from zdproxy.control.phases import RolloutRecord
from zdproxy.control.rollout.controller import Rollouts
from zdproxy.routing.records import IntervalRecord
from zdproxy.routing.snapshot import RoutingSnapshot, UpstreamTarget

SHARED = ("split", "salt", "rules", "rollout")


class FleetLink(Protocol):
    """What the control plane needs of its fleet membership."""

    def changed(self) -> None:
        """The desired state changed here (the shared part goes to the fleet)."""
        ...

    def leads(self) -> bool:
        """This member drives rollouts."""
        ...

    def refusal(self) -> str | None:
        """Why a change of the shared state is refused now (etcd unavailable), if so."""
        ...

    def committed(self) -> Awaitable[str | None]:
        """Wait for the changes made so far (up to the call) to reach the fleet: why
        one was dropped (another member's change won the race), else None."""
        ...

    def status(self) -> dict[str, Any]:
        """The membership, for `GET /v1/status` and /metrics."""
        ...

    def offer(self, records: list[IntervalRecord]) -> None:
        """This member's records of one tick, for the leader's judge of the fleet."""
        ...

    @property
    def name(self) -> str:
        """This member's name."""
        ...

    @property
    def reports(self) -> dict[str, dict[str, Any]]:
        """Every member's published state (see SharedView.report), by name."""
        ...

    def take_remote(self) -> list[IntervalRecord]:
        """The other members' records that arrived since the last call."""
        ...

    async def members(self) -> list[dict[str, Any]]:
        """Every member's published state, read from the store."""
        ...


class Solo:
    """No fleet: this process is the whole of it."""

    def __init__(self) -> None:
        self.name = ""
        self.reports: dict[str, dict[str, Any]] = {}

    def changed(self) -> None:
        pass

    def leads(self) -> bool:
        return True

    def refusal(self) -> str | None:
        return None

    def committed(self) -> Awaitable[str | None]:
        return _nothing_lost()

    def status(self) -> dict[str, Any]:
        return {}

    def offer(self, records: list[IntervalRecord]) -> None:
        pass

    def take_remote(self) -> list[IntervalRecord]:
        return []

    async def members(self) -> list[dict[str, Any]]:
        return []


async def _nothing_lost() -> str | None:
    return None


def short_of(reports: Mapping[str, Mapping[str, Any]], color: str, need: int) -> list[str]:
    """The members whose last published state has fewer than `need` routable upstreams
    of `color`, by name (a report that does not say counts as short)."""
    short = []
    for name, report in sorted(reports.items()):
        try:
            routable = int(report["pools"][color]["routable"])
        except (KeyError, TypeError, ValueError):
            routable = 0
        if routable < need:
            short.append(name)
    return short


def ends_rollout(changes: Mapping[str, Any]) -> bool:
    """The change ends a rollout (a rollback, an abort): it is never refused."""
    record = changes.get("rollout")
    return record is not None and not RolloutRecord.model_validate(record).state.active


def rebase(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, Any] | None:
    """Our change met theirs. A rollback (or any end) of the rollout theirs still runs
    wins: our record and split go on top of theirs. Anything else is dropped (None):
    the change written first stands, and ours is refused to its caller."""
    if not ends_rollout(ours) or theirs.get("rollout") is None:
        return None
    mine = RolloutRecord.model_validate(ours["rollout"])
    other = RolloutRecord.model_validate(theirs["rollout"])
    if other.id != mine.id or not other.state.active:
        return None
    return {**theirs, "rollout": ours["rollout"], "split": ours["split"]}


def checked(values: Mapping[str, Any]) -> dict[str, Any]:
    """The fleet's shared values in their canonical form; ValueError naming the item
    that does not fit (as the journal's items are checked on load)."""
    out = {}
    for key in SHARED:
        if key not in values:
            continue
        try:
            out[key] = state.checked(key, values[key])
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    return out


class Host(Protocol):
    """The control plane, as `SharedView` uses it."""

    desired: DesiredState
    events: EventLog
    rollouts: Rollouts
    listeners: list[Address]

    @property
    def settings(self) -> Settings: ...

    def share(self, color: str) -> int: ...

    def targets_of(self, color: str) -> list[UpstreamTarget]: ...

    def routable(self, upstream: str) -> bool: ...

    def publish(self) -> RoutingSnapshot: ...


class SharedView:
    """The control plane as the fleet member sees it (fleet/member.py: SharedState)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def shared(self) -> dict[str, Any]:
        """The shared items as they run here: the file's values overlaid with the
        runtime changes (the rollout's record only once there was a rollout)."""
        host = self.host
        values = {key: state.file_value(host.settings, key) for key in ("split", "salt", "rules")}
        if (record := host.desired.items.get("rollout")) is not None:
            values["rollout"] = record.value
        return values

    def adopt(self, values: dict[str, Any], origin: str) -> None:
        """Run the fleet's values (checked first: ValueError names the item that does
        not fit, and nothing changes); a rollout's record is followed (see
        Rollouts.follow)."""
        host = self.host
        current = self.shared()
        changes = {
            key: value for key, value in checked(values).items() if current.get(key) != value
        }
        if not changes:
            return
        by = f"member {origin}" if origin else "fleet"
        before = {color: host.share(color) for color in COLORS}
        try:
            host.desired.change(changes, "fleet", durable=False)
        except Refused as exc:
            raise ValueError(str(exc)) from None
        host.events.emit(
            "fleet_applied",
            f"applied {', '.join(sorted(changes))} of {by}",
            actor="fleet",
            by=by,
            items=sorted(changes),
            before=before,
            after={color: host.share(color) for color in COLORS},
        )
        host.publish()
        if "rollout" in changes:
            host.rollouts.follow(RolloutRecord.model_validate(changes["rollout"]), by)

    def rebase(self, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any] | None:
        return rebase(ours, theirs)

    def report(self) -> dict[str, Any]:
        """This member's own pools, their health and versions, and its shares."""
        host = self.host
        pools = {}
        for color in COLORS:
            targets = host.targets_of(color)
            pools[color] = {
                "version": host.settings.pool(color).version,
                "upstreams": len(targets),
                "routable": sum(host.routable(t.id) for t in targets),
            }
        rollout = host.rollouts.last
        return {
            "proxy": str(host.listeners[0]) if host.listeners else "",
            "pools": pools,
            "share": {color: host.share(color) for color in COLORS},
            "rollout": (
                {"id": rollout.id, "state": str(rollout.state), "step": rollout.step}
                if rollout is not None
                else None
            ),
        }
