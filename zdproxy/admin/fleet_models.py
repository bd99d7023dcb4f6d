"""The fleet's answers: this member's membership (in `GET /v1/status`) and every
member's published state (`GET /v1/fleet`)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from zdproxy.config.settings import Color


class Membership(BaseModel):
    """This member in its fleet, as it knows it."""

    member: str = Field(description="This member's name ([fleet] name).")
    prefix: str = Field(description="The fleet's key prefix in etcd.")
    leader: str = Field(description='The member that drives rollouts; "" while none does.')
    leading: bool = Field(description="This member leads, and reaches etcd.")
    applied_revision: int = Field(
        description="The revision of the fleet's state this member runs (0: none yet)."
    )
    latest_revision: int = Field(description="The newest revision of it this member has seen.")
    available: bool = Field(description="etcd answered this member's last call.")
    reason: str = Field(description="Why etcd is unavailable, when it is.")
    since_seconds: float = Field(description="Since `available` last changed.")
    pending: bool = Field(
        description="A change made here is not in etcd yet (etcd unavailable, or a write "
        "in progress)."
    )
    lease: bool = Field(
        description="This member holds its lease: it is in the fleet's status and may lead. "
        "Without it, it is left out of the fleet and serves its last state."
    )
    conflicts: int = Field(description="Changes made here dropped for another member's.")
    store_errors: int = Field(description="etcd calls that failed (unavailable) since start.")
    writes: int = Field(description="Writes this member made to etcd since start.")
    bytes_written: int = Field(description="Their values' bytes.")


class MemberPool(BaseModel):
    version: str
    upstreams: int
    routable: int


class MemberRollout(BaseModel):
    id: int
    state: str
    step: int


class Member(BaseModel):
    """A member's own state, as it last published it (every [fleet] publish_interval,
    and at each revision it applies)."""

    name: str
    proxy: str = Field(description="Its proxy listener.")
    applied_revision: int
    lag: int = Field(description="Revisions of the fleet's state it has not applied yet.")
    leading: bool
    age_seconds: float = Field(description="Since it published this.")
    pools: dict[Color, MemberPool]
    share: dict[Color, float] = Field(description="Percent of its traffic per color.")
    rollout: MemberRollout | None


class Fleet(BaseModel):
    """GET /v1/fleet: the fleet as etcd holds it, read through this member."""

    membership: Membership
    members: list[Member] = Field(description="The members that hold a lease, by name.")
    error: str = Field(
        default="", description="Why the members could not be read (etcd unavailable)."
    )
