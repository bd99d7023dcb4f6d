"""The two interfaces between the planes: routing snapshots go down, response records come up.

Both are small, immutable and serialisable to plain dicts, so the data plane can
later run in worker processes with the control plane in the parent.
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
