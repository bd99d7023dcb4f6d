"""Draining: wait until upstreams that left rotation have finished their work.

The control plane first takes the upstreams out of the snapshot (no new
request reaches them, their idle connections close); this module then watches
the data plane until what was in flight has finished. Upgrade tunnels get
`tunnel_grace` before they are closed; whatever is left after `cut_after` is cut.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

from zdproxy.routing.plane import DataPlane

POLL_SECONDS = 0.05


@dataclass(frozen=True)
class DrainResult:
    upstreams: tuple[str, ...]
    drained: bool  # True: nothing was left in flight; False: `cut` were cut at the timeout
    cut: int
    tunnels_closed: int  # tunnels closed after the grace period (not counted as cut)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def wait_drained(
    dataplane: DataPlane, ids: set[str], *, cut_after: float, tunnel_grace: float
) -> DrainResult:
    loop = asyncio.get_running_loop()
    started = loop.time()
    tunnels_closed = 0
    cut = 0
    while True:
        requests, tunnels = dataplane.in_flight(ids)
        elapsed = loop.time() - started
        if not requests and not tunnels:
            break
        if tunnels and elapsed >= tunnel_grace:
            tunnels_closed += await dataplane.close_tunnels(ids)
        if elapsed >= cut_after:
            cut = await dataplane.cut(ids) + await dataplane.close_tunnels(ids)
            break
        await asyncio.sleep(POLL_SECONDS)
    return DrainResult(
        upstreams=tuple(sorted(ids)),
        drained=cut == 0,
        cut=cut,
        tunnels_closed=tunnels_closed,
        seconds=round(loop.time() - started, 3),
    )
