"""Passive outlier ejection: upstreams whose requests fail in a row leave rotation.

The data plane keeps a failure streak per upstream (5xx or no response, reset by
any other answer); the control plane reads the streaks on its tick. An ejected
upstream stays out for `base_ejection` times the number of its ejections, and
comes back only after that time and, if its pool has health checks, a passing
check newer than the end of its ejection. A pool never has more than
`max_ejected_percent` of its upstreams ejected, rounded down: at 50%, none of a pool
of one. An upstream kept in rotation by that limit starts a new streak, and says so
in an `ejection_skipped` event at most once per SKIP_REPORT_SECONDS (the next one
counts those left unsaid): a steadily failing upstream fails a streak every few
requests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from zdproxy.config.settings import OutlierSettings
from zdproxy.control.events import EventLog
from zdproxy.control.health import HealthChecker
from zdproxy.routing.plane import DataPlane
from zdproxy.routing.snapshot import UpstreamTarget

SKIP_REPORT_SECONDS = 60.0  # at most one ejection_skipped event per upstream this often


@dataclass
class Ejection:
    until: float
    times: int  # how often this upstream has been ejected: the time multiplier


@dataclass
class _Skips:
    reported: float  # when this upstream's last ejection_skipped event was emitted
    unreported: int = 0  # skips since then, told by the next event


class OutlierDetector:
    def __init__(self, dataplane: DataPlane, health: HealthChecker, events: EventLog) -> None:
        self._dataplane = dataplane
        self._health = health
        self._events = events
        self.ejected: dict[str, Ejection] = {}
        self._times: dict[str, int] = {}  # ejections so far, kept after each return
        self._skips: dict[str, _Skips] = {}

    def tick(
        self,
        now: float,
        settings_of: Mapping[str, OutlierSettings],
        targets_of: Callable[[str], list[UpstreamTarget]],
    ) -> bool:
        """Eject and return upstreams; True when routing must change. `settings_of` maps
        a color to its outlier settings; `targets_of` lists a color's upstreams, and is
        called only when some upstream has failed often enough to matter."""
        changed = self._returns(now)
        thresholds = [
            s.consecutive_failures for s in settings_of.values() if s.consecutive_failures
        ]
        if not thresholds:
            return changed
        streaks = self._dataplane.failure_streaks(min(thresholds))
        if not streaks:  # the usual tick: nothing failing, nothing to build
            return changed
        for color, settings in settings_of.items():
            if not settings.consecutive_failures:
                continue
            targets = targets_of(color)
            allowed = len(targets) * settings.max_ejected_percent // 100
            ejected = sum(t.id in self.ejected for t in targets)
            for target in targets:
                streak = streaks.get(target.id, 0)
                if target.id in self.ejected or streak < settings.consecutive_failures:
                    continue
                if ejected >= allowed:
                    limit = _limit(color, len(targets), ejected, allowed, settings)
                    self._skipped(now, target.id, streak, limit, ejected)
                    self._dataplane.forget_streak(target.id)
                    continue
                times = self._times.get(target.id, 0) + 1
                self._times[target.id] = times
                seconds = settings.base_ejection * times
                self.ejected[target.id] = Ejection(now + seconds, times)
                self._dataplane.forget_streak(target.id)
                ejected += 1
                changed = True
                self._events.emit(
                    "upstream_ejected",
                    f"{target.id} ejected for {seconds:g}s after {streak} failures in a row",
                    by="outliers",
                    level=logging.WARNING,
                    upstream=target.id,
                    failures=streak,
                    seconds=seconds,
                    ejections=times,
                )
        return changed

    def _skipped(self, now: float, upstream_id: str, streak: int, limit: str, out: int) -> None:
        """Say that an upstream stays in rotation for the limit, at most once per
        SKIP_REPORT_SECONDS per upstream."""
        last = self._skips.get(upstream_id)
        if last is not None and now - last.reported < SKIP_REPORT_SECONDS:
            last.unreported += 1
            return
        unreported = last.unreported if last is not None else 0
        self._skips[upstream_id] = _Skips(now)
        since = (
            f" ({unreported} more streaks kept it in since the last such event)"
            if unreported
            else ""
        )
        self._events.emit(
            "ejection_skipped",
            f"{upstream_id} failed {streak} times in a row but stays in rotation: {limit}" + since,
            by="outliers",
            level=logging.WARNING,
            upstream=upstream_id,
            failures=streak,
            ejected=out,
            unreported=unreported,
        )

    def _returns(self, now: float) -> bool:
        changed = False
        for upstream_id, ejection in list(self.ejected.items()):
            if now < ejection.until:
                continue
            state = self._health.state(upstream_id)
            if state is not None and not (state.up and state.last_pass > ejection.until):
                continue  # checked pools: wait for a passing check after the ejection
            del self.ejected[upstream_id]
            # Requests in flight when it was ejected may have failed since: that streak
            # is the same fault it served its time for, not a new one to eject it again.
            self._dataplane.forget_streak(upstream_id)
            changed = True
            self._events.emit(
                "upstream_returned",
                f"{upstream_id} returns after its ejection",
                by="outliers",
                upstream=upstream_id,
            )
        return changed

    def ejections(self, upstream_id: str) -> int:
        """How often this upstream has been ejected since it was configured."""
        return self._times.get(upstream_id, 0)

    def forget(self, known: set[str]) -> None:
        """Drop the state of upstreams that are no longer configured."""
        for upstream_id in set(self.ejected) - known:
            del self.ejected[upstream_id]
        for upstream_id in set(self._times) - known:
            del self._times[upstream_id]
        for upstream_id in set(self._skips) - known:
            del self._skips[upstream_id]


def _limit(color: str, size: int, out: int, allowed: int, settings: OutlierSettings) -> str:
    """Why max_ejected_percent keeps an upstream in, in the pool's own numbers."""
    percent = settings.max_ejected_percent
    if allowed == 0:
        return (
            f"max_ejected_percent = {percent} allows no ejection in {color}'s pool of "
            f"{size} ({percent}% of {size} is less than one upstream)"
        )
    return (
        f"{out} of {color}'s {size} upstreams are ejected already, the most "
        f"max_ejected_percent = {percent} allows"
    )
