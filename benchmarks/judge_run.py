"""One run of the judge matrix: app servers, zdproxy, sticky users, a deploy, maybe a fault.

A run starts everything fresh on loopback ports (two app servers per color, zdproxy as
users start it, the users), deploys green with a plan, switches a fault on every green
app at once at a chosen point of the rollout, waits until the rollout ends (or pauses, or
a bound passes), lets the users go on a little, stops everything and returns the raw
material: what the users saw, what the apps saw, the rollout's states as polled, the
events, and (for faults the apps cannot record) zdproxy's per-upstream counters.
`judge_measure.py` turns that into numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession
from faulty_app import TENANT_HEADER, AppHandle, AppRecord, Fault
from harness import Zdproxy, die_with_parent, free_port
from sticky_users import Answer, Users

APPS_PER_COLOR = 2
HOLD, BAKE_CANARY, BAKE_BLUEGREEN = 4.0, 4.0, 8.0
LOW_TRAFFIC_STEP_DEADLINE = 12.0  # the only plan setting set for the low-traffic runs
PIN_TENANT = "pinned"
PINNED_USERS = 3  # of the users: the pinned tenant
# Seconds of traffic on blue before the deploy: live has served a while before any
# deploy, and its window before the first step is the judge's reference (a blue-green
# plan, all at 100% at once, has no other). 1.5 s of it made that reference tiny.
WARMUP = 10.0
FAULT_AFTER = (2.0, 3.0)  # seconds into the step (or the bake), uniform
SETTLE = 2.0  # seconds of traffic after the rollout ended
PIN_WATCH = 8.0  # seconds of traffic after a rollback, in the pins run
# A step passes once the candidate's error rate is shown under its limits: at 10% of
# 250 req/s that takes some 20-40 s (longer when the share holds one or two users). A
# run still going this long past its holds and bake is reported as such (the matrix
# must fit in an hour).
SLACK = 60.0  # seconds past the holds and the bake a run may take
POLL = 0.1  # seconds between two polls of the rollout (and of the metrics)
ACTIVE = {"preflight", "step", "paused", "baking", "finishing"}


def _steps(*weights: int) -> list[dict[str, Any]]:
    return [{"weight": w, "hold": f"{HOLD:g}s"} for w in weights]


# Plan settings as written to the config file. Nothing of [plans.X.judge] is set: the
# judge runs with its defaults.
PLANS: dict[str, dict[str, Any]] = {
    "canary": {"steps": _steps(10, 50, 100), "bake": f"{BAKE_CANARY:g}s"},
    "bluegreen": {"steps": _steps(100), "bake": f"{BAKE_BLUEGREEN:g}s"},
    "lowtraffic": {
        "steps": _steps(10, 50, 100),
        "bake": f"{BAKE_CANARY:g}s",
        "step_deadline": f"{LOW_TRAFFIC_STEP_DEADLINE:g}s",
    },
}


class Kind(StrEnum):
    FAULTY = "faulty"  # a bad release: the judge should roll it back
    GOOD = "good"  # a good release: it should reach done
    LOW_TRAFFIC = "lowtraffic"  # 1 req/s: neither pass on no evidence nor roll back falsely
    PINS = "pins"  # a tenant pinned to green during a bad canary


@dataclass(frozen=True)
class RunSpec:
    kind: Kind
    plan: str
    fault: Fault
    step: int | None  # the step the fault starts in (1-based); None: in the bake
    rate: float  # requests per second, all users together
    users: int
    seed: int

    @property
    def cell(self) -> str:
        where = f"step {self.step}" if self.step else "bake"
        fault = "" if self.fault is Fault.NONE else f" {self.fault} in {where}"
        return f"{self.kind} {self.plan}{fault}"

    def nominal(self) -> float:
        """Seconds the plan takes with no verdict delayed: every hold, then the bake."""
        plan = PLANS[self.plan]
        return HOLD * len(plan["steps"]) + float(plan["bake"].removesuffix("s"))


@dataclass(frozen=True)
class Sample:
    """The rollout as GET /v1/rollout showed it at `t` (Unix time)."""

    t: float
    state: str
    step: int | None
    share: float | None


@dataclass
class RawRun:
    """What one run produced, before any measurement."""

    spec: RunSpec
    answers: list[Answer] = field(default_factory=list)
    records: list[AppRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    green_attempts: list[tuple[float, float]] = field(default_factory=list)  # (t, count)
    rollout_id: int | None = None
    deployed: float = 0.0
    fault_time: float | None = None
    fault_sample: Sample | None = None
    load: tuple[float, float] = (0.0, 0.0)  # the users' start and stop (Unix time)
    notes: list[str] = field(default_factory=list)


def config_model(tmp: Path, apps: list[AppHandle], pins: bool) -> dict[str, Any]:
    """zdproxy's config: both pools, the plans, a pin rule for the pins run. Everything
    else (health checks, retries, outlier ejection, timeouts, the judge) is the default."""
    pools = {
        color: {
            "upstreams": [a.address for a in apps if a.color == color],
            "version": version,
        }
        for color, version in (("blue", "v1"), ("green", "v2"))
    }
    model: dict[str, Any] = {
        "proxy": {"listen": f"127.0.0.1:{free_port()}"},
        "admin": {
            "listen": f"127.0.0.1:{free_port()}",
            "token_file": str(tmp / "etc" / "admin.token"),
        },
        "state": {"dir": str(tmp / "state")},
        "log": {"level": "info"},
        "pools": pools,
        "split": {"live": "blue", "candidate_weight": 0},
        "rollout": {"default_plan": "canary"},
        "plans": PLANS,
    }
    if pins:
        rule = {"name": "tenant", "header": TENANT_HEADER, "values": [PIN_TENANT], "to": "green"}
        model["pins"] = [rule]
    return model


class Watcher:
    """Polls GET /v1/rollout (and, when asked, green's counters in /metrics) every POLL s."""

    def __init__(self, zd: Zdproxy, session: ClientSession, metrics: bool) -> None:
        self.zd, self.session, self.metrics = zd, session, metrics
        self.samples: list[Sample] = []
        self.green_attempts: list[tuple[float, float]] = []

    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    async def run(self) -> None:
        """Polls until cancelled."""
        while True:
            with contextlib.suppress(ClientError, TimeoutError, ValueError):
                status, body = await self.zd.api(self.session, "GET", "/v1/rollout")
                if status == 200:
                    share = body.get("share")
                    self.samples.append(Sample(time.time(), body["state"], body.get("step"), share))
                if self.metrics:
                    text = await self.zd.metrics(self.session)
                    self.green_attempts.append((time.time(), green_attempts(text)))
            await asyncio.sleep(POLL)

    async def until(self, done: Callable[[Sample], bool], within: float) -> Sample | None:
        """The first sample for which `done(sample)` holds, or None after `within` s."""
        deadline = time.monotonic() + within
        seen = len(self.samples)
        while time.monotonic() < deadline:
            for sample in self.samples[seen:]:
                if done(sample):
                    return sample
            seen = len(self.samples)
            await asyncio.sleep(POLL / 2)
        return None


def green_attempts(metrics: str) -> float:
    """Exchanges zdproxy had with green's upstreams: responses plus failures (connect
    refused, reset, timeout), summed from the per-upstream counters of /metrics."""
    total = 0.0
    for line in metrics.splitlines():
        counter = line.startswith(("zdproxy_requests_total{", "zdproxy_upstream_failures_total{"))
        if counter and 'color="green"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def ended(sample: Sample) -> bool:
    """The rollout is over as far as the run is concerned: ended, or paused."""
    return sample.state not in ACTIVE or sample.state == "paused"


def at_fault_point(spec: RunSpec) -> Callable[[Sample], bool]:
    def reached(sample: Sample) -> bool:
        if spec.step is None:
            return sample.state == "baking"
        return sample.state == "step" and sample.step == spec.step

    return reached


async def execute(spec: RunSpec, tmp: Path) -> RawRun:
    """One run, everything started and stopped in it."""
    raw = RawRun(spec)
    rng = random.Random(spec.seed)
    apps = [
        AppHandle.start(color, f"{color}-{i}", tmp, spec.seed * 10 + n, die_with_parent)
        for n, (color, i) in enumerate(
            (c, i) for c in ("blue", "green") for i in range(APPS_PER_COLOR)
        )
    ]
    zd: Zdproxy | None = None
    try:
        for app in apps:
            app.wait_ports()
        zd = Zdproxy(tmp, config_model(tmp, apps, spec.kind is Kind.PINS), secrets.token_hex(16))
        zd.start()
        async with ClientSession() as session:
            await zd.ready(session)
            await _drive(spec, raw, rng, zd, session, apps)
    finally:
        if zd is not None:
            await zd.stop()
        for app in apps:
            app.stop()
    raw.records = [r for app in apps for r in app.records()]
    return raw


async def _drive(
    spec: RunSpec,
    raw: RawRun,
    rng: random.Random,
    zd: Zdproxy,
    session: ClientSession,
    apps: list[AppHandle],
) -> None:
    pinned = PINNED_USERS if spec.kind is Kind.PINS else 0
    limit = WARMUP + spec.nominal() + SLACK + 10 + PIN_WATCH  # the users stop by themselves
    users = Users(
        zd.url, spec.users, spec.rate, spec.seed, limit, pinned, {TENANT_HEADER: PIN_TENANT}
    )
    watcher = Watcher(zd, session, metrics=spec.fault in (Fault.CRASH, Fault.REFUSED))
    polling = asyncio.ensure_future(watcher.run())
    users.start()
    try:
        await asyncio.sleep(WARMUP)
        raw.deployed = time.time()
        status, body = await zd.api(
            session, "POST", "/v1/rollouts", {"color": "green", "plan": spec.plan}
        )
        if status != 200:
            raise RuntimeError(f"deploy refused: {status} {body}")
        raw.rollout_id = body.get("id")
        # False when the fault could not start (_inject noted why): nothing more to note.
        as_planned = spec.fault is Fault.NONE or await _inject(
            spec, raw, rng, watcher, session, apps
        )
        bound = spec.nominal() + SLACK  # seconds after the deploy
        end = await watcher.until(ended, max(bound - (time.time() - raw.deployed), 5.0))
        if end is None and watcher.latest is not None and as_planned:
            raw.notes.append(f"still {watcher.latest.state} {bound:.0f} s after the deploy")
        await asyncio.sleep(PIN_WATCH if spec.kind is Kind.PINS else SETTLE)
    finally:
        try:
            await users.stop()  # waits for the answers in flight, CLIENT_TIMEOUT at most
        finally:
            polling.cancel()  # its samples so far are kept
            await asyncio.wait([polling])
    raw.answers, raw.load = users.answers, (users.started, users.stopped)
    raw.samples, raw.green_attempts = watcher.samples, watcher.green_attempts
    status, body = await zd.api(session, "GET", "/v1/events?limit=10000")
    if status == 200:
        raw.events = [e for e in body["events"] if e["time"] >= raw.deployed - 1]


async def _inject(
    spec: RunSpec,
    raw: RawRun,
    rng: random.Random,
    watcher: Watcher,
    session: ClientSession,
    apps: list[AppHandle],
) -> bool:
    """Once the rollout reached the fault's step (or bake) and served it a while: the fault
    on every green app at once. Not when the rollout ended before (a false alarm) or never
    got there (a note says why): then False."""
    bound = spec.nominal() + SLACK
    reached = await watcher.until(lambda s: at_fault_point(spec)(s) or ended(s), bound)
    if reached is None:
        held = watcher.latest
        where = f"{held.state} {held.step or ''}".strip() if held else "?"
        raw.notes.append(f"no fault: the rollout was still at {where} {bound:.0f} s after deploy")
        return False
    if ended(reached):
        raw.notes.append(f"no fault: the rollout was {reached.state} before its fault point")
        return False
    await asyncio.sleep(rng.uniform(*FAULT_AFTER))
    now = watcher.latest
    if now is None or not at_fault_point(spec)(now):
        raw.notes.append(f"fault point left before the fault: rollout {now}")
        if now is None or ended(now):
            return False
    green = [a for a in apps if a.color == "green"]
    switched = await asyncio.gather(*(a.switch(session, spec.fault) for a in green))
    raw.fault_time, raw.fault_sample = min(switched), now
    return True
