"""Anytime-valid statistics for the judge: tests that may be looked at on every tick.

A test looked at once, after a fixed sample, is valid for that one look; the judge
looks ten times a second. Everything here keeps its error guarantee however often
it is read, by Ville's inequality: a nonnegative supermartingale that starts at 1
reaches 1/alpha with probability at most alpha.

- `bernoulli_bounds`: a confidence sequence for a rate (Robbins' conjugate mixture,
  as in Howard, Ramdas, McAuliffe and Sekhon, "Time-uniform, nonparametric,
  nonasymptotic confidence sequences", 2021). It holds at every sample size at once.
- `ChangeDetector`: is a rate above a limit, *from some moment on*? A mixture of
  likelihood ratios over a few alternatives (as in the mixture SPRT of Johari,
  Pekelis and Walsh, "Always valid inference", 2017) and over the moment the change
  began (a Shiryaev-Roberts e-detector, Shin, Ramdas and Rinaldo, "E-detectors",
  2023). Netflix judges canaries the same way (Lindon, Sanden and Shirikian, "Rapid
  regression detection in software deployments through sequential testing", 2022).
  A change that begins after minutes of good traffic is caught as fast as one from
  the start: good evidence from before the change is not held against it.
"""

from __future__ import annotations

import math

# The alternatives a detector weighs, as odds ratios against the limit: from a little
# worse to hopeless. Each gets the same prior weight; whichever fits the data dominates.
ODDS_RATIOS: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0)
_LOG_WEIGHT = -math.log(len(ODDS_RATIOS))

# Prior of the conjugate mixture behind `bernoulli_bounds`: Beta(1/2, 1/2) (Jeffreys).
_A = _B = 0.5
_LOG_BETA_AB = math.lgamma(_A) + math.lgamma(_B) - math.lgamma(_A + _B)
BISECTIONS = 32  # bounds to within 2**-32 (conservatively: rounded outwards)


def _log_marginal(x: int, n: int) -> float:
    """log of the mixture's probability of x events in n trials (in a given order)."""
    return math.lgamma(_A + x) + math.lgamma(_B + n - x) - math.lgamma(_A + _B + n) - _LOG_BETA_AB


def _log_evidence(x: int, n: int, p: float, log_marginal: float) -> float:
    """log of the mixture e-value against "the rate is p", after x events in n trials."""
    if p <= 0.0:
        return math.inf if x else 0.0
    if p >= 1.0:
        return math.inf if x < n else 0.0
    return log_marginal - x * math.log(p) - (n - x) * math.log1p(-p)


def excludes(x: int, n: int, p: float, alpha: float) -> bool:
    """Whether the (1 - alpha) confidence sequence after x events in n trials leaves p
    out."""
    return _log_evidence(x, n, p, _log_marginal(x, n)) >= math.log(1 / alpha)


def bernoulli_bounds(x: int, n: int, alpha: float) -> tuple[float, float]:
    """A (1 - alpha) confidence sequence for a rate, after x events in n trials: the
    true rate lies inside at every n, all at once, but with probability alpha."""
    if n == 0:
        return 0.0, 1.0
    limit = math.log(1 / alpha)
    log_marginal = _log_marginal(x, n)
    centre = x / n

    def outside(p: float) -> bool:
        return _log_evidence(x, n, p, log_marginal) >= limit

    # Bisection to a precision far below any limit the judge compares with.
    low = 0.0
    if x > 0:
        lo, hi = 0.0, centre  # outside at lo, inside at hi
        for _ in range(BISECTIONS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if outside(mid) else (lo, mid)
        low = lo
    high = 1.0
    if x < n:
        lo, hi = centre, 1.0  # inside at lo, outside at hi
        for _ in range(BISECTIONS):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if outside(mid) else (mid, hi)
        high = hi
    return low, high


def change_prior(start: float, end: float) -> float:
    """The prior probability that a change began between `start` and `end` seconds into
    the judged phase: the density 1 / ((t+1)(t+2) ln 2), which sums to 1 over all time.
    A change 3 s in costs log(1/prior) ~ 5 (nats of evidence) at a 100 ms tick; 5
    minutes in, ~13: early changes are caught a little faster, none is ever out of reach.
    """

    def cdf(t: float) -> float:
        return math.log((t + 1) / (t + 2))

    return max(0.0, (cdf(end) - cdf(start)) / math.log(2))


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    high, low = (a, b) if a >= b else (b, a)
    if high == math.inf:
        return high
    return high + math.log1p(math.exp(low - high))


class ChangeDetector:
    """Raises an alarm once the evidence that a rate went above its limit, from some
    moment on, reaches 1/alpha. If the rate never exceeds the limit, the alarm is raised
    with probability at most alpha, however long it runs and however often it is read.

    Fed once per tick with that tick's events and trials and the limit in force (the
    limit may move, e.g. with the live color's bound; it must not depend on this
    tick's events)."""

    __slots__ = ("_log_scores", "alpha", "threshold")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.threshold = math.log(1 / alpha)
        # Per alternative: log of sum over change points s of prior(s) * LR(s..now).
        self._log_scores = [-math.inf] * len(ODDS_RATIOS)

    def update(self, events: int, trials: int, limit: float, prior: float) -> None:
        """One tick: `prior` is the probability that the change began in this tick."""
        log_prior = math.log(prior) if prior > 0 else -math.inf
        scores = self._log_scores
        if limit <= 0.0:  # nothing is allowed: one event is proof
            step_of = [math.inf if events else 0.0] * len(scores)
        elif limit >= 1.0 or trials == 0:
            step_of = [0.0] * len(scores)
        else:
            odds = limit / (1 - limit)
            misses = trials - events
            step_of = []
            for ratio in ODDS_RATIOS:
                alternative = odds * ratio / (1 + odds * ratio)
                step_of.append(
                    events * math.log(alternative / limit)
                    + misses * math.log((1 - alternative) / (1 - limit))
                )
        for j, step in enumerate(step_of):
            scores[j] = _logaddexp(scores[j], log_prior) + step

    @property
    def log_evidence(self) -> float:
        """log of the e-value: the weighted mean over alternatives of their scores."""
        total = -math.inf
        for score in self._log_scores:
            total = _logaddexp(total, score)
        return total + _LOG_WEIGHT

    @property
    def evidence(self) -> float:
        """The share of the evidence needed for an alarm that is in: 1 or more alarms."""
        return max(0.0, self.log_evidence) / self.threshold

    @property
    def alarm(self) -> bool:
        return self.log_evidence >= self.threshold
