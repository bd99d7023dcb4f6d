"""What rollouts and rolling updates may use of the control plane: a narrow Protocol.

They never import the control plane (it imports them); the control plane meets this
Protocol, and the brain's tests can meet it with the in-memory data plane and a fake
clock. A rollout's record and split go through `steer` or `save_rollout`, which the
control plane fences by the rollout's id (only the holder of the split may write); its
drain of the old color is fenced by the rollout itself (see rollout/run.py).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from zdproxy.config.settings import Color, HealthSettings, Settings
from zdproxy.config.units import Address
from zdproxy.control.availability import UpstreamState
from zdproxy.control.drain import DrainResult
from zdproxy.control.events import Actor, EventLog
from zdproxy.control.health import HealthChecker
from zdproxy.control.telemetry import Telemetry
from zdproxy.routing.snapshot import UpstreamTarget


class ControlHost(Protocol):
    events: EventLog
    telemetry: Telemetry
    health: HealthChecker
    listeners: list[Address]

    @property
    def settings(self) -> Settings: ...

    def share(self, color: str) -> int: ...

    def targets_of(self, color: str) -> list[UpstreamTarget]: ...

    def configured(self) -> dict[str, tuple[UpstreamTarget, HealthSettings]]: ...

    def routable(self, upstream: str) -> bool: ...

    def upstream_state(self, upstream: str) -> UpstreamState:
        """What keeps an upstream out of rotation, if anything."""
        ...

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
        """The split and the rollout's record (and `undrain`'s drain marks lifted) in one
        journal write. `durable=False`: in memory even if the disk fails."""
        ...

    def save_rollout(
        self, rollout: dict[str, Any], *, durable: bool, undrain: Color | None = None
    ) -> None:
        """The rollout's record (and `undrain`'s drain marks lifted) in one journal write."""
        ...

    def judged_telemetry(self) -> Telemetry:
        """The records a rollout's judge reads (in a fleet, its leader's are the sum of
        every member's)."""
        ...

    def short_members(self, color: str, need: int) -> list[str]:
        """In a fleet, the other members with fewer than `need` routable upstreams of
        `color`, by name; [] without a fleet."""
        ...

    def judges(self) -> int:
        """How many judges a rollout has: 1, or in a fleet its members."""
        ...

    def leads(self) -> bool:
        """This process drives rollouts (in a fleet, only its leader does; the others
        judge their own slice)."""
        ...

    def rolling_update(self) -> str | None:
        """The rolling update in progress, if any: it and a rollout never run together."""
        ...

    def unsafe_to_start(self) -> str | None:
        """Why a rollout's end could not be journaled on a full disk (no reserve), if so."""
        ...

    def active_rollout(self) -> str | None:
        """The rollout in progress, if any, described for a refusal."""
        ...

    def start_drain(
        self,
        *,
        color: str | None = None,
        upstream: str | None = None,
        force: bool = False,
        actor: Actor = "api",
        by: str = "",
    ) -> set[str]: ...

    async def wait_drained(
        self,
        ids: set[str],
        *,
        cut_after: float,
        tunnel_grace: float,
        actor: Actor = "api",
        by: str = "",
    ) -> DrainResult: ...

    def preview_secret(self) -> bytes:
        """The key a verify hook's preview token must be signed with to be honoured."""
        ...

    def evacuate(self, color: str, grace: float) -> Awaitable[tuple[int, int]]:
        """After a rollback: replay the color's safe requests in flight on live, give
        the others `grace` seconds (see DataPlane.evacuate); the awaitable gives
        (replayed, left)."""
        ...

    def undrain(
        self, *, color: str | None = None, upstream: str | None = None, actor: Actor = "api"
    ) -> set[str]: ...
