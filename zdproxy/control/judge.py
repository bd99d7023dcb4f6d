"""The judge: is the candidate worse than allowed, over the same window as live?

Error rates are compared through Wilson score bounds, so that a handful of requests
never makes a verdict: one error in three requests has a lower bound near 6%, not
33%. Below `min_requests` the answer is "inconclusive", which the rollout handles by
its declared policy; it is never a pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal

from zdproxy.config.plans import JudgeSettings
from zdproxy.control.telemetry import WindowView

# "breach": beyond a limit, but not yet on `consecutive_breaches` ticks in a row.
Outcome = Literal["pass", "breach", "fail", "inconclusive"]


def wilson(errors: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion errors/n at z standard deviations."""
    if n == 0:
        return 0.0, 1.0
    p = errors / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At the edges the bound is exactly 0 (or 1), but centre - margin rounds to a few
    # 1e-17: enough to fail a candidate with no errors at all when max_error_rate = 0.
    low = 0.0 if errors == 0 else max(0.0, centre - margin)
    high = 1.0 if errors == n else min(1.0, centre + margin)
    return low, high


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


class Judge:
    def __init__(self, settings: JudgeSettings) -> None:
        self.settings = settings
        self.z = NormalDist().inv_cdf(1 - (1 - settings.confidence) / 2)
        self.breaches = 0

    def assess(self, candidate: WindowView, live: WindowView) -> Verdict:
        """One tick's verdict; "fail" only after `consecutive_breaches` breaching ticks."""
        breach = self._breach(candidate, live)
        if breach is None:
            self.breaches = 0
            if candidate.requests < self.settings.min_requests:
                return Verdict(
                    "inconclusive",
                    f"{candidate.requests} of {self.settings.min_requests} requests needed",
                    _numbers(candidate, live),
                )
            return Verdict("pass", "within limits", _numbers(candidate, live))
        self.breaches += 1
        if self.breaches < self.settings.consecutive_breaches:
            return Verdict("breach", f"breach {self.breaches}: {breach.reason}", breach.numbers)
        return breach

    def _breach(self, candidate: WindowView, live: WindowView) -> Verdict | None:
        s = self.settings
        if candidate.requests < s.min_requests:
            return None
        numbers = _numbers(candidate, live)
        low, _ = wilson(candidate.errors, candidate.requests, self.z)
        numbers["candidate_error_low"] = round(low, 6)
        if low > s.max_error_rate:
            return Verdict(
                "fail",
                f"error rate {candidate.error_rate:.1%} ({candidate.errors}/{candidate.requests}; "
                f"at least {low:.1%}) is above {s.max_error_rate:.1%}",
                numbers,
            )
        if live.requests >= s.min_requests:
            _, live_high = wilson(live.errors, live.requests, self.z)
            numbers["live_error_high"] = round(live_high, 6)
            if low > live_high + s.max_error_rate_over_live:
                return Verdict(
                    "fail",
                    f"error rate {candidate.error_rate:.1%} against live's {live.error_rate:.1%}: "
                    f"more than {s.max_error_rate_over_live:.1%} worse",
                    numbers,
                )
        # Latency is compared by histogram buckets, not by values interpolated inside
        # them: the candidate fails only when its p99 is certainly beyond the limit, so
        # coarse buckets never fail a fine candidate. A bucket holds (lower, upper], so
        # a bucket starting at the limit holds only values above it: `>=`, not `>`
        # (with `>`, max_p99 = 0.5 passed a candidate whose every request took 0.9 s).
        bucket = candidate.latency.bucket_of(0.99)
        p99 = candidate.latency.quantile(0.99)
        if bucket is not None and p99 is not None and s.max_p99 and bucket[0] >= s.max_p99:
            return Verdict(
                "fail", f"p99 {p99 * 1000:.0f} ms is above {s.max_p99 * 1000:.0f} ms", numbers
            )
        live_bucket = live.latency.bucket_of(0.99)
        if (
            bucket is not None
            and live_bucket is not None
            and p99 is not None
            and s.max_p99_ratio
            and live.requests >= s.min_requests
            and bucket[0] >= live_bucket[1] * s.max_p99_ratio
        ):
            live_p99 = live.latency.quantile(0.99) or live_bucket[1]
            return Verdict(
                "fail",
                f"p99 {p99 * 1000:.0f} ms against live's {live_p99 * 1000:.0f} ms: more than "
                f"{s.max_p99_ratio:g}x slower",
                numbers,
            )
        return None


def _numbers(candidate: WindowView, live: WindowView) -> dict[str, Any]:
    return {"candidate": candidate.to_dict(), "live": live.to_dict()}
