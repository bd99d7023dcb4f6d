"""The fleet's shared state as users and operators see it (benchmarks/fleet.py's parts 1 and 5).

- `propagation`: `changes` split changes (PUT /v1/split, a new candidate_weight each)
  through member 2's admin API, one at a time, 0.1 to 0.3 s apart, under the users'
  traffic; for each, the time from the request's start to each other member's
  `fleet_applied` event (its own clock: the moment it applied the change).
- `stickiness`: `users` new users, each with its own cookie jar, each sending
  `per_user` GETs at random moments of a ramp of the candidate's weight through 10%,
  50% and 100% (PUT /v1/split through member 1, `phase` seconds each), each GET to a
  random member. For each user, the colors it saw in order, and at which split.

Why a user keeps its color on every member: see HOW_STICKY.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, CookieJar, TCPConnector
from fleet_rig import Member, Rig, other, summary

HOW_STICKY = (
    "zdproxy's bucket cookie (zd_bucket, the default sticky key bucket-cookie) holds a "
    "random token drawn by the first member a user reached; every member hashes it with "
    "the fleet's salt (blake2b keyed by the salt, mod 10000: "
    "zdproxy/dataplane/steering.py) and sends the user to the candidate when that bucket "
    "is below the candidate's weight. The salt and the split are shared through etcd, so "
    "a user has one bucket, and one color, on every member; raising the weight only moves "
    "users from live to the candidate. The cookie is set only while the split is "
    "fractional (the users' jars send it to every member: cookies are per host, not per "
    "port)."
)
RAMP = (1000, 5000, 10000)  # the candidate's weights, basis points
APPLIED_WITHIN = 5.0  # seconds for a change to reach every member; past it: missed
USER_TIMEOUT = ClientTimeout(total=15)
CONNECTIONS = 200  # the users' connections, shared by their sessions (their jars are not)


async def applied(member: Member, origin: Member, since: float) -> float | None:
    """When `member` applied a change `origin` made after `since` (Unix time)."""
    event = await member.feed.wait(
        lambda e: (
            e["kind"] == "fleet_applied"
            and e["time"] >= since
            and e["by"] == f"member {origin.name}"
            and "split" in e["data"].get("items", ())
        ),
        APPLIED_WITHIN,
    )
    return event["time"] if event is not None else None


async def propagation(rig: Rig, changes: int, seed: int) -> dict[str, Any]:
    await rig.reset()
    await rig.undrain_candidate()
    rng = random.Random(seed)
    origin = rig.members[1]
    others = [m for m in rig.members if m is not origin]
    each: dict[str, list[float]] = {m.name: [] for m in others}
    last: list[float] = []  # per change: until the last member applied it
    answered: list[float] = []  # the PUT's own round trip (written to etcd when it returns)
    missed = 0
    for k in range(changes):
        weight = 100 + (k * 100) % 9800  # every change a new weight
        sent = time.time()
        await rig.split(origin, weight)
        answered.append(time.time() - sent)
        times = await asyncio.gather(*(applied(m, origin, sent) for m in others))
        for member, at in zip(others, times, strict=True):
            if at is None:
                missed += 1
            else:
                each[member.name].append(at - sent)
        if all(at is not None for at in times):
            last.append(max(t for t in times if t is not None) - sent)
        await asyncio.sleep(rng.uniform(0.1, 0.3))
    await rig.split(origin, 0)
    every = [t for samples in each.values() for t in samples]
    return {
        "changes": changes,
        "through": origin.name,
        "put_answered_ms": summary(answered),
        "each_member_ms": summary(every),
        "by_member_ms": {name: summary(samples) for name, samples in each.items()},
        "all_members_ms": summary(last),
        "missed": missed,
        "goal": "median of all_members at most 200 ms",
        "met": bool(last) and summary(last)["median"] <= 200 and not missed,
    }


@dataclass(frozen=True)
class Seen:
    """One request of the stickiness part: its user, when it was sent, the color that
    answered (None: it failed)."""

    user: int
    sent: float
    color: str | None


async def stickiness(
    rig: Rig, users: int, per_user: int, phase: float, seed: int
) -> dict[str, Any]:
    await rig.reset()
    await rig.undrain_candidate()
    origin = rig.members[0]
    live = (await rig.statuses())[0]["split"]["live"]
    ramp: list[tuple[float, float]] = []  # each change: (sent, applied by every member)

    async def change(weight: int) -> None:
        sent = time.time()
        await rig.split(origin, weight)
        done = time.time()  # the origin runs a change before it answers
        times = await asyncio.gather(
            *(applied(m, origin, sent) for m in rig.members if m is not origin)
        )
        ramp.append(
            (sent, max([done, *(t if t is not None else sent + APPLIED_WITHIN for t in times)]))
        )

    await change(RAMP[0])
    start = time.time()
    length = phase * len(RAMP)
    seen: list[Seen] = []
    connector = TCPConnector(limit=CONNECTIONS)

    async def user(n: int) -> None:
        rng = random.Random(seed * 1_000_003 + n)
        moments = sorted(rng.uniform(0, length - 0.5) for _ in range(per_user))
        jar = CookieJar(unsafe=True)  # unsafe: keep the cookies of an IP-address host
        async with ClientSession(
            connector=connector, connector_owner=False, cookie_jar=jar, timeout=USER_TIMEOUT
        ) as session:
            for i, moment in enumerate(moments):
                await asyncio.sleep(max(0.0, start + moment - time.time()))
                member = rng.choice(rig.members)
                sent = time.time()
                color = None
                try:
                    async with session.get(f"{member.zd.url}/s{n}/{i}") as response:
                        await response.read()
                        if response.status == 200:
                            color = response.headers.get("X-App-Color")
                except (ClientError, TimeoutError):
                    pass
                seen.append(Seen(n, sent, color))

    async def steps() -> None:
        for k, weight in enumerate(RAMP[1:], 1):
            await asyncio.sleep(max(0.0, start + k * phase - time.time()))
            await change(weight)

    try:
        await asyncio.gather(steps(), *(user(n) for n in range(users)))
    finally:
        await connector.close()
    await rig.split(origin, 0)
    return judge_stickiness(seen, ramp, live, users)


def judge_stickiness(
    seen: list[Seen], ramp: list[tuple[float, float]], live: str, users: int
) -> dict[str, Any]:
    """Per user, its answers in order: colors seen at one split (a request sent while a
    change was on its way to some member counts at neither), moves across a change."""
    candidate = other(live)

    def phase_of(sent: float) -> int | None:
        if any(began <= sent <= applied for began, applied in ramp[1:]):
            return None
        return sum(applied < sent for _, applied in ramp[1:])

    by_user: dict[int, list[Seen]] = {}
    for s in sorted(seen, key=lambda s: s.sent):
        by_user.setdefault(s.user, []).append(s)
    mixed_same_split = moved_once = flipped_back = moved_in_transition = 0
    phase_requests = [[0, 0] for _ in RAMP]  # per phase: requests, of them to the candidate
    for answers in by_user.values():
        colored = [(phase_of(s.sent), s.color) for s in answers if s.color is not None]
        for p, color in colored:
            if p is not None:
                phase_requests[p][0] += 1
                phase_requests[p][1] += color == candidate
        by_phase: dict[int, set[str]] = {}
        for p, color in colored:
            if p is not None:
                by_phase.setdefault(p, set()).add(color)
        mixed_same_split += any(len(colors) > 1 for colors in by_phase.values())
        moves = [(a, b) for a, b in itertools.pairwise(colored) if a[1] != b[1]]
        back = sum(b[1] == live for _, b in moves)
        flipped_back += back > 0
        moved_once += len(moves) == 1 and not back
        moved_in_transition += any(a[0] is None or b[0] is None for a, b in moves)
    return {
        "users": users,
        "requests": len(seen),
        "failed": sum(s.color is None for s in seen),
        "ramp_weights": list(RAMP),
        "change_reached_every_member_ms": summary([applied - began for began, applied in ramp]),
        "candidate_share_by_phase": [
            {
                "weight": w / 100,
                "requests": n,
                "to_candidate_percent": round(100 * c / max(n, 1), 1),
            }
            for w, (n, c) in zip(RAMP, phase_requests, strict=True)
        ],
        "users_both_colors_at_one_split": mixed_same_split,
        "users_moved_once_to_candidate": moved_once,
        "users_moved_across_a_change_in_transit": moved_in_transition,
        "users_flipped_back_to_live": flipped_back,
        "goal": "no user sees both colors at one split, none flips back",
        "met": mixed_same_split == 0 and flipped_back == 0,
    }
