"""`GET /v1/fleet`: every member of this member's fleet (fleet mode)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from zdproxy.admin.app import ApiError, Call, Route
from zdproxy.admin.fleet_models import Fleet, Member, Membership
from zdproxy.control.plane import ControlPlane
from zdproxy.fleet.store import StoreError


class FleetAPI:
    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def routes(self) -> list[Route]:
        return [
            Route(
                "GET",
                "/v1/fleet",
                "The fleet's members (fleet mode)",
                self.fleet,
                Fleet,
                description="Every member that holds its lease, as it last published itself: "
                "its applied revision and lag, whether it leads, its pools' health and "
                "versions, its share per color. 404 without [fleet].",
            )
        ]

    async def fleet(self, call: Call) -> BaseModel | web.StreamResponse:
        fleet = self.control.fleet
        status = fleet.status()
        if not status:
            raise ApiError(404, "fleet mode is off: this zdproxy has no [fleet] endpoints")
        membership = Membership.model_validate(status)
        try:
            published = await fleet.members()
        except StoreError as exc:
            return Fleet(membership=membership, members=[], error=str(exc))
        latest = membership.latest_revision
        members = sorted(
            (m for m in (_member(p, latest) for p in published) if m is not None),
            key=lambda m: m.name,
        )
        return Fleet(membership=membership, members=members)


def _member(published: dict[str, Any], latest: int) -> Member | None:
    """A member's published state; None if it is not one (nothing to show of it)."""
    try:
        applied = int(published.get("applied_revision", 0))
        share = {c: v / 100 for c, v in dict(published.get("share", {})).items()}
        return Member.model_validate(
            {
                **published,
                "share": share,
                "lag": max(0, latest - applied),
                "age_seconds": round(max(0.0, time.time() - float(published["published"])), 3),
            }
        )
    except (ValidationError, KeyError, TypeError, ValueError):
        return None
