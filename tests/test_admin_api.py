"""The admin API's contract, endpoint by endpoint, against a real `zdproxy run` process.

Every call goes over a socket to the admin listener. An accepted change is checked
where it matters: on the proxy's traffic to real upstream apps, in the event log and
in the state journal. A refused call must change nothing: the views, the event log and
the journal file (<state dir>/state.json) are compared before and after.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from tests.conftest import (
    ADMIN_TOKEN,
    RawUpstream,
    Upstream,
    ZdProxy,
    free_port,
    pools,
    start_zdproxy,
    unchecked,
    wait_healthy,
    wait_until,
)
from zdproxy import __commit__, __version__
from zdproxy.compiled import build

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]
StartRaw = Callable[..., Awaitable[RawUpstream]]

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CLI = {**AUTH, "User-Agent": "zdproxy-cli/9.9.9"}
PROBLEM = "application/problem+json"
# A pool member of proxies that never get traffic: in pools with health checks off
# (`unchecked`) nothing ever connects to it, and it counts as routable.
UNUSED = "127.0.0.1:9"
BETA = {"name": "beta", "header": "X-Beta", "values": ["1"], "to": "green"}
BETA_VIEW = {
    "cookie": "",
    "host": [],
    "path_prefix": [],
    "network": [],
    "after_rollback": "live",
    **BETA,
}


# -- a client of the admin API ---------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any  # parsed JSON for application/json and problem+json, else the text

    @property
    def media_type(self) -> str:
        return self.headers.get("Content-Type", "").partition(";")[0].strip()

    def problem(self, status: int) -> dict[str, Any]:
        """The body, once checked to be an RFC 9457 problem with this status."""
        assert self.status == status, self
        assert self.media_type == PROBLEM, self
        body: dict[str, Any] = self.body
        assert body["status"] == status and body["title"] and body["detail"], body
        assert body["type"] == "about:blank", body
        return body

    @property
    def fields(self) -> list[str]:
        return [error["field"] for error in self.body["errors"]]


class Admin:
    """A client of one zdproxy's admin API."""

    def __init__(self, proxy: ZdProxy, session: aiohttp.ClientSession) -> None:
        self.proxy = proxy
        self.session = session
        self.journal = Path(proxy.config["state"]["dir"]) / "state.json"

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> Reply:
        async with self.session.request(
            method,
            self.proxy.admin_url + path,
            json=body,
            data=data,
            headers=AUTH if headers is None else headers,
        ) as response:
            text = await response.text()
            parsed = json.loads(text) if response.content_type.endswith("json") else text
            return Reply(response.status, response.headers, parsed)

    async def ok(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        reply = await self.call(method, path, body, headers=headers)
        assert reply.status == 200, reply
        assert reply.media_type == "application/json", reply
        return reply.body

    async def get(self, path: str) -> Any:
        return await self.ok("GET", path)

    async def events(self, query: str = "") -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = (await self.get(f"/v1/events{query}"))["events"]
        return events

    def journal_items(self) -> dict[str, Any]:
        items: dict[str, Any] = json.loads(self.journal.read_text())["items"]
        return items

    async def state(self) -> dict[str, Any]:
        """Everything a change could touch: the views, the event log and the journal file."""
        status = await self.get("/v1/status")
        del status["uptime_seconds"]
        for pool in status["pools"].values():
            del pool["window"]  # a sliding window: it moves with the clock alone
        return {
            "status": status,
            "split": await self.get("/v1/split"),
            "blue": await self.get("/v1/pools/blue"),
            "green": await self.get("/v1/pools/green"),
            "rules": await self.get("/v1/rules"),
            "events": await self.events("?limit=10000"),
            "journal": self.journal.read_bytes(),
        }


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        yield client


QUIET_CONFIG: dict[str, Any] = {
    "pools": unchecked(
        {
            "blue": {"upstreams": [UNUSED], "version": "b-1"},
            "green": {"upstreams": [], "version": "g-0"},
        }
    ),
    "split": {"live": "blue", "candidate_weight": 0},
    "pins": [BETA],
}


@pytest.fixture(scope="module")
def quiet_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZdProxy]:
    """One zdproxy shared by the reads and by the calls that must change nothing (each
    such test compares the whole state before and after). It never gets traffic."""
    proxy = start_zdproxy(tmp_path_factory.mktemp("quiet"), QUIET_CONFIG)
    yield proxy
    proxy.stop()


@pytest.fixture
def quiet(quiet_proxy: ZdProxy, session: aiohttp.ClientSession) -> Admin:
    return Admin(quiet_proxy, session)


# -- traffic and upstreams -------------------------------------------------------------


async def names(proxy: ZdProxy, count: int, headers: dict[str, str] | None = None) -> Counter[str]:
    """Send `count` GETs through the proxy, each as a new user; count the answering apps."""
    result: Counter[str] = Counter()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        for i in range(count):
            async with client.get(f"{proxy.url}/n/{i}", headers=headers) as response:
                assert response.status == 200, await response.text()
                result[(await response.json())["name"]] += 1
    return result


@dataclass
class Gated:
    """A scripted upstream answering {"name", "path"} like the apps, except that a request
    whose path starts with a key of `gates` is held until the test sets that gate."""

    name: str
    raw: RawUpstream
    paths: list[str]
    gates: dict[str, asyncio.Event]

    @property
    def address(self) -> str:
        return self.raw.address


async def gated(raw_upstream: StartRaw, name: str, *prefixes: str) -> Gated:
    gates = {prefix: asyncio.Event() for prefix in prefixes}
    paths: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1].decode()
        paths.append(path)
        for prefix, gate in gates.items():
            if path.startswith(prefix):
                await gate.wait()
        body = json.dumps({"name": name, "path": path}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    return Gated(name, await raw_upstream(serve), paths, gates)


async def until(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """wait_until for conditions that need a call: poll every 10 ms, fail after `within`."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - the state is remote: nothing to await
            await asyncio.sleep(0.01)


def logged(proxy: ZdProxy, text: str) -> bool:
    return any(text in line for line in proxy.log_lines)


# -- reads, and the endpoints that need no token ---------------------------------------


async def test_reads_show_the_configured_pools_split_and_rules(quiet: Admin) -> None:
    status = await quiet.get("/v1/status")
    assert status["version"] == __version__
    assert status["uptime_seconds"] > 0
    blue = status["pools"]["blue"]
    assert blue["version"] == "b-1" and blue["share"] == 100.0
    assert blue["upstreams"] == [
        {
            "id": f"blue/{UNUSED}",
            "address": UNUSED,
            "weight": 100,
            "routable": True,
            "health": "unchecked",
            "health_check": "no check (enabled = false)",
            "health_reason": "",
            "ejected_for": None,
            "drained": False,
            "state": "unchecked",
            "in_flight": 0,
            "tunnels": 0,
        }
    ]
    assert blue["effective_share"] == 100.0
    assert blue["window"]["requests"] == 0 and blue["window"]["errors"] == 0
    green = status["pools"]["green"]
    assert (green["version"], green["share"], green["upstreams"]) == ("g-0", 0.0, [])
    assert status["rollout"]["state"] == "idle" and status["rollout"]["history"] == []
    assert status["journal"] == ["salt"]  # zdproxy drew a salt and journaled it
    split = await quiet.get("/v1/split")
    assert split == status["split"]
    assert split["live"] == "blue" and split["candidate"] == "green"
    assert split["candidate_weight"] == 0 and split["shares"] == {"blue": 100.0, "green": 0.0}
    assert split["effective_shares"] == split["shares"]
    assert split["sticky_key"] == "bucket-cookie"
    salt = quiet.journal_items()["salt"]["value"]
    assert split["salt_id"] == hashlib.sha256(salt.encode()).hexdigest()[:12]
    assert await quiet.get("/v1/pools/blue") == {
        "upstreams": [{"address": UNUSED, "weight": 100}],
        "version": "b-1",
    }
    assert await quiet.get("/v1/pools/green") == {"upstreams": [], "version": "g-0"}
    assert await quiet.get("/v1/rules") == {"rules": [BETA_VIEW]} == {"rules": status["rules"]}
    [started] = await quiet.events()
    assert started["kind"] == "started" and (started["actor"], started["by"]) == ("auto", "zdproxy")
    assert started["data"]["pid"] == quiet.proxy.pid
    assert quiet.proxy.address in started["reason"]


async def test_healthz_readyz_metrics_and_openapi_answer_without_a_token(quiet: Admin) -> None:
    healthz = await quiet.call("GET", "/healthz", headers={})
    assert (healthz.status, healthz.body) == (200, {"status": "ok"})
    readyz = await quiet.call("GET", "/readyz", headers={})
    assert (readyz.status, readyz.body) == (200, {"status": "ready"})
    metrics = await quiet.call("GET", "/metrics", headers={})
    assert metrics.status == 200
    assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = set(metrics.body.splitlines())
    commit = __commit__ or "unknown"
    info = f'build="{build()[0]}",commit="{commit}",version="{__version__}"'
    assert f"zdproxy_info{{{info}}} 1.0" in lines
    assert f'zdproxy_upstream_up{{color="blue",upstream="blue/{UNUSED}"}} 1.0' in lines
    assert f'zdproxy_upstream_drained{{color="blue",upstream="blue/{UNUSED}"}} 0.0' in lines
    assert 'zdproxy_split_weight{color="blue"} 1.0' in lines
    assert 'zdproxy_split_weight{color="green"} 0.0' in lines
    assert 'zdproxy_config_reloads_total{result="applied"} 0.0' in lines

    reply = await quiet.call("GET", "/v1/openapi.json", headers={})
    assert reply.status == 200 and reply.media_type == "application/json"
    doc = reply.body
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"] == __version__
    operations = {(path, method) for path, item in doc["paths"].items() for method in item}
    public = {
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/v1/openapi.json", "get"),
    }
    guarded = {
        ("/v1/status", "get"),
        ("/v1/pools/{color}", "get"),
        ("/v1/pools/{color}", "put"),
        ("/v1/split", "get"),
        ("/v1/split", "put"),
        ("/v1/drain", "post"),
        ("/v1/undrain", "post"),
        ("/v1/rules", "get"),
        ("/v1/rules", "put"),
        ("/v1/events", "get"),
        ("/v1/rollout", "get"),
        ("/v1/rollouts", "post"),
        ("/v1/rollouts/{id}", "get"),
        ("/v1/reload", "post"),
        ("/v1/rolling", "get"),
        ("/v1/rolling", "post"),
        ("/v1/fleet", "get"),
        *(
            (f"/v1/rollout/{action}", "post")
            for action in ("pause", "resume", "promote", "abort", "retry")
        ),
    }
    assert operations == public | guarded
    for path, method in guarded:
        operation = doc["paths"][path][method]
        assert operation["security"] == [{"bearer": []}], (path, method)
        assert "401" in operation["responses"], (path, method)
    for path, method in public:
        assert "security" not in doc["paths"][path][method], (path, method)
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    refs = set(_refs(doc))
    assert refs, "the document refers to no schema"
    for ref in refs:  # every reference resolves
        assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"], ref


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


# -- refusals: 401, 400, 404, 405, 409 change nothing ----------------------------------

# Each /v1 call with a body that would be accepted with the token: a missing token
# check would show up as a change.
GUARDED = [
    ("GET", "/v1/status", None),
    ("GET", "/v1/status?follow=1", None),
    ("GET", "/v1/pools/blue", None),
    ("PUT", "/v1/pools/green", {"upstreams": ["127.0.0.1:10"], "version": "g-1"}),
    ("GET", "/v1/split", None),
    ("PUT", "/v1/split", {"candidate_weight": 0, "salt": "another-salt"}),
    ("POST", "/v1/drain", {"color": "blue"}),
    ("POST", "/v1/undrain", {"color": "blue"}),
    ("GET", "/v1/rules", None),
    ("PUT", "/v1/rules", {"rules": []}),
    ("GET", "/v1/events", None),
    ("GET", "/v1/events?follow=1", None),
]
CREDENTIALS = {
    "no token": {},
    "wrong token": {"Authorization": "Bearer wrong-token-0123456789"},
    "not bearer": {"Authorization": f"Basic {ADMIN_TOKEN}"},
    "no scheme": {"Authorization": ADMIN_TOKEN},
}


@pytest.mark.parametrize("credentials", list(CREDENTIALS))
@pytest.mark.parametrize(
    ("method", "path", "body"), GUARDED, ids=[f"{m} {p}" for m, p, _ in GUARDED]
)
async def test_v1_without_the_token_is_401_and_changes_nothing(
    quiet: Admin, credentials: str, method: str, path: str, body: Any
) -> None:
    before = await quiet.state()
    reply = await quiet.call(method, path, body, headers=CREDENTIALS[credentials])
    problem = reply.problem(401)
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="zdproxy"'
    assert "bearer token" in problem["detail"]
    assert await quiet.state() == before


async def test_a_token_that_is_not_utf8_is_401(quiet: Admin) -> None:
    host, _, port = quiet.proxy.admin_address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /v1/status HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Connection: close\r\n\r\n"
    )
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


# (method, path, body or raw bytes, the field errors[] must name)
BAD_INPUT = [
    pytest.param("PUT", "/v1/split", {"candidate_weight": 20000}, "candidate_weight", id="weight"),
    pytest.param("PUT", "/v1/split", {}, "candidate_weight", id="no weight"),
    pytest.param("PUT", "/v1/split", {"candidate_weight": 0, "live": "red"}, "live", id="live"),
    pytest.param("PUT", "/v1/split", {"candidate_weight": 0, "salt": ""}, "salt", id="salt"),
    pytest.param("PUT", "/v1/split", [100], "body", id="not an object"),
    pytest.param(
        "PUT",
        "/v1/split",
        b'{"candidate_weight": ',
        "body",
        id="not JSON",
    ),
    pytest.param(
        "PUT", "/v1/pools/green", {"upstreams": ["nope"]}, "upstreams[0].address", id="address"
    ),
    pytest.param(
        "PUT",
        "/v1/pools/green",
        {"upstreams": [{"address": "127.0.0.1:10", "weight": 0}]},
        "upstreams[0].weight",
        id="weight 0",
    ),
    pytest.param(
        "PUT",
        "/v1/pools/green",
        {"upstreams": ["127.0.0.1:10", "127.0.0.1:10"]},
        "upstreams",
        id="twice",
    ),
    pytest.param("PUT", "/v1/pools/green", {"colour": "green"}, "colour", id="unknown key"),
    pytest.param("PUT", "/v1/rules", {"rules": [{"to": "green"}]}, "rules[0]", id="no condition"),
    pytest.param(
        "PUT", "/v1/rules", {"rules": [{"header": "X-A", "to": "green"}]}, "rules[0]", id="values"
    ),
    pytest.param(
        "PUT",
        "/v1/rules",
        {"rules": [{"path_prefix": ["/a"], "to": "purple"}]},
        "rules[0].to",
        id="to",
    ),
    pytest.param(
        "PUT",
        "/v1/rules",
        {"rules": [{"header": "X-Zd-Color", "values": ["1"], "to": "green"}]},
        "rules[0].header",
        id="preview header",
    ),
    pytest.param(
        "POST",
        "/v1/drain",
        {"color": "blue", "upstream": f"blue/{UNUSED}"},
        "body",
        id="color and upstream",
    ),
    pytest.param("POST", "/v1/drain", {}, "body", id="neither"),
    pytest.param("POST", "/v1/drain", {"color": "blue", "cut_after": 0}, "cut_after", id="cut"),
    pytest.param("POST", "/v1/undrain", {"color": "red"}, "color", id="undrain color"),
    pytest.param("GET", "/v1/events?limit=0", None, "limit", id="limit"),
    pytest.param("GET", "/v1/events?since=-1", None, "since", id="since"),
    pytest.param("GET", "/v1/events?follow=maybe", None, "follow", id="follow"),
    pytest.param("GET", "/v1/events?sice=1", None, "sice", id="unknown parameter"),
    # Strict types: a number field takes a JSON number only.
    pytest.param(
        "PUT", "/v1/split", {"candidate_weight": True}, "candidate_weight", id="weight true"
    ),
    pytest.param(
        "PUT", "/v1/split", {"candidate_weight": "100"}, "candidate_weight", id="weight text"
    ),
    pytest.param(
        "PUT",
        "/v1/pools/green",
        {"upstreams": [{"address": "127.0.0.1:10", "weight": True}]},
        "upstreams[0].weight",
        id="upstream weight true",
    ),
    pytest.param("PUT", "/v1/split", {"candidate_weight": 0, "force": "yes"}, "force", id="force"),
    pytest.param(
        "POST", "/v1/drain", {"color": "blue", "cut_after": "5"}, "cut_after", id="cut text"
    ),
    pytest.param("PUT", "/v1/split", b'{"candidate_weight": NaN}', "body", id="NaN"),
    # Labels and values are logged: no control or bidirectional formatting characters.
    pytest.param(
        "PUT", "/v1/pools/green", {"version": "v1\u202egnp.exe"}, "version", id="bidi version"
    ),
    pytest.param(
        "PUT",
        "/v1/rules",
        {"rules": [{**BETA, "name": "beta\u0000"}]},
        "rules[0].name",
        id="NUL in a rule name",
    ),
    pytest.param(
        "PUT", "/v1/split", {"candidate_weight": 0, "salt": "s\x1b[2J"}, "salt", id="ESC salt"
    ),
    pytest.param("POST", "/v1/undrain", {"upstream": f"blue/{UNUSED}\u0085"}, "upstream", id="C1"),
    pytest.param("GET", "/v1/events?kind=a%0Ab", None, "kind", id="LF in a query"),
    pytest.param("PUT", "/v1/split", b"[" * 65 + b"]" * 65, "body", id="nested 65 deep"),
    pytest.param("PUT", "/v1/split", b"[" * 2000 + b"]" * 2000, "body", id="nested 2000 deep"),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), BAD_INPUT)
async def test_bad_input_is_400_naming_the_field_and_changes_nothing(
    quiet: Admin, method: str, path: str, body: Any, field: str
) -> None:
    before = await quiet.state()
    if isinstance(body, bytes):
        reply = await quiet.call(method, path, data=body)
    else:
        reply = await quiet.call(method, path, body)
    problem = reply.problem(400)
    assert field in reply.fields, problem
    assert all(error["reason"] for error in problem["errors"]), problem
    assert await quiet.state() == before


NOT_FOUND = [
    pytest.param("GET", "/v1/pools/red", None, [], id="get red pool"),
    pytest.param("PUT", "/v1/pools/red", {"upstreams": []}, [], id="put red pool"),
    pytest.param(
        "POST", "/v1/drain", {"upstream": "blue/127.0.0.1:2"}, ["upstream"], id="drain unknown"
    ),
    pytest.param(
        "POST", "/v1/drain", {"upstream": f"green/{UNUSED}"}, ["upstream"], id="drain wrong color"
    ),
    pytest.param(
        "POST", "/v1/undrain", {"upstream": "blue/127.0.0.1:2"}, ["upstream"], id="undrain"
    ),
    pytest.param("GET", "/v1/nope", None, [], id="unknown path"),
    pytest.param("DELETE", "/v1/pools/blue/x", None, [], id="unknown nested path"),
]


@pytest.mark.parametrize(("method", "path", "body", "fields"), NOT_FOUND)
async def test_unknown_things_are_404_and_change_nothing(
    quiet: Admin, method: str, path: str, body: Any, fields: list[str]
) -> None:
    before = await quiet.state()
    reply = await quiet.call(method, path, body)
    reply.problem(404)
    assert reply.fields == fields
    assert await quiet.state() == before


async def test_a_wrong_method_is_405_naming_the_allowed_ones(quiet: Admin) -> None:
    before = await quiet.state()
    reply = await quiet.call("DELETE", "/v1/split")
    reply.problem(405)
    assert set(reply.headers["Allow"].split(",")) == {"GET", "PUT"}
    assert await quiet.state() == before


REFUSED = [
    pytest.param("PUT", "/v1/split", {"candidate_weight": 100}, "candidate_weight", id="candidate"),
    pytest.param("PUT", "/v1/split", {"candidate_weight": 0, "live": "green"}, "live", id="live"),
    pytest.param(
        "PUT", "/v1/pools/blue", {"upstreams": ["127.0.0.1:10"]}, "upstreams", id="replace live"
    ),
    pytest.param("PUT", "/v1/pools/blue", {"upstreams": []}, "upstreams", id="empty live"),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), REFUSED)
async def test_changes_that_would_leave_traffic_without_upstream_are_409(
    quiet: Admin, method: str, path: str, body: Any, field: str
) -> None:
    before = await quiet.state()
    reply = await quiet.call(method, path, body)
    problem = reply.problem(409)
    assert reply.fields == [field]
    assert "force" in problem["errors"][0]["reason"]
    assert await quiet.state() == before


# -- accepted changes, seen on real traffic --------------------------------------------


async def test_split_change_moves_traffic_and_is_journaled(
    zdproxy: StartProxy, upstream: StartUpstream, session: aiohttp.ClientSession
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy({"pools": pools([blue.address], [green.address])})
    admin = Admin(proxy, session)
    assert await names(proxy, 10) == Counter({"blue": 10})

    split = await admin.ok("PUT", "/v1/split", {"candidate_weight": 10000})
    assert split["live"] == "blue" and split["candidate"] == "green"
    assert split["candidate_weight"] == 10000
    assert split["shares"] == {"blue": 0.0, "green": 100.0}
    assert await admin.get("/v1/split") == split
    seen_by_blue = len(blue.seen)
    assert await names(proxy, 30) == Counter({"green": 30})
    assert len(blue.seen) == seen_by_blue

    item = admin.journal_items()["split"]
    assert item["value"] == {"live": "blue", "candidate_weight": 10000}
    assert item["actor"] == "api"
    [event] = await admin.events("?kind=split_changed")
    assert event["actor"] == "api"
    assert event["data"]["before"] == {"blue": 10000, "green": 0}
    assert event["data"]["after"] == {"blue": 0, "green": 10000}
    metrics = await admin.call("GET", "/metrics")
    assert 'zdproxy_split_weight{color="green"} 1.0' in metrics.body.splitlines()

    # Green live, blue the candidate at 0, and a new salt.
    split = await admin.ok(
        "PUT", "/v1/split", {"candidate_weight": 0, "live": "green", "salt": "salt-2"}
    )
    assert (split["live"], split["candidate"], split["candidate_weight"]) == ("green", "blue", 0)
    assert split["salt_id"] == hashlib.sha256(b"salt-2").hexdigest()[:12]
    assert admin.journal_items()["salt"]["value"] == "salt-2"
    assert await names(proxy, 20) == Counter({"green": 20})


async def test_split_to_a_color_without_healthy_upstream_is_409_unless_forced(
    zdproxy: StartProxy, upstream: StartUpstream, session: aiohttp.ClientSession
) -> None:
    readiness: dict[str, Any] = {"status": 503}
    blue, green = await upstream("blue"), await upstream("green", readiness=readiness)
    config = pools([blue.address], [green.address])
    config["green"]["health"] = {"path": "/readyz", "interval": "50ms", "jitter": "10ms"}
    # Off the event loop: zdproxy probes green before it listens.
    proxy = await asyncio.get_running_loop().run_in_executor(None, zdproxy, {"pools": config})
    admin = Admin(proxy, session)
    status = await admin.get("/v1/status")
    assert status["pools"]["green"]["upstreams"][0]["health"] == "down"

    before = await admin.state()
    reply = await admin.call("PUT", "/v1/split", {"candidate_weight": 5000})
    problem = reply.problem(409)
    assert reply.fields == ["candidate_weight"]
    assert "green would get 50% of the traffic but has no routable upstream" in problem["detail"]
    assert await admin.state() == before

    split = await admin.ok("PUT", "/v1/split", {"candidate_weight": 5000, "force": True})
    assert split["candidate_weight"] == 5000
    assert split["shares"] == {"blue": 50.0, "green": 50.0}
    [event] = await admin.events("?kind=split_changed")
    assert event["reason"].endswith("(forced)")
    assert await names(proxy, 20) == Counter({"blue": 20})  # green's share falls back to blue
    assert green.seen == []

    readiness["status"] = 200
    await wait_until(lambda: logged(proxy, f"upstream_up: green/{green.address} up after"))
    assert set(await names(proxy, 40)) == {"blue", "green"}


async def test_pool_replacement_is_409_unless_a_healthy_upstream_stays_or_forced(
    zdproxy: StartProxy, upstream: StartUpstream, session: aiohttp.ClientSession
) -> None:
    old, new, spare = await upstream("old"), await upstream("new"), await upstream("spare")
    proxy = zdproxy({"pools": pools([old.address])})
    admin = Admin(proxy, session)

    before = await admin.state()
    reply = await admin.call("PUT", "/v1/pools/blue", {"upstreams": [new.address]})
    problem = reply.problem(409)
    assert reply.fields == ["upstreams"]
    assert "blue takes 100% of the traffic" in problem["detail"]
    assert await admin.state() == before
    assert await names(proxy, 10) == Counter({"old": 10})

    # The idle color is never refused.
    green = await admin.ok("PUT", "/v1/pools/green", {"upstreams": [spare.address]})
    assert green == {"upstreams": [{"address": spare.address, "weight": 100}], "version": ""}

    body = {"upstreams": [{"address": new.address, "weight": 7}], "version": "v2", "force": True}
    pool = await admin.ok("PUT", "/v1/pools/blue", body)
    assert pool == {"upstreams": [{"address": new.address, "weight": 7}], "version": "v2"}
    assert await admin.get("/v1/pools/blue") == pool
    await wait_healthy(proxy, "blue")  # a new upstream serves once its first checks passed
    served_by_old = len(old.seen)
    assert await names(proxy, 20) == Counter({"new": 20})
    assert len(old.seen) == served_by_old and spare.seen == []

    status = await admin.get("/v1/status")
    assert [u["id"] for u in status["pools"]["blue"]["upstreams"]] == [f"blue/{new.address}"]
    assert status["pools"]["blue"]["version"] == "v2"
    assert admin.journal_items()["pools.blue"]["value"] == pool
    event = (await admin.events("?kind=pool_changed"))[-1]
    assert event["data"]["color"] == "blue" and event["actor"] == "api"
    assert event["data"]["before"]["upstreams"] == [{"address": old.address, "weight": 100}]
    assert event["data"]["after"] == pool


async def test_rules_pin_a_header_to_its_color(
    zdproxy: StartProxy, upstream: StartUpstream, session: aiohttp.ClientSession
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy({"pools": pools([blue.address], [green.address])})
    admin = Admin(proxy, session)
    assert await admin.get("/v1/rules") == {"rules": []}

    rules = await admin.ok("PUT", "/v1/rules", {"rules": [{**BETA, "values": ["1", "yes"]}]})
    assert rules == {"rules": [{**BETA_VIEW, "values": ["1", "yes"]}]}
    assert await admin.get("/v1/rules") == rules
    assert await names(proxy, 10, {"X-Beta": "yes"}) == Counter({"green": 10})
    assert await names(proxy, 10, {"X-Beta": "no"}) == Counter({"blue": 10})
    assert await names(proxy, 10) == Counter({"blue": 10})
    metrics = await admin.call("GET", "/metrics")
    assert 'zdproxy_pin_matches_total{rule="beta"} 10.0' in metrics.body.splitlines()
    assert admin.journal_items()["rules"]["value"] == [
        {"name": "beta", "header": "X-Beta", "values": ["1", "yes"], "to": "green"}
    ]

    assert await admin.ok("PUT", "/v1/rules", {"rules": []}) == {"rules": []}
    assert await names(proxy, 10, {"X-Beta": "yes"}) == Counter({"blue": 10})
    assert [e["data"]["rules"] for e in await admin.events("?kind=rules_changed")] == [
        [{"name": "beta", "header": "X-Beta", "values": ["1", "yes"], "to": "green"}],
        [],
    ]


@pytest.mark.parametrize("workers", [1, 2])
async def test_drain_with_wait_answers_when_in_flight_work_is_done_and_undrain_restores(
    zdproxy: StartProxy,
    upstream: StartUpstream,
    raw_upstream: StartRaw,
    session: aiohttp.ClientSession,
    workers: int,
) -> None:
    held, green = await gated(raw_upstream, "blue", "/hold"), await upstream("green")
    config = {"pools": pools([held.address], [green.address]), "proxy": {"workers": workers}}
    proxy = zdproxy(config)
    admin = Admin(proxy, session)
    target = f"blue/{held.address}"

    async def blue_upstream() -> dict[str, Any]:
        upstreams: list[dict[str, Any]] = (await admin.get("/v1/status"))["pools"]["blue"][
            "upstreams"
        ]
        return upstreams[0]

    async with aiohttp.ClientSession() as client:

        async def fetch(path: str) -> tuple[int, Any]:
            async with client.get(proxy.url + path) as response:
                return response.status, await response.json()

        in_flight = asyncio.ensure_future(fetch("/hold/1"))
        await wait_until(lambda: held.paths == ["/hold/1"])
        body = {"upstream": target, "wait": True, "cut_after": 30}
        drain = asyncio.ensure_future(admin.call("POST", "/v1/drain", body))

        async def draining() -> bool:
            view = await blue_upstream()
            return bool(view["drained"])

        await until(draining)
        view = await blue_upstream()
        assert (view["routable"], view["in_flight"]) == (False, 1)
        assert not drain.done()  # its request is still held upstream
        assert await names(proxy, 10) == Counter({"green": 10})  # new requests go elsewhere
        held.gates["/hold"].set()
        reply = await drain
        assert await in_flight == (200, {"name": "blue", "path": "/hold/1"})

    assert reply.status == 200, reply
    result = reply.body
    assert result["upstreams"] == [target]
    assert (result["finished"], result["drained"], result["cut"]) == (True, True, 0)
    assert result["tunnels_closed"] == 0 and 0 < result["seconds"] < 30
    assert await names(proxy, 20) == Counter({"green": 20})
    assert held.paths == ["/hold/1"]  # nothing reached the drained upstream since
    assert (await blue_upstream())["in_flight"] == 0
    assert admin.journal_items()["drained"]["value"] == [target]
    [started] = await admin.events("?kind=drain_started")
    assert started["data"]["upstreams"] == [target] and started["actor"] == "api"
    [drained] = await admin.events("?kind=drained")
    assert drained["data"]["cut"] == 0 and drained["data"]["upstreams"] == [target]

    assert await admin.ok("POST", "/v1/undrain", {"upstream": target}) == {"upstreams": [target]}
    assert await names(proxy, 10) == Counter({"blue": 10})
    assert len(held.paths) == 11
    view = await blue_upstream()
    assert (view["drained"], view["routable"]) == (False, True)
    assert admin.journal_items()["drained"]["value"] == []
    [undrained] = await admin.events("?kind=undrained")
    assert target in undrained["reason"]
    # Undraining what is not drained is a no-op: nothing put back, no event.
    assert await admin.ok("POST", "/v1/undrain", {"color": "blue"}) == {"upstreams": []}
    assert len(await admin.events("?kind=undrained")) == 1

    # Without wait the answer comes at once.
    result = await admin.ok("POST", "/v1/drain", {"color": "blue", "force": True})
    assert result == {
        "upstreams": [target],
        "finished": False,
        "drained": True,
        "cut": 0,
        "tunnels_closed": 0,
        "seconds": 0.0,
    }
    assert await names(proxy, 10) == Counter({"green": 10})


# -- events ----------------------------------------------------------------------------


async def test_events_history_filters_by_since_kind_and_limit(
    zdproxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = zdproxy({"pools": unchecked(pools([UNUSED]))})
    admin = Admin(proxy, session)
    await admin.ok("PUT", "/v1/rules", {"rules": [BETA]})
    await admin.ok("PUT", "/v1/pools/green", {"version": "g-1"})
    await admin.ok("PUT", "/v1/rules", {"rules": []})
    await admin.ok("PUT", "/v1/pools/green", {"version": "g-2"})

    events = await admin.events()
    kinds = [e["kind"] for e in events]
    assert kinds == ["started", "rules_changed", "pool_changed", "rules_changed", "pool_changed"]
    ids = [e["id"] for e in events]
    assert ids == list(range(ids[0], ids[0] + 5))
    keys = {"id", "time", "timestamp", "kind", "reason", "actor", "by", "data"}
    assert all(set(e) == keys for e in events)
    assert events[0]["time"] <= events[-1]["time"]

    assert await admin.events(f"?since={ids[2]}") == events[3:]
    assert await admin.events(f"?since={ids[-1]}") == []
    pools_changed = await admin.events("?kind=pool_changed")
    assert pools_changed == [events[2], events[4]]
    assert [e["data"]["after"]["version"] for e in pools_changed] == ["g-1", "g-2"]
    assert await admin.events("?limit=1") == events[-1:]
    assert await admin.events("?limit=2&kind=rules_changed") == [events[1], events[3]]
    assert await admin.events(f"?kind=rules_changed&since={ids[1]}&limit=5") == [events[3]]
    assert await admin.events("?kind=no_such_kind") == []


@dataclass
class Sse:
    id: int
    event: str
    data: dict[str, Any]


async def next_sse(stream: aiohttp.ClientResponse, within: float = 5.0) -> Sse:
    """The next server-sent event of a stream (comments skipped)."""
    fields: dict[str, str] = {}
    async with asyncio.timeout(within):
        while True:
            raw = await stream.content.readline()
            assert raw, f"the stream ended (after {fields})"
            line = raw.decode().rstrip("\r\n")
            if line.startswith(":"):
                continue
            if not line:
                if fields:
                    return Sse(int(fields["id"]), fields["event"], json.loads(fields["data"]))
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def test_events_follow_streams_changes_and_resumes_from_last_event_id(
    zdproxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = zdproxy({"pools": unchecked(pools([UNUSED]))})
    admin = Admin(proxy, session)
    [started] = await admin.events()
    url = f"{proxy.admin_url}/v1/events"

    async with session.get(url, params={"follow": "1"}, headers=AUTH) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"] == "text/event-stream"
        assert stream.headers["Cache-Control"] == "no-cache"
        assert await next_sse(stream) == Sse(started["id"], "started", started)  # history
        await admin.ok("PUT", "/v1/rules", {"rules": [BETA]})  # after subscribing
        change = await next_sse(stream)
    assert (change.id, change.event) == (started["id"] + 1, "rules_changed")
    assert change.data["kind"] == "rules_changed" and change.data["actor"] == "api"
    assert change.data["data"]["rules"] == [BETA]
    assert change.data == (await admin.events("?kind=rules_changed"))[0]

    # Disconnected: this change happens while nobody follows.
    await admin.ok("PUT", "/v1/pools/green", {"version": "g-2"})
    resume = {**AUTH, "Last-Event-ID": str(change.id)}
    async with session.get(url, params={"follow": "1"}, headers=resume) as stream:
        missed = await next_sse(stream)  # the one missed, not the ones seen again
        assert (missed.id, missed.event) == (change.id + 1, "pool_changed")
        assert missed.data["data"]["after"]["version"] == "g-2"
        await admin.ok("PUT", "/v1/split", {"candidate_weight": 0})
        live = await next_sse(stream)
        assert (live.id, live.event) == (missed.id + 1, "split_changed")

    # kind and limit apply to the history and to the live part.
    query = {"follow": "1", "kind": "split_changed", "limit": "1"}
    async with session.get(url, params=query, headers=AUTH) as stream:
        assert await next_sse(stream) == live
        await admin.ok("PUT", "/v1/rules", {"rules": []})  # not a split_changed: skipped
        await admin.ok("PUT", "/v1/split", {"candidate_weight": 0, "salt": "salt-3"})
        latest = await next_sse(stream)
        assert (latest.id, latest.event) == (live.id + 2, "split_changed")
        assert latest.data["data"]["salt_changed"] is True


async def test_events_follow_answers_at_once_when_nothing_matches_yet(
    zdproxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = zdproxy({"pools": unchecked(pools([UNUSED]))})
    admin = Admin(proxy, session)
    [started] = await admin.events()
    query = {"follow": "1", "since": str(started["id"])}  # no history to replay
    url = f"{proxy.admin_url}/v1/events"
    # The change is made once the head is in: were the head held back until the first
    # event, this would time out.
    async with asyncio.timeout(5), session.get(url, params=query, headers=AUTH) as stream:
        assert stream.status == 200
        await admin.ok("PUT", "/v1/pools/green", {"version": "g-1"})
        change = await next_sse(stream)
    assert (change.id, change.event) == (started["id"] + 1, "pool_changed")


async def test_a_follower_going_away_is_not_an_error(
    zdproxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = zdproxy({"pools": unchecked(pools([UNUSED]))})
    admin = Admin(proxy, session)
    url = f"{proxy.admin_url}/v1/events"
    async with session.get(url, params={"follow": "1"}, headers=AUTH) as stream:
        assert (await next_sse(stream)).event == "started"
    # Gone. Three events for the stream that was: the log shows the third only after
    # zdproxy has handled what writing the first ones did.
    for version in ("v1", "v2", "v3"):
        await admin.ok("PUT", "/v1/pools/green", {"version": version})
    await wait_until(lambda: logged(proxy, "pool_changed: green: 0 upstreams, version v3"))
    assert not logged(proxy, "GET /v1/events failed")


# -- actors ----------------------------------------------------------------------------


async def test_the_cli_user_agent_makes_changes_actor_cli(
    zdproxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = zdproxy({"pools": unchecked(pools([UNUSED]))})
    admin = Admin(proxy, session)
    await admin.ok("PUT", "/v1/split", {"candidate_weight": 0, "salt": "cli-salt"}, CLI)
    await admin.ok("PUT", "/v1/rules", {"rules": [BETA]})
    await admin.ok("POST", "/v1/drain", {"color": "blue", "force": True}, CLI)
    await admin.ok("POST", "/v1/undrain", {"color": "blue"})
    await admin.ok("PUT", "/v1/pools/green", {"version": "g-1"}, {**AUTH, "User-Agent": "curl/8"})
    changes = [(e["kind"], e["actor"]) for e in await admin.events()][1:]
    assert changes == [
        ("split_changed", "cli"),
        ("rules_changed", "api"),
        ("drain_started", "cli"),
        ("undrained", "api"),
        ("pool_changed", "api"),
    ]
    items = admin.journal_items()
    assert {key: item["actor"] for key, item in items.items()} == {
        "split": "cli",
        "salt": "cli",
        "rules": "api",
        "drained": "api",  # the undrain wrote it last
        "pools.green": "api",
    }


# -- readiness -------------------------------------------------------------------------


async def test_readyz_is_503_while_starting_and_while_stopping(
    zdproxy: StartProxy, raw_upstream: StartRaw, session: aiohttp.ClientSession
) -> None:
    app = await gated(raw_upstream, "blue", "/ready", "/work")
    health = {"path": "/ready", "interval": "100ms", "jitter": "0ms", "timeout": "5s", "rise": 1}
    admin_url = f"http://127.0.0.1:{free_port()}"
    config = {
        "pools": {"blue": {"upstreams": [app.address], "health": health}},
        "admin": {"listen": admin_url.removeprefix("http://")},
    }
    starting = asyncio.get_running_loop().run_in_executor(None, zdproxy, config)

    answer: list[tuple[int, Any]] = []

    async def readyz() -> bool:
        try:
            async with session.get(f"{admin_url}/readyz") as response:
                answer[:] = [(response.status, await response.json(content_type=None))]
                return True
        except aiohttp.ClientConnectionError:
            return False  # not listening yet

    # The admin API listens first; zdproxy waits for the first health verdict, which
    # the upstream holds, before it takes traffic.
    await until(readyz)
    [(status, body)] = answer
    assert (status, body["detail"]) == (503, "starting")
    async with session.get(f"{admin_url}/healthz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ok"})
    assert not starting.done()
    app.gates["/ready"].set()
    proxy = await starting
    assert await readyz() and answer == [(200, {"status": "ready"})]

    # Stopping: readyz turns 503 while a request still in flight finishes.
    async with aiohttp.ClientSession() as client:

        async def work() -> tuple[int, Any]:
            async with client.get(f"{proxy.url}/work") as response:
                return response.status, await response.json()

        in_flight = asyncio.ensure_future(work())
        await wait_until(lambda: "/work" in app.paths)
        proxy.process.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            return await readyz() and answer[0][0] == 503

        await until(not_ready)
        assert answer[0][1]["detail"] == "stopping"
        app.gates["/work"].set()
        assert await in_flight == (200, {"name": "blue", "path": "/work"})
    await wait_until(lambda: proxy.process.poll() is not None)
    assert proxy.process.returncode == 0
    await wait_until(lambda: logged(proxy, "stopped: clean"))


# -- bugs that change state: each on a proxy of its own --------------------------------


async def test_a_rule_that_cannot_be_applied_is_refused_and_changes_nothing(
    zdproxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = zdproxy({"pools": unchecked(pools([UNUSED]))})
    admin = Admin(proxy, session)
    before = await admin.state()
    body = b'{"rules": [{"header": "X-Beta", "values": ["\\ud800"], "to": "green"}]}'
    reply = await admin.call("PUT", "/v1/rules", data=body)
    reply.problem(400)
    assert await admin.state() == before


async def test_the_proxy_own_listener_is_refused_as_an_upstream(
    zdproxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = zdproxy({"pools": unchecked(pools([UNUSED]))})
    admin = Admin(proxy, session)
    before = await admin.state()
    # The idle color, and no traffic: the loop is never exercised.
    reply = await admin.call("PUT", "/v1/pools/green", {"upstreams": [proxy.address]})
    reply.problem(400)
    assert await admin.state() == before
