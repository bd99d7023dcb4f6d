"""The routing snapshot: everything the data plane needs to choose an upstream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from zdproxy.routing.address import Address
from zdproxy.routing.vocabulary import COLORS, PIN_TARGETS, Color, PinTarget, other

BASIS_POINTS = 10_000

# What a pin does once a rollout of the color it leads to was rolled back, aborted or
# failed: "live" sends its requests to the live color until the next deploy, "stay"
# keeps them on the failed color.
AfterRollback = Literal["live", "stay"]
AFTER_ROLLBACK: tuple[AfterRollback, ...] = ("live", "stay")


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
    """Requests matching every given condition go to `to` (a color, "candidate" or "live");
    RoutingSnapshot.destination says where that is in a given snapshot.

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
    after_rollback: AfterRollback = "live"

    def __post_init__(self) -> None:
        if self.to not in PIN_TARGETS:
            raise ValueError(f"pin {self.name!r}: unknown target {self.to!r}")
        if self.after_rollback not in AFTER_ROLLBACK:
            raise ValueError(f"pin {self.name!r}: unknown after_rollback {self.after_rollback!r}")

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
            "after_rollback": self.after_rollback,
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
            data["after_rollback"],
        )


@dataclass(frozen=True, slots=True)
class Roles:
    """The colors the "live" and "candidate" pin targets name."""

    live: Color
    candidate: Color

    def __post_init__(self) -> None:
        if self.live == self.candidate:
            raise ValueError(f"roles: live and candidate are both {self.live}")

    def to_dict(self) -> dict[str, Any]:
        return {"live": self.live, "candidate": self.candidate}


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

    `roles` and `fallen` come from the rollout record (control/snapshots.py): the split's
    live color flips when a rollout promotes its candidate, a pin's role must not, and a
    rolled back candidate must not keep the users pinned to it.
    """

    version: int
    live: Color
    candidate_weight: int
    pools: dict[Color, tuple[UpstreamTarget, ...]] = field(default_factory=dict)
    sticky: StickyPolicy = StickyPolicy()
    pins: tuple[PinRule, ...] = ()  # ordered: the first match wins; rollout pins when on
    preview: PreviewPolicy = PreviewPolicy()
    # During a rollout: its old live color and its candidate, in every phase. None: the
    # split's live color and the other.
    roles: Roles | None = None
    # The candidate of the last rollout when it was rolled back, aborted or failed, until
    # the next deploy: a pin leading to it goes to the live color instead, unless its
    # after_rollback is "stay". None: no such rollout.
    fallen: Color | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.candidate_weight <= BASIS_POINTS:
            raise ValueError(f"candidate_weight must be 0-{BASIS_POINTS}")

    @property
    def candidate(self) -> Color:
        return other(self.live)

    def color_of(self, target: PinTarget) -> Color:
        """The color a pin target or a preview names in this snapshot."""
        if target == "live":
            return self.roles.live if self.roles is not None else self.live
        if target == "candidate":
            return self.roles.candidate if self.roles is not None else self.candidate
        return target

    def destination(self, pin: PinRule) -> PinTarget:
        """Where `pin` sends its requests in this snapshot: its own target, or "live"
        when that leads to the fallen color and the pin does not stay there."""
        falls_back = self.fallen is not None and pin.after_rollback == "live"
        if falls_back and self.color_of(pin.to) == self.fallen:
            return "live"
        return pin.to

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "live": self.live,
            "candidate_weight": self.candidate_weight,
            "pools": {c: [t.to_dict() for t in self.pools.get(c, ())] for c in COLORS},
            "sticky": self.sticky.to_dict(),
            "pins": [pin.to_dict() for pin in self.pins],
            "preview": self.preview.to_dict(),
            "roles": self.roles.to_dict() if self.roles is not None else None,
            "fallen": self.fallen,
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
        roles = Roles(**data["roles"]) if data.get("roles") else None
        return cls(
            data["version"],
            data["live"],
            data["candidate_weight"],
            pools,
            sticky,
            pins,
            preview,
            roles,
            data.get("fallen"),
        )
