"""The routing snapshot: everything the data plane needs to choose an upstream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zdproxy.routing.address import Address
from zdproxy.routing.vocabulary import COLORS, PIN_TARGETS, Color, PinTarget, other

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
class PinRule:
    """Requests matching every given condition go to `to` (a color, "candidate" or "live").

    Values are kept as configured; the data plane normalises and compiles them.
    """

    name: str
    to: PinTarget
    header: str = ""  # with `values`: the header's value is one of them
    cookie: str = ""  # with `values`: the cookie's value is one of them
    values: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    path_prefixes: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.to not in PIN_TARGETS:
            raise ValueError(f"pin {self.name!r}: unknown target {self.to!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "to": self.to,
            "header": self.header,
            "cookie": self.cookie,
            "values": list(self.values),
            "hosts": list(self.hosts),
            "path_prefixes": list(self.path_prefixes),
            "networks": list(self.networks),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PinRule:
        return cls(
            data["name"],
            data["to"],
            data["header"],
            data["cookie"],
            tuple(data["values"]),
            tuple(data["hosts"]),
            tuple(data["path_prefixes"]),
            tuple(data["networks"]),
        )


@dataclass(frozen=True, slots=True)
class PreviewPolicy:
    """The preview override: which header and cookie name a color, and who may use them.

    The secret crosses to the data plane with the snapshot (hex in to_dict, so a
    worker process can verify tokens); it is kept out of repr so logs never show it.
    """

    header: str = "X-Zd-Color"  # "" disables the header
    cookie: str = "zd_color"  # "" disables the cookie
    allow_networks: tuple[str, ...] = ()
    secret: bytes = field(default=b"", repr=False)

    @property
    def enabled(self) -> bool:
        """Whether any override can be honoured at all."""
        return bool(self.allow_networks or self.secret) and bool(self.header or self.cookie)

    def to_dict(self) -> dict[str, Any]:
        return {
            "header": self.header,
            "cookie": self.cookie,
            "allow_networks": list(self.allow_networks),
            "secret": self.secret.hex(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreviewPolicy:
        return cls(
            data["header"],
            data["cookie"],
            tuple(data["allow_networks"]),
            bytes.fromhex(data["secret"]),
        )


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
    pins: tuple[PinRule, ...] = ()  # ordered: the first match wins
    preview: PreviewPolicy = PreviewPolicy()

    def __post_init__(self) -> None:
        if not 0 <= self.candidate_weight <= BASIS_POINTS:
            raise ValueError(f"candidate_weight must be 0-{BASIS_POINTS}")

    @property
    def candidate(self) -> Color:
        return other(self.live)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "live": self.live,
            "candidate_weight": self.candidate_weight,
            "pools": {c: [t.to_dict() for t in self.pools.get(c, ())] for c in COLORS},
            "sticky": self.sticky.to_dict(),
            "pins": [pin.to_dict() for pin in self.pins],
            "preview": self.preview.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingSnapshot:
        pools = {
            color: tuple(UpstreamTarget.from_dict(t) for t in targets)
            for color, targets in data["pools"].items()
        }
        sticky = StickyPolicy(**data.get("sticky", {}))
        pins = tuple(PinRule.from_dict(pin) for pin in data.get("pins", ()))
        preview = PreviewPolicy.from_dict(data["preview"]) if "preview" in data else PreviewPolicy()
        return cls(
            data["version"], data["live"], data["candidate_weight"], pools, sticky, pins, preview
        )
