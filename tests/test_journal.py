"""The state journal: runtime changes made through the admin API survive a crash (kill -9)
and a restart, until the config file's own value for the same item changes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    ADMIN_AUTH,
    Upstream,
    ZdProxy,
    admin_api,
    free_port,
    pools,
    wait_healthy,
    wait_until,
)

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]

TEMP_FILE = re.compile(r"^\.state\.json\.(\d+)\.tmp$")
ROUNDS = 4  # kill -9 rounds of the crash test


def admin(proxy: ZdProxy) -> aiohttp.ClientSession:
    """A session on the proxy's admin API, with the token."""
    return aiohttp.ClientSession(proxy.admin_url, headers=ADMIN_AUTH)


async def events_of(proxy: ZdProxy, kind: str, after: int = 0) -> list[dict[str, Any]]:
    """The events of `kind` with an id above `after` (the history outlives restarts)."""
    answer = await admin_api(proxy, "GET", f"/v1/events?kind={kind}&since={after}")
    events: list[dict[str, Any]] = answer["events"]
    return events


def last_event_id(state_dir: Path) -> int:
    """The id of the last whole event in the event log: what came before a restart."""
    ids = []
    for line in (state_dir / "events.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):
            ids.append(json.loads(line)["id"])
    return max(ids, default=0)


def kill(proxy: ZdProxy) -> None:
    """SIGKILL: no graceful stop, no last write."""
    proxy.process.send_signal(signal.SIGKILL)
    assert proxy.process.wait(5) == -signal.SIGKILL


def state_config(tmp_path: Path, blue: Upstream, green: Upstream, **split: Any) -> dict[str, Any]:
    """Blue live, green the candidate, and one explicit state dir, so that a second start
    with this config is the same zdproxy again."""
    return {
        "pools": pools([blue.address], [green.address]),
        "split": {"live": "blue", "candidate_weight": 0, **split},
        "state": {"dir": str(tmp_path / "state")},
    }


def routing_view(status: dict[str, Any]) -> dict[str, Any]:
    """What the journal must bring back: split, pools (members, version, drain marks), rules."""
    return {
        "split": status["split"],
        "pools": {
            color: {
                "version": pool["version"],
                "upstreams": [
                    (u["id"], u["address"], u["weight"], u["drained"]) for u in pool["upstreams"]
                ],
            }
            for color, pool in status["pools"].items()
        },
        "rules": status["rules"],
        "journal": status["journal"],
    }


async def new_users(url: str, count: int) -> dict[str, str]:
    """`count` new users: each gets its bucket cookie from zdproxy on a first request;
    returns {cookie value: name of the app that answered}."""
    limit = asyncio.Semaphore(32)

    async def one(session: aiohttp.ClientSession) -> tuple[str, str]:
        async with limit, session.get(f"{url}/first") as response:
            assert response.status == 200
            cookie = response.headers["Set-Cookie"]
            match = re.match(r"zd_bucket=([^;]+);", cookie)
            assert match, cookie
            return match.group(1), str((await response.json())["name"])

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        users = dict(await asyncio.gather(*(one(session) for _ in range(count))))
    assert len(users) == count  # every user got a cookie of its own
    return users


async def returning_users(url: str, cookies: list[str]) -> dict[str, str]:
    """The app that answers each user who comes back with its bucket cookie."""
    limit = asyncio.Semaphore(32)

    async def one(session: aiohttp.ClientSession, cookie: str) -> tuple[str, str]:
        headers = {"Cookie": f"zd_bucket={cookie}"}
        async with limit, session.get(f"{url}/again", headers=headers) as response:
            assert response.status == 200
            assert "Set-Cookie" not in response.headers  # the bucket is known: none issued
            return cookie, str((await response.json())["name"])

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        return dict(await asyncio.gather(*(one(session, cookie) for cookie in cookies)))


async def answered_by(url: str, count: int, headers: dict[str, str] | None = None) -> set[str]:
    """Names of the apps that answered `count` GETs without a bucket cookie."""
    names = set()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for i in range(count):
            async with session.get(f"{url}/n/{i}", headers=headers) as response:
                assert response.status == 200
                names.add(str((await response.json())["name"]))
    return names


# -- the must-show ----------------------------------------------------------------------


async def test_api_changes_survive_kill_9_and_users_keep_their_color(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    green_v2 = await upstream("green-v2")
    config = state_config(tmp_path, blue, green)  # no split.salt: zdproxy draws one
    config["proxy"] = {"listen": f"127.0.0.1:{free_port()}"}  # users come back to it
    proxy = zdproxy(config)

    # The deploy, through the API: new build on the idle color, pin QA to it, then 40%.
    pool = {"upstreams": [{"address": green_v2.address, "weight": 7}], "version": "v2.0.1"}
    assert await admin_api(proxy, "PUT", "/v1/pools/green", pool) == pool
    await wait_healthy(proxy, "green")  # green-v2 serves once its first checks passed
    rules = [{"name": "qa", "header": "X-Team", "values": ["qa"], "to": "green"}]
    await admin_api(proxy, "PUT", "/v1/rules", {"rules": rules})
    split = await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 4000})
    assert split["candidate_weight"] == 4000 and split["shares"] == {"blue": 60.0, "green": 40.0}

    users = await new_users(proxy.url, 200)
    assert set(users.values()) == {"blue", "green-v2"}  # 200 users at 40%: both colors
    before = routing_view(await admin_api(proxy, "GET", "/v1/status"))
    assert before["journal"] == ["pools.green", "rules", "salt", "split"]
    assert before["pools"]["green"] == {
        "version": "v2.0.1",
        "upstreams": [(f"green/{green_v2.address}", green_v2.address, 7, False)],
    }

    kill(proxy)
    again = zdproxy(config)  # the same config, state dir and address
    assert again.url == proxy.url

    after = routing_view(await admin_api(again, "GET", "/v1/status"))
    assert after == before  # split (salt_id included), pools, version, rules, journal
    assert await returning_users(again.url, list(users)) == users
    assert await answered_by(again.url, 10, {"X-Team": "qa"}) == {"green-v2"}  # the rule
    assert green.seen == []  # the replaced upstream never comes back
    first, started = await events_of(again, "started")  # the history outlives the restart
    assert first["data"]["journal"] == ["salt"]
    assert started["data"]["journal"] == ["pools.green", "rules", "salt", "split"]


# -- precedence -------------------------------------------------------------------------


async def test_journaled_split_wins_until_the_file_changes_it_on_reload(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = state_config(tmp_path, blue, green, salt="fixed-salt")
    proxy = zdproxy(config)
    await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 2500})
    proxy.stop()

    # An unchanged file: the runtime change stays.
    proxy = zdproxy(config)
    split = await admin_api(proxy, "GET", "/v1/split")
    assert split["candidate_weight"] == 2500
    assert (await admin_api(proxy, "GET", "/v1/status"))["journal"] == ["split"]

    # Another item edited in the file (blue's version): the file's pool, the journal's split.
    config["pools"]["blue"]["version"] = "b2"
    assert await proxy.reload(config)
    status = await admin_api(proxy, "GET", "/v1/status")
    assert status["pools"]["blue"]["version"] == "b2"
    assert status["split"]["candidate_weight"] == 2500
    assert status["journal"] == ["split"]
    assert await events_of(proxy, "config_takes_over") == []

    # The split itself edited in the file: the file's value wins, and says so.
    config["split"]["candidate_weight"] = 1000
    assert await proxy.reload(config)
    status = await admin_api(proxy, "GET", "/v1/status")
    assert status["split"]["candidate_weight"] == 1000
    assert status["journal"] == []
    [event] = await events_of(proxy, "config_takes_over")
    assert event["data"] == {"item": "split"} and event["actor"] == "config"
    assert "split" in event["reason"]

    # And it stays the file's after a restart.
    kill(proxy)
    proxy = zdproxy(config)
    assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == 1000


async def test_file_edit_made_while_stopped_takes_over_at_start(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    green_v2 = await upstream("green-v2")
    config = state_config(tmp_path, blue, green)
    proxy = zdproxy(config)
    await admin_api(
        proxy, "PUT", "/v1/pools/green", {"upstreams": [green_v2.address], "version": "v2"}
    )
    await wait_healthy(proxy, "green")  # green-v2 serves once its first checks passed
    await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 2500})
    kill(proxy)

    config["split"]["live"] = "green"  # the operator switches over in the file
    proxy = zdproxy(config)
    status = await admin_api(proxy, "GET", "/v1/status")
    assert status["split"]["live"] == "green" and status["split"]["candidate_weight"] == 0
    assert status["pools"]["green"]["version"] == "v2"  # the journaled pool is not disturbed
    assert status["journal"] == ["pools.green", "salt"]
    events = await events_of(proxy, "config_takes_over")
    assert [e["data"]["item"] for e in events] == ["split"]
    assert await answered_by(proxy.url, 10) == {"green-v2"}


# -- a journal that cannot be used ----------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b'{"format": 1, "items": {"split": {"value": {"candidate_w', id="torn-json"),
        pytest.param(b'["a", "list"]\n', id="not-a-journal"),
        pytest.param(b"\xff\xfe\x00\x13 not text at all", id="not-utf8"),
    ],
)
async def test_corrupt_journal_is_moved_aside_and_the_config_applies(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path, garbage: bytes
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = state_config(tmp_path, blue, green, candidate_weight=1500)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_bytes(garbage)

    proxy = zdproxy(config)
    split = await admin_api(proxy, "GET", "/v1/split")
    assert split["candidate_weight"] == 1500  # the file's
    [aside] = state_dir.glob("state.json.corrupt-*")
    assert aside.read_bytes() == garbage  # kept for a post-mortem
    [event] = await events_of(proxy, "journal_corrupt")
    assert event["data"]["path"] == str(aside)
    # A fresh journal replaced it (holding the drawn salt), and works.
    assert set(json.loads((state_dir / "state.json").read_text())["items"]) == {"salt"}
    await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 3000})
    kill(proxy)
    mark = last_event_id(state_dir)
    proxy = zdproxy(config)
    assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == 3000
    assert await events_of(proxy, "journal_corrupt", after=mark) == []


def edit_journal(state_dir: Path, key: str, value: Any) -> None:
    """Change one item's value in the journal, keeping its basis: a hand edit."""
    path = state_dir / "state.json"
    journal = json.loads(path.read_text())
    journal["items"][key]["value"] = value
    path.write_text(json.dumps(journal))


@pytest.mark.parametrize(
    ("key", "value", "weight"),
    [
        # The split itself does not fit: the file's split applies.
        pytest.param("split", {"live": "blue", "candidate_weight": 99999}, 1500, id="split"),
        # Only the salt does not fit: it alone is dropped, the journaled split stays.
        pytest.param("salt", 5, 3000, id="salt"),
    ],
)
async def test_journal_item_that_does_not_fit_is_rejected_alone(
    zdproxy: StartProxy,
    upstream: StartUpstream,
    tmp_path: Path,
    key: str,
    value: Any,
    weight: int,
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = state_config(tmp_path, blue, green, candidate_weight=1500)
    proxy = zdproxy(config)
    await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 3000})
    kill(proxy)
    edit_journal(tmp_path / "state", key, value)

    mark = last_event_id(tmp_path / "state")
    proxy = zdproxy(config)
    assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == weight
    [event] = await events_of(proxy, "journal_rejected", after=mark)
    assert event["actor"] == "config" and event["data"]["item"] == key
    assert await events_of(proxy, "journal_corrupt", after=mark) == []
    kill(proxy)
    mark = last_event_id(tmp_path / "state")
    proxy = zdproxy(config)  # what was rejected is not read again
    assert await events_of(proxy, "journal_rejected", after=mark) == []
    assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == weight


# -- the salt ---------------------------------------------------------------------------------


async def test_random_salt_differs_per_state_dir_and_is_kept_in_one(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    base = {"pools": pools([blue.address], [green.address])}
    one = zdproxy({**base, "state": {"dir": str(tmp_path / "one")}})
    two = zdproxy({**base, "state": {"dir": str(tmp_path / "two")}})
    salt_one = (await admin_api(one, "GET", "/v1/split"))["salt_id"]
    salt_two = (await admin_api(two, "GET", "/v1/split"))["salt_id"]
    assert re.fullmatch(r"[0-9a-f]{12}", salt_one)
    assert salt_one != salt_two
    assert (await admin_api(one, "GET", "/v1/status"))["journal"] == ["salt"]

    kill(one)
    one = zdproxy({**base, "state": {"dir": str(tmp_path / "one")}})
    assert (await admin_api(one, "GET", "/v1/split"))["salt_id"] == salt_one

    # A salt in the file is the file's: nothing drawn, nothing journaled.
    three = zdproxy({**base, "split": {"salt": "from-the-file"}})
    status = await admin_api(three, "GET", "/v1/status")
    assert status["journal"] == []
    assert status["split"]["salt_id"] == hashlib.sha256(b"from-the-file").hexdigest()[:12]


# -- crash safety of the write ----------------------------------------------------------------


@dataclass
class Change:
    weight: int
    sent_at: float
    acked_at: float | None = None


class SplitChanges:
    """Clients that move the split, `clients` changes in flight at a time, until zdproxy
    dies under them (200 changes at most); `changes` has each weight sent, by weight."""

    def __init__(self, proxy: ZdProxy, weights: Iterator[int], clients: int = 4) -> None:
        self.proxy = proxy
        self.weights = weights
        self.changes: dict[int, Change] = {}
        self.task = asyncio.ensure_future(self._run(clients))

    @property
    def acked(self) -> list[Change]:
        return [change for change in self.changes.values() if change.acked_at is not None]

    async def _run(self, clients: int) -> None:
        loop = asyncio.get_running_loop()
        async with admin(self.proxy) as session:

            async def client() -> None:
                while len(self.changes) < 200:
                    change = Change(next(self.weights), loop.time())
                    self.changes[change.weight] = change
                    body = {"candidate_weight": change.weight}
                    try:
                        async with session.put("/v1/split", json=body) as response:
                            assert response.status == 200, await response.text()
                    except aiohttp.ClientError:
                        return
                    change.acked_at = loop.time()

            await asyncio.gather(*(client() for _ in range(clients)))

    async def kill_after(self, count: int) -> None:
        """SIGKILL zdproxy once `count` changes are acknowledged, wherever the others are."""
        await wait_until(lambda: len(self.acked) >= count or self.task.done())
        kill(self.proxy)
        await asyncio.wait_for(self.task, 5)


async def test_kill_9_during_split_changes_never_leaves_a_torn_journal(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = state_config(tmp_path, blue, green)
    state_dir = tmp_path / "state"
    killed: set[int] = set()
    weights = iter(range(1, 10001))
    proxy = zdproxy(config)
    for _ in range(ROUNDS):
        client = SplitChanges(proxy, weights)
        enough = random.randint(10, 150)
        await client.kill_after(enough)
        killed.add(proxy.pid)
        acked = client.acked
        assert enough <= len(acked) and len(client.changes) <= 200  # killed mid-way

        # The journal is a whole document, holding one of the changes sent, and none
        # that an acknowledged change has replaced: a change sent after the journaled
        # one was acknowledged was saved after it, so it cannot have been acknowledged.
        journal = json.loads((state_dir / "state.json").read_text())
        journaled = journal["items"]["split"]["value"]["candidate_weight"]
        assert journaled in client.changes
        done = client.changes[journaled].acked_at
        if done is not None:
            assert [c.weight for c in acked if c.sent_at > done] == [], journaled
        # Besides the journal, its reserve file and the event log, at most the temp file
        # of a killed process (never read: a start reads state.json only).
        for name in os.listdir(state_dir):
            if match := TEMP_FILE.match(name):
                assert int(match.group(1)) in killed
            else:
                assert name in ("state.json", ".state.json.reserve", "events.jsonl"), name

        mark = last_event_id(state_dir)
        proxy = zdproxy(config)
        assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == journaled
        assert await events_of(proxy, "journal_corrupt", after=mark) == []
        assert await events_of(proxy, "journal_rejected", after=mark) == []


# -- drain marks ------------------------------------------------------------------------------


async def test_drain_mark_survives_kill_9_and_undrain_works(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    one, two = await upstream("one"), await upstream("two")
    config = {"pools": pools([one.address, two.address]), "state": {"dir": str(tmp_path / "s")}}
    drained = f"blue/{one.address}"
    proxy = zdproxy(config)
    assert await answered_by(proxy.url, 40) == {"one", "two"}  # random: 2 in 2**40 fail
    answer = await admin_api(proxy, "POST", "/v1/drain", {"upstream": drained})
    assert answer["upstreams"] == [drained] and answer["finished"] is False
    kill(proxy)

    proxy = zdproxy(config)
    seen = len(one.seen)
    status = await admin_api(proxy, "GET", "/v1/status")
    marks = {u["id"]: (u["drained"], u["routable"]) for u in status["pools"]["blue"]["upstreams"]}
    assert marks == {drained: (True, False), f"blue/{two.address}": (False, True)}
    assert await answered_by(proxy.url, 20) == {"two"}
    assert len(one.seen) == seen  # not one request reached the drained upstream

    assert await admin_api(proxy, "POST", "/v1/undrain", {"upstream": drained}) == {
        "upstreams": [drained]
    }
    assert await answered_by(proxy.url, 40) == {"one", "two"}
    kill(proxy)
    proxy = zdproxy(config)  # the undrain was journaled too
    assert (await admin_api(proxy, "GET", "/v1/status"))["journal"] == ["drained", "salt"]
    assert await answered_by(proxy.url, 40) == {"one", "two"}
