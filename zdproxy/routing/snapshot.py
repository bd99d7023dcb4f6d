"""The routing snapshot: everything the data plane needs to choose an upstream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zdproxy.config.settings import COLORS, Color
from zdproxy.config.units import Address

BASIS_POINTS = 10_000


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """One routable app server. `id` is stable across snapshots ("blue/127.0.0.1:9001")."""

    id: str
    color: Color
    address: Address
    weight: int = 100

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "color": self.color,
            "address": str(self.address),
            "weight": self.weight,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpstreamTarget:
        return cls(data["id"], data["color"], Address.parse(data["address"]), data["weight"])


def upstream_id(color: Color, address: Address) -> str:
    return f"{color}/{address}"


@dataclass(frozen=True, slots=True)
class StickyPolicy:
    """How a request's bucket (0-9999) is found; see SplitSettings for the meaning."""

    key: str = "bucket-cookie"  # "bucket-cookie", "client-ip", "cookie:NAME", "header:NAME"
    bucket_cookie: str = "zd_bucket"
    bucket_cookie_max_age: int = 30 * 86400
    salt: str = "zdproxy"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "bucket_cookie": self.bucket_cookie,
            "bucket_cookie_max_age": self.bucket_cookie_max_age,
            "salt": self.salt,
        }


@dataclass(frozen=True, slots=True)
class RoutingSnapshot:
    """Immutable; the control plane builds a new one for every change and swaps it in whole.

    `pools` holds only routable upstreams: an upstream absent from it gets no new request.
    The candidate is the color that is not live; it gets `candidate_weight` basis points.
    """

    version: int
    live: Color
    candidate_weight: int
    pools: dict[Color, tuple[UpstreamTarget, ...]] = field(default_factory=dict)
    sticky: StickyPolicy = StickyPolicy()

    def __post_init__(self) -> None:
        if not 0 <= self.candidate_weight <= BASIS_POINTS:
            raise ValueError(f"candidate_weight must be 0-{BASIS_POINTS}")

    @property
    def candidate(self) -> Color:
        return "green" if self.live == "blue" else "blue"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "live": self.live,
            "candidate_weight": self.candidate_weight,
            "pools": {c: [t.to_dict() for t in self.pools.get(c, ())] for c in COLORS},
            "sticky": self.sticky.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingSnapshot:
        pools = {
            color: tuple(UpstreamTarget.from_dict(t) for t in targets)
            for color, targets in data["pools"].items()
        }
        sticky = StickyPolicy(**data.get("sticky", {}))
        return cls(data["version"], data["live"], data["candidate_weight"], pools, sticky)
