"""The judge: is the candidate worse than the live color, or than its absolute limits?

Each judged phase of a rollout (a step, the bake) has a Judge, fed on every tick
with what each color did since the last tick. It runs anytime-valid tests
(control/sequential.py), so it may decide on any tick, as soon as the evidence
suffices, while the chance that a candidate as good as live is rolled back stays
below `false_rollback_rate` for the whole rollout:

- errors: 5xx answers and upstream failures (connect, timeout, reset), counted for
  the candidate even when a retry on live hid them from the user, plus requests
  pending longer than the hang bound (a hang counts before it times out);
- against `max_error_rate` (absolute); against `max_error_ratio` times the live
  color's rate (its upper confidence bound over the rollout, or its rate over the
  recent window or the last half second if higher); and, while live serves part of
  the traffic (a step under 100%), by the color each error comes from (a candidate
  no worse than that ratio makes at most its share of the two colors' errors,
  whatever live's rate: strong evidence per error at a small share, where its
  requests are few; an outage both colors share cancels out). The comparisons with
  live fail the candidate only with its recent error rate also
  `max_error_rate_over_live` above live's: a practical margin, as Kayenta's effect
  size;
- latency: more than half of the candidate's requests slower than
  `max_latency_ratio` times the live color's median, or more than 1% slower than
  that times live's p99, or than `max_p99`; live's quantiles are upper confidence
  bounds from fine histograms over the rollout, or its quantiles over the last half
  second if higher: a candidate as fast as live is not failed by noise, nor by a
  slowdown both colors share.

The live color's numbers are the rollout's reference: they accumulate over its steps
and freeze at promotion, so the bake compares the new live color with the old one as
it was before the switch.

A verdict is "fail" (an alarm), "hold" (too little evidence to pass: fewer than
`min_requests` in the phase, or no active user in the candidate's share), or "pass"
(no alarm, enough requests). Whether a pass ends a step is the rollout's business.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from zdproxy.config.plans import JudgeSettings
from zdproxy.control.sequential import ChangeDetector, bernoulli_bounds, change_prior, excludes
from zdproxy.control.telemetry import WindowView
from zdproxy.routing.histogram import BOUNDS, Histogram

Outcome = Literal["pass", "hold", "fail"]

# A pending request counts as failed past max(pending_failure_after, this x live's p99).
PENDING_P99_FACTOR = 4.0
# The confidence of the bounds shown to operators (not those the tests use).
DISPLAY_ALPHA = 0.05
# Live's latency over the last ticks of this span is the candidate's reference too: a
# slowdown both colors share (a busy machine, a slow database) is not the candidate's.
SHARED_SPAN_TICKS = 5
# The tests against live's error rate: they need the practical margin too.
AGAINST_LIVES_ERRORS = ("errors_vs_live", "errors_by_color")
# Evidence shown is capped: with nothing allowed (a limit of 0) one event is infinite.
EVIDENCE_SHOWN_MAX = 1000.0


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


class Reference:
    """The live color's traffic over a rollout: what the candidate is compared with.
    Frozen at promotion, so that the bake compares with the old live color."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = Histogram()
        self.frozen = False

    def add(self, fresh: WindowView) -> None:
        if not self.frozen:
            self.requests += fresh.requests
            self.errors += fresh.errors
            self.latency.add(fresh.latency)


def shown_after(events: int, trials: int, limit: float, least: int) -> int | None:
    """The fewest trials (at least `least`) after which `events` in them show a rate
    under `limit`: the upper bound of its 95% confidence sequence below it, as if no
    more events came. None if the events already seen are too many for that."""
    if events >= limit * max(trials, 1) and trials:
        return None

    def shows(n: int) -> bool:
        return events < limit * n and excludes(events, n, limit, DISPLAY_ALPHA)

    low, high = 0, max(least, 1)
    while not shows(high):  # doubling, then bisection: a few dozen cheap evaluations
        low, high = high, high * 2
    while low + 1 < high:
        mid = (low + high) // 2
        low, high = (low, mid) if shows(mid) else (mid, high)
    return max(high, least)


def quantile_upper(histogram: Histogram, q: float, alpha: float) -> float:
    """An upper confidence bound on the q-quantile: the least bucket bound below which,
    with confidence 1 - alpha, a share q of the values lie. inf when the histogram holds
    too few values to say."""
    n = histogram.count
    # The fewest values at or below a bound that put the share's confidence sequence
    # above q: the evidence against "the share is q" grows with the count past n*q.
    lo, hi = math.floor(n * q) + 1, n + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if excludes(mid, n, q, alpha):
            hi = mid
        else:
            lo = mid + 1
    if lo > n:
        return math.inf
    seen = 0
    for index in sorted(histogram.counts):
        seen += histogram.counts[index]
        if seen >= lo:
            return BOUNDS[index] if index < len(BOUNDS) else math.inf
    return math.inf


@dataclass
class _Test:
    """One anytime-valid test of the judge: its detector and what it last saw."""

    name: str
    detector: ChangeDetector
    of: Literal["requests", "errors"] = "requests"  # the trials: candidate requests, or
    # the errors of both colors (errors_by_color)
    limit: float = math.nan  # the share of the trials allowed to be events, last tick
    observed: tuple[int, int] = (0, 0)  # (events, trials) over the phase

    def feed(self, events: int, trials: int, limit: float, prior: float) -> None:
        self.detector.update(events, trials, limit, prior)
        self.limit = limit
        self.observed = (self.observed[0] + events, self.observed[1] + trials)

    def to_dict(self) -> dict[str, Any]:
        events, trials = self.observed
        return {
            "limit": None if math.isnan(self.limit) else round(self.limit, 6),
            "observed": round(events / trials, 6) if trials else None,
            "events": events,
            "trials": trials,
            "evidence": round(min(self.detector.evidence, EVIDENCE_SHOWN_MAX), 4),
            "of": self.of,
        }


class Judge:
    def __init__(
        self,
        settings: JudgeSettings,
        alpha: float,
        reference: Reference,
        started: float,
        *,
        shared: bool = True,
    ) -> None:
        """`alpha`: this phase's share of the rollout's false_rollback_rate. `shared`:
        live serves part of this phase's traffic (a step under 100%), so errors can be
        compared by the color they come from too."""
        self.settings = settings
        self.reference = reference
        self.started = started
        self.last = started  # the end of the last tick fed
        self.shared = shared
        s = settings
        names = ["errors"]
        if s.max_error_rate_over_live < 1:
            names.append("errors_vs_live")
            if shared:
                names.append("errors_by_color")
        if s.max_latency_ratio:
            names += ["p50_vs_live", "p99_vs_live"]
        if s.max_p99:
            names.append("p99")
        # A test against live's confidence bound leans on that bound too: a share each.
        leaning = sum(name.endswith("_vs_live") for name in names)
        self.alpha = alpha / (len(names) + leaning)
        self.tests = {name: _Test(name, ChangeDetector(self.alpha)) for name in names}
        if "errors_by_color" in self.tests:
            self.tests["errors_by_color"].of = "errors"
        self.live_ticks: deque[WindowView] = deque(maxlen=SHARED_SPAN_TICKS)
        self.requests = 0  # the candidate's, over the phase
        self.errors = 0
        self.pending_failed = 0  # requests counted as failed while pending
        # Hangs counted over the recent window (time, count): they are errors the
        # telemetry's window does not hold yet.
        self.crossed: deque[tuple[float, int]] = deque()
        self.live_limit = math.nan  # live's error bound plus the margin, for a pass
        self.recent_rates = (0.0, 0.0)  # the candidate's recent error rate, and live's
        self.excess = 0.0  # the first minus the second

    def hang_bound(self) -> float:
        p99 = self.reference.latency.quantile(0.99)
        derived = PENDING_P99_FACTOR * p99 if p99 is not None else 0.0
        return max(self.settings.pending_failure_after, derived)

    def assess(
        self,
        now: float,
        fresh: WindowView,
        fresh_live: WindowView,
        recent: WindowView,
        recent_live: WindowView,
    ) -> Verdict:
        """Feed one tick (`fresh`: what each color did since the last; `recent`: over the
        sliding window) and judge."""
        reference = self.reference
        reference.add(fresh_live)
        self.live_ticks.append(fresh_live)
        prior = change_prior(self.last - self.started, now - self.started)
        span, self.last = now - self.last, now
        # A request crosses the hang bound once: count it in the tick it crosses.
        bound = self.hang_bound()
        crossed = sum(1 for age in fresh.pending if bound <= age < bound + span)
        self.pending_failed += crossed
        errors, requests = fresh.errors + crossed, fresh.requests + crossed
        self.requests += requests
        self.errors += errors
        self.crossed.append((now, crossed))
        while self.crossed and self.crossed[0][0] <= now - self.settings.window:
            self.crossed.popleft()
        self._feed(errors, requests, fresh.latency, fresh_live, recent_live, prior)
        self.recent_rates = self._recent_rates(recent, recent_live)
        self.excess = self.recent_rates[0] - self.recent_rates[1]
        return self._verdict(recent, recent_live)

    def _recent_rates(self, recent: WindowView, recent_live: WindowView) -> tuple[float, float]:
        """The candidate's error rate over the recent window (hangs included), and
        live's: over the same window while live serves, else the reference's."""
        hangs = sum(count for _, count in self.crossed)
        requests = recent.requests + hangs
        rate = (recent.errors + hangs) / requests if requests else 0.0
        if self.shared and recent_live.requests:
            return rate, recent_live.errors / recent_live.requests
        reference = self.reference
        return rate, reference.errors / reference.requests if reference.requests else 0.0

    def _feed(
        self,
        errors: int,
        requests: int,
        latency: Histogram,
        fresh_live: WindowView,
        recent_live: WindowView,
        prior: float,
    ) -> None:
        s, reference, tests = self.settings, self.reference, self.tests
        tests["errors"].feed(errors, requests, s.max_error_rate, prior)
        if "errors_vs_live" in tests:
            upper = bernoulli_bounds(reference.errors, reference.requests, self.alpha)[1]
            # A shared outage (a database down) raises live's recent rate too, and its
            # rate over the last ticks first. Only the rollout's bound makes the test
            # valid, so these may be plain estimates (a bound over a few seconds of
            # traffic would be wide for nothing).
            if not reference.frozen:
                last = (
                    sum(t.requests for t in self.live_ticks),
                    sum(t.errors for t in self.live_ticks),
                )
                for requests_seen, errors_seen in (
                    (recent_live.requests, recent_live.errors),
                    last,
                ):
                    if requests_seen:
                        upper = max(upper, errors_seen / requests_seen)
            self.live_limit = min(1.0, upper + s.max_error_rate_over_live)
            ratio = s.max_error_ratio
            tests["errors_vs_live"].feed(errors, requests, min(1.0, ratio * upper), prior)
        if "errors_by_color" in tests:
            # Which color each of this tick's errors comes from: were the candidate's
            # error rate at most `ratio` times live's, its errors would be at most this
            # share of the two colors' (a binomial, given the requests each served).
            allowed = s.max_error_ratio * requests
            share = allowed / (allowed + fresh_live.requests) if allowed else 0.0
            tests["errors_by_color"].feed(errors, errors + fresh_live.errors, share, prior)
        n = latency.count
        shared = Histogram()
        if not reference.frozen:
            for piece in self.live_ticks:
                shared.add(piece.latency)
        for name, q in (("p50_vs_live", 0.5), ("p99_vs_live", 0.99)):
            if name in tests:
                # The higher of live's bound over the rollout and its quantile over the
                # last ticks, as for errors.
                bound = quantile_upper(reference.latency, q, self.alpha)
                now = shared.quantile(q)
                if now is not None:
                    bound = max(bound, now)
                slow = s.max_latency_ratio * bound
                events = latency.above(slow) if math.isfinite(slow) else 0
                tests[name].feed(events, n, 1 - q, prior)
        if "p99" in tests:
            tests["p99"].feed(latency.above(s.max_p99), n, 0.01, prior)

    def _verdict(self, recent: WindowView, recent_live: WindowView) -> Verdict:
        numbers = self.numbers()
        numbers["recent"] = {"candidate": recent.to_dict(), "live": recent_live.to_dict()}
        for test in self.tests.values():
            if test.detector.alarm and self._practical(test):
                return Verdict("fail", self._failure(test), numbers)
        needed, why = self._needed()
        numbers["requests_needed"] = needed
        numbers["eta_seconds"] = None
        if needed == 0:
            return Verdict("pass", "within limits", numbers)
        if not recent.requests and recent_live.requests:
            # Sticky buckets: a small share can hold none of the users active right now.
            numbers["no_active_users"] = True
            return Verdict("hold", "no active user in the candidate's share", numbers)
        if needed is not None and recent.rate:
            numbers["eta_seconds"] = round(needed / recent.rate, 1)
        return Verdict("hold", why, numbers)

    def _practical(self, test: _Test) -> bool:
        """Whether an alarm matters: one against live's error rate also needs the
        candidate's recent rate `max_error_rate_over_live` above live's (0.2% against
        live's 0.05% is soon shown worse, and is no reason to roll back)."""
        if test.name not in AGAINST_LIVES_ERRORS:
            return True
        return self.excess > self.settings.max_error_rate_over_live

    def _needed(self) -> tuple[int | None, str]:
        """Candidate requests still needed before a pass (None: more will not do, only
        a better candidate), and why. A pass needs `min_requests`, its error rate shown
        under the lowest error limit and its share of requests slower than the median
        test's bound shown under one half: the upper bounds of their 95% confidence
        sequences below the limits, as if no more bad requests came. Without that, a
        short hold would pass a 3% error rate, or a 2x slower candidate, at a 10% step
        long before any test could tell."""
        floor = self.settings.min_requests
        asks = []  # (events, trials, limit, what is to be shown)
        limits = [
            limit
            for limit in (self.tests["errors"].limit, self.live_limit)
            if limit > 0  # 0: one error fails; nan: not compared, or nothing seen yet
        ]
        if limits:
            limit = min(limits)
            asks.append((self.errors, self.requests, limit, f"its error rate under {limit:.1%}"))
        median = self.tests.get("p50_vs_live")
        if median is not None and not math.isnan(median.limit):
            events, trials = median.observed
            ratio = self.settings.max_latency_ratio
            what = f"no more than half its requests slower than {ratio:g}x live's median"
            asks.append((events, trials, median.limit, what))
        needed, why = (
            max(0, floor - self.requests),
            f"{self.requests} of {floor} candidate requests",
        )
        for events, trials, limit, what in asks:
            shown = shown_after(events, trials, limit, max(floor, trials))
            if shown is None:
                return None, f"cannot show {what} yet ({events} of {trials})"
            if shown - trials > needed:
                needed, why = (
                    shown - trials,
                    f"{trials} of {shown} candidate requests to show {what}",
                )
        return needed, why

    def _failure(self, test: _Test) -> str:
        events, trials = test.observed
        s, shown = self.settings, f"{events}/{trials}"
        if test.name == "errors":
            # A detector fails on the requests since a change, which the phase's count
            # dilutes: the recent rate says more.
            return (
                f"error rate above {s.max_error_rate:.1%} since it changed: "
                f"{self.recent_rates[0]:.1%} recently ({shown} over the phase)"
            )
        if test.name in AGAINST_LIVES_ERRORS:
            return self._worse_than_live(test)
        if test.name == "p99":
            return f"{shown} requests slower than max_p99 {s.max_p99 * 1000:g} ms (over 1%)"
        share = "half" if test.name == "p50_vs_live" else "1%"
        quantile = "median" if test.name == "p50_vs_live" else "p99"
        return (
            f"{shown} requests slower than {s.max_latency_ratio:g}x live's {quantile} "
            f"(more than {share})"
        )

    def _worse_than_live(self, test: _Test) -> str:
        events, trials = test.observed
        ratio = self.settings.max_error_ratio
        candidate, live = self.recent_rates
        recently = f"{candidate:.1%} recently against live's {live:.1%}"
        if test.of == "errors":
            return (
                f"{events} of the {trials} errors of both colors are the candidate's, more "
                f"than its share ({test.limit:.0%}) at {ratio:g}x live's error rate: {recently}"
            )
        return (
            f"error rate above {ratio:g}x live's since it changed: {recently} "
            f"({events}/{trials} over the phase)"
        )

    def numbers(self) -> dict[str, Any]:
        """The phase's evidence, for the status, the events and the metrics."""
        low, high = bernoulli_bounds(self.errors, self.requests, DISPLAY_ALPHA)
        reference = self.reference
        tests = {name: test.to_dict() for name, test in self.tests.items()}
        for name in AGAINST_LIVES_ERRORS:
            if name in tests:
                tests[name]["excess"] = round(self.excess, 6)
        live_p50, live_p99 = reference.latency.quantile(0.5), reference.latency.quantile(0.99)
        return {
            "candidate": {
                "requests": self.requests,
                "errors": self.errors,
                "error_rate": round(self.errors / self.requests, 6) if self.requests else None,
                "error_rate_bounds": [round(low, 6), round(high, 6)],
                "pending_failed": self.pending_failed,
            },
            "reference": {
                "requests": reference.requests,
                "errors": reference.errors,
                "error_rate": round(reference.errors / reference.requests, 6)
                if reference.requests
                else None,
                "p50_ms": _ms(live_p50),
                "p99_ms": _ms(live_p99),
                "frozen": reference.frozen,
            },
            "hang_after_ms": _ms(self.hang_bound()),
            "tests": tests,
            "evidence": max(test["evidence"] for test in tests.values()),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or not math.isfinite(seconds) else round(seconds * 1000, 3)
