"""The fleet that benchmarks/fleet.py measures, run as users run one.

A real 3-member etcd cluster (tests/etcd_cluster.py, the tests' clusters), and for each
fleet member its own blue and green app servers (faulty_app.py: 5-20 ms of service
time, every request recorded with its arrival time, a fault switch) and one
`zdproxy run --config FILE` (harness.py) whose `[fleet]` names the three etcd client
URLs and the member (m1, m2, m3); every other fleet option is its default. Each member
also has a follower of its event stream (`GET /v1/events?follow=1`), so that the
benchmark reads when each member applied what, by the member's own clock.

Users (`Traffic`): sticky_users.py's users (a cookie jar each, 70% GET and 30% POST,
paced), a group bound to each member, as behind a load balancer with session affinity.

tests/test_fleet.py's `start_fleet` is not reused: it runs the tests' apps inside the
test's event loop and its members through pytest fixtures; the benchmark needs apps in
processes of their own that record every arrival, and no pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout
from faulty_app import AppHandle, AppRecord, Fault
from harness import Zdproxy, die_with_parent, free_port
from sticky_users import Answer, Users

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.etcd_cluster import EtcdCluster  # noqa: E402 - the tests' clusters, one definition

COLORS = ("blue", "green")
ACTIVE = {"preflight", "step", "paused", "baking", "finishing"}  # a rollout in progress
POLL = 0.05  # seconds between two rounds of GET /v1/status
STREAM_RETRY = 0.2  # seconds before an event stream is opened again (a member restarting)
# The plans of every member's config. `hold`: one step at 20% that holds for an hour, so
# that only a rollback ends it. `canary`: a rollout to done. `quick`: a shorter one, for
# the leader's kill. The judge is the default everywhere (what users run).
PLANS: dict[str, dict[str, Any]] = {
    "hold": {"steps": [{"weight": 20, "hold": "1h"}]},
    "canary": {
        "steps": [
            {"weight": 10, "hold": "10s"},
            {"weight": 50, "hold": "10s"},
            {"weight": 100, "hold": "5s"},
        ],
        "bake": "5s",
    },
    "quick": {
        "steps": [
            {"weight": 10, "hold": "3s"},
            {"weight": 50, "hold": "3s"},
            {"weight": 100, "hold": "2s"},
        ],
        "bake": "2s",
    },
}


class NotAnswered(Exception):
    """A member's admin API answered a call with an error."""


def other(color: str) -> str:
    return COLORS[1 - COLORS.index(color)]


def rollout_of(status: dict[str, Any]) -> dict[str, Any]:
    rollout: dict[str, Any] = status["rollout"]
    return rollout


def active(status: dict[str, Any]) -> bool:
    return rollout_of(status)["state"] in ACTIVE


class EventFeed:
    """Every event of one member, as its stream delivers them; after the member restarts
    the stream resumes with Last-Event-ID (event ids outlive a restart)."""

    def __init__(self, zd: Zdproxy, session: ClientSession) -> None:
        self.zd, self.session = zd, session
        self.events: list[dict[str, Any]] = []
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        last = 0
        url = self.zd.admin_url + "/v1/events?follow=1&limit=1"
        timeout = ClientTimeout(total=None, sock_connect=2)
        while True:
            headers = {"Authorization": f"Bearer {self.zd.token}"}
            if last:
                headers["Last-Event-ID"] = str(last)
            with contextlib.suppress(ClientError, TimeoutError, ValueError):
                async with self.session.get(url, headers=headers, timeout=timeout) as response:
                    async for line in response.content:
                        if line.startswith(b"data: "):
                            event = json.loads(line[6:])
                            self.events.append(event)
                            last = event["id"]
            await asyncio.sleep(STREAM_RETRY)

    def find(self, kind: str, after: float, rollout: int | None = None) -> dict[str, Any] | None:
        """The first event of `kind` at or after `after` (of that rollout, if given)."""
        for event in self.events:
            if event["kind"] != kind or event["time"] < after:
                continue
            if rollout is None or event["data"].get("rollout") == rollout:
                return event
        return None

    async def wait(
        self, match: Callable[[dict[str, Any]], bool], within: float
    ) -> dict[str, Any] | None:
        """The first event, old or new, that matches; None after `within` seconds."""
        deadline = time.monotonic() + within
        seen = 0
        while True:
            for event in self.events[seen:]:
                if match(event):
                    return event
            seen = len(self.events)
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


@dataclass
class Member:
    """One fleet member: its zdproxy, its own blue and green apps, its event stream."""

    name: str
    zd: Zdproxy
    apps: dict[str, AppHandle]
    feed: EventFeed

    @property
    def running(self) -> bool:
        return self.zd.process is not None and self.zd.process.poll() is None

    def records(self, color: str, since: float) -> list[AppRecord]:
        return [r for r in self.apps[color].records() if r.arrival >= since]


def member_model(
    tmp: Path, name: str, apps: dict[str, AppHandle], etcd: list[str]
) -> dict[str, Any]:
    """One member's config: its own pools, the shared plans, [fleet] with its defaults."""
    return {
        "proxy": {"listen": f"127.0.0.1:{free_port()}"},
        "admin": {
            "listen": f"127.0.0.1:{free_port()}",
            "token_file": str(tmp / "etc" / "admin.token"),
        },
        "state": {"dir": str(tmp / "state")},
        "log": {"level": "info"},
        "pools": {
            color: {"upstreams": [apps[color].address], "version": version}
            for color, version in (("blue", "v1"), ("green", "v2"))
        },
        "plans": PLANS,
        "fleet": {"endpoints": etcd, "name": name},
    }


@dataclass
class Rig:
    """The etcd cluster and the fleet's members; `start`, then `close` (always)."""

    tmp: Path
    session: ClientSession
    size: int = 3
    seed: int = 1
    etcd: EtcdCluster | None = None
    members: list[Member] = field(default_factory=list)

    @property
    def cluster(self) -> EtcdCluster:
        assert self.etcd is not None, "not started"
        return self.etcd

    async def start(self) -> None:
        self.etcd = EtcdCluster(self.tmp / "etcd", size=3)
        await asyncio.to_thread(self.etcd.start)
        token = secrets.token_hex(16)
        for index in range(1, self.size + 1):
            name, home = f"m{index}", self.tmp / f"m{index}"
            home.mkdir(parents=True)
            apps = {
                color: AppHandle.start(
                    color, f"{name}-{color}", home, self.seed * 100 + index * 2 + n, die_with_parent
                )
                for n, color in enumerate(COLORS)
            }
            for app in apps.values():
                app.wait_ports()
            zd = Zdproxy(home, member_model(home, name, apps, self.etcd.client_urls), token)
            self.members.append(Member(name, zd, apps, EventFeed(zd, self.session)))
            zd.start()
        for member in self.members:
            await member.zd.ready(self.session)
            member.feed.start()
        joined = await self.until(lambda ss: all(s["fleet"]["leader"] for s in ss), within=30)
        if joined is None or len({s["split"]["salt_id"] for s in joined}) != 1:
            raise RuntimeError(f"the fleet did not form: {joined}")

    async def close(self) -> None:
        for member in self.members:
            await member.feed.stop()
            await member.zd.stop()
            for app in member.apps.values():
                app.stop()
        if self.etcd is not None:
            await asyncio.to_thread(self.etcd.close)

    # -- the admin API -----------------------------------------------------------------

    async def api(
        self, member: Member, method: str, path: str, body: Any = None
    ) -> tuple[int, Any]:
        return await member.zd.api(self.session, method, path, body)

    async def statuses(self) -> list[dict[str, Any]]:
        """GET /v1/status of every running member, in member order; NotAnswered if one
        answers something else than its status."""
        running = [m for m in self.members if m.running]
        answers = await asyncio.gather(*(self.api(m, "GET", "/v1/status") for m in running))
        for member, (code, body) in zip(running, answers, strict=True):
            if code != 200:
                raise NotAnswered(f"{member.name}: GET /v1/status answered {code}: {body}")
        return [body for _, body in answers]

    async def until(
        self, check: Callable[[list[dict[str, Any]]], bool], within: float
    ) -> list[dict[str, Any]] | None:
        """The running members' statuses once `check` holds for them; None after `within`."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with contextlib.suppress(ClientError, TimeoutError, NotAnswered):
                statuses = await self.statuses()
                if check(statuses):
                    return statuses
            await asyncio.sleep(POLL)
        return None

    def leader(self, statuses: list[dict[str, Any]]) -> Member | None:
        names = {s["fleet"]["leader"] for s in statuses}
        if len(names) != 1:
            return None
        (name,) = names
        return next((m for m in self.members if m.name == name), None)

    def follower(self, statuses: list[dict[str, Any]]) -> Member:
        """A member that does not lead (the last of them)."""
        leader = self.leader(statuses)
        return [m for m in self.members if m is not leader and m.running][-1]

    async def deploy(self, member: Member, plan: str) -> tuple[int, str]:
        """POST /v1/rollouts of the color that is not live, through `member`: (id, color)."""
        _, status = await self.api(member, "GET", "/v1/status")
        color = other(status["split"]["live"])
        code, body = await self.api(member, "POST", "/v1/rollouts", {"color": color, "plan": plan})
        if code >= 300:
            raise RuntimeError(f"deploy refused by {member.name}: {code} {body}")
        return int(body["id"]), color

    async def undrain_candidate(self) -> None:
        """Undrain the color that is not live on every member (drain marks are each
        member's own): after a rollout to done the old color is drained, and zdproxy
        refuses a share of the split for a drained color."""
        _, status = await self.api(self.members[0], "GET", "/v1/status")
        candidate = other(status["split"]["live"])
        for member in self.members:
            await self.api(member, "POST", "/v1/undrain", {"color": candidate})

    async def split(self, member: Member, weight: int) -> None:
        """PUT /v1/split through `member` (it answers once the change is in etcd)."""
        code, body = await self.api(member, "PUT", "/v1/split", {"candidate_weight": weight})
        if code >= 300:
            raise RuntimeError(f"PUT /v1/split refused by {member.name}: {code} {body}")

    async def faults(self, fault: Fault, members: list[Member], color: str) -> float:
        """`fault` on `color`'s app of each of `members` at once: the first switch's time."""
        switched = await asyncio.gather(
            *(m.apps[color].switch(self.session, fault) for m in members)
        )
        return min(switched)

    async def reset(self, within: float = 60) -> None:
        """Every app healthy again, and the fleet settled: no rollout in progress, the
        candidate at 0, one applied revision, etcd reachable, and the candidate's
        upstreams routable (or drained: a deploy undrains them) with no request in flight
        (a hung one ends within the rollback's grace): what a run leaves over must not
        weigh on the next one's judge, and every user has had its answer."""
        for member in self.members:
            for color in COLORS:
                await member.apps[color].switch(self.session, Fault.NONE)

        def settled(statuses: list[dict[str, Any]]) -> bool:
            revisions = {s["fleet"]["applied_revision"] for s in statuses}
            for s in statuses:
                candidate = s["pools"][other(s["split"]["live"])]["upstreams"]
                if active(s) or s["split"]["candidate_weight"] or not s["fleet"]["available"]:
                    return False
                ready = ((u["routable"] or u["drained"]) and not u["in_flight"] for u in candidate)
                if not all(ready):
                    return False
            return len(revisions) == 1

        if await self.until(settled, within) is None:
            raise RuntimeError(f"the fleet did not settle in {within:g} s: {await self.statuses()}")

    # -- etcd ----------------------------------------------------------------------------

    async def etcd_metrics(self) -> dict[str, float]:
        """etcd's own counters (ETCD_APPLIED: the highest member's; ETCD_SERVED: summed
        over the running members)."""
        total = dict.fromkeys((*ETCD_APPLIED, *ETCD_SERVED), 0.0)
        for etcd in self.cluster.members:
            if not etcd.running:
                continue
            with contextlib.suppress(ClientError, TimeoutError):
                async with self.session.get(etcd.client_url + "/metrics") as response:
                    text = await response.text()
                for line in text.splitlines():
                    name = line.partition("{")[0].partition(" ")[0]
                    if name in ETCD_SERVED:
                        total[name] += float(line.rsplit(" ", 1)[1])
                    elif name in ETCD_APPLIED:
                        total[name] = max(total[name], float(line.rsplit(" ", 1)[1]))
        return total


# etcd's counters the load is read from. Every etcd member applies every write: those
# are read from one member. The others count what each member's own clients sent and
# got (a zdproxy talks to one etcd member at a time): summed over the members. zdproxy
# writes only by transactions with a compare, which etcd counts as puts.
ETCD_APPLIED = (
    "etcd_mvcc_put_total",
    "etcd_debugging_mvcc_total_put_size_in_bytes",  # the keys' and values' bytes put
    "etcd_mvcc_db_total_size_in_bytes",
)
ETCD_SERVED = (
    "grpc_server_msg_received_total",  # requests: calls, each keepalive, watch requests
    "etcd_debugging_mvcc_events_total",  # events delivered to watchers
    "etcd_network_client_grpc_received_bytes_total",
    "etcd_network_client_grpc_sent_bytes_total",  # answers and watch deliveries
)


class Traffic:
    """`per_member` sticky users on each member sending `rate` requests per second in
    all, until `stop` (or `bound` seconds); each group keeps its answers."""

    def __init__(self, rig: Rig, per_member: int, rate: float, seed: int, bound: float) -> None:
        count = len(rig.members)
        self.groups = {
            m.name: Users(m.zd.url, per_member, rate / count, seed * 10 + i, bound)
            for i, m in enumerate(rig.members)
        }

    def start(self) -> None:
        for users in self.groups.values():
            users.start()

    async def stop(self) -> None:
        await asyncio.gather(*(users.stop() for users in self.groups.values()))

    def answers(self, start: float, end: float, members: set[str] | None = None) -> list[Answer]:
        """The answers to the requests sent between `start` and `end` (Unix times)."""
        return [
            a
            for name, users in self.groups.items()
            if members is None or name in members
            for a in users.answers
            if start <= a.sent <= end
        ]

    def users_of(self, color: str, start: float, end: float) -> dict[str, int]:
        """On each member, the users `color` answered between `start` and `end`."""
        return {
            name: len(
                {a.user for a in users.answers if start <= a.sent <= end and a.color == color}
            )
            for name, users in self.groups.items()
        }

    def failures(self, start: float, end: float, members: set[str] | None = None) -> dict[str, int]:
        """Failed requests (5xx or errors), by method, and all requests, in the window."""
        answers = self.answers(start, end, members)
        counts = {"requests": len(answers), "failed": 0, "failed_get": 0, "failed_post": 0}
        for answer in answers:
            if answer.failed:
                counts["failed"] += 1
                counts["failed_get" if answer.method == "GET" else "failed_post"] += 1
        return counts


def summary(values: list[float], scale: float = 1e3) -> dict[str, float]:
    """n, median, p95 (nearest rank), max and min of `values` times `scale` (ms)."""
    if not values:
        return {"n": 0}
    ordered = sorted(v * scale for v in values)
    p95 = ordered[max(0, -(-len(ordered) * 95 // 100) - 1)]
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), 1),
        "p95": round(p95, 1),
        "max": round(ordered[-1], 1),
        "min": round(ordered[0], 1),
    }
