"""The interfaces between the planes: routing snapshots go down, response records come up,
through the DataPlane Protocol (plane.py); and the vocabulary both planes and the
config share (vocabulary.py: colors, pin targets; address.py: addresses; local.py:
the local resource errors never blamed on an upstream).

All are small, immutable and serialisable to plain dicts, so the data plane can
later run in worker processes with the control plane in the parent. This package
imports nothing else of zdproxy, and no pydantic (`make contracts` checks it).
"""

from zdproxy.routing.records import FailureKind, IntervalRecord, UpstreamStats
from zdproxy.routing.snapshot import (
    PinRule,
    PreviewPolicy,
    RoutingSnapshot,
    StickyPolicy,
    UpstreamTarget,
)

__all__ = [
    "FailureKind",
    "IntervalRecord",
    "PinRule",
    "PreviewPolicy",
    "RoutingSnapshot",
    "StickyPolicy",
    "UpstreamStats",
    "UpstreamTarget",
]
