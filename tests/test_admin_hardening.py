"""The admin listener against slow, flooding and malformed clients, over real sockets:
header and idle timeouts, the connection limits (and the capacity they keep for the
operator), problem+json for the errors aiohttp answers itself, JSON depth, and the
refusal to serve a socket other hosts can reach without a token. The bookkeeping and
the input checks are also unit-tested here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    ADMIN_AUTH,
    ZdProxy,
    admin_api,
    free_port,
    pools,
    start_zdproxy,
    to_toml,
    unchecked,
    wait_until,
)
from zdproxy.admin.admission import Admission, Limit, Phase
from zdproxy.admin.inputs import MAX_JSON_DEPTH, json_problem, printable, text_problem
from zdproxy.admin.listener import reachable_from_other_hosts
from zdproxy.config.loader import ConfigError, settings_from_mapping

StartProxy = Callable[..., ZdProxy]
UNUSED = "127.0.0.1:9"  # a pool member that never gets traffic (health checks off)
QUIET = {"pools": unchecked(pools([UNUSED]))}
TOKEN_LINE = b"Authorization: " + ADMIN_AUTH["Authorization"].encode() + b"\r\n"
PARTIAL_HEAD = b"GET /v1/status HTTP/1.1\r\nHost: admin\r\n"  # never finished


def admin_config(**admin: Any) -> dict[str, Any]:
    return {**QUIET, "admin": {"listen": "127.0.0.1:0", **admin}}


# -- a raw client --------------------------------------------------------------------------


class Raw:
    """One plain TCP connection to the admin listener."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, proxy: ZdProxy, data: bytes = b"") -> Raw:
        host, _, port = proxy.admin_address.rpartition(":")
        raw = cls(*await asyncio.open_connection(host, int(port)))
        if data:
            await raw.send(data)
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_closed(self, within: float = 10.0) -> bytes:
        """Everything the server sends until it closes the connection."""
        async with asyncio.timeout(within):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.close()


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """(status, headers, body) of each response in `data` (bodies framed by length)."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        size = int(headers.get("Content-Length", "0"))
        found.append((int(lines[0].split(" ")[1]), headers, rest[:size]))
        data = rest[size:]
    return found


def problem(data: bytes, status: int) -> dict[str, Any]:
    """The one response in `data`, once checked to be a problem+json with this status."""
    [(got, headers, body)] = responses(data)
    assert got == status, data[:300]
    assert headers["Content-Type"].startswith("application/problem+json"), headers
    answer: dict[str, Any] = json.loads(body)
    assert answer["status"] == status and answer["title"] and answer["detail"], answer
    return answer


@pytest.fixture
async def raws() -> AsyncIterator[list[Raw]]:
    """Raw connections a test opens, closed at its end."""
    opened: list[Raw] = []
    yield opened
    for raw in opened:
        raw.close()


# -- header and idle timeouts ----------------------------------------------------------------


async def test_slow_and_silent_heads_get_408_at_the_header_timeout(
    zdproxy: StartProxy, raws: list[Raw]
) -> None:
    proxy = zdproxy(admin_config(header_timeout="500ms", idle_timeout="1h"))
    silent = await Raw.open(proxy)
    slow = await Raw.open(proxy, PARTIAL_HEAD)
    second = await Raw.open(proxy, b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
    raws += [silent, slow, second]
    async with asyncio.timeout(10):
        await second.reader.readuntil(b'"ok"}')  # the first answer is in
    await second.send(PARTIAL_HEAD)  # a second head, begun and never finished

    for raw in (silent, slow, second):
        answer = problem(await raw.until_closed(), 408)
        assert "admin.header_timeout" in answer["detail"], answer
    await wait_until(lambda: any("by admin.header_timeout" in x for x in proxy.log_lines))


async def test_a_slow_body_with_a_valid_token_gets_408_at_the_body_timeout(
    zdproxy: StartProxy, raws: list[Raw]
) -> None:
    proxy = zdproxy(admin_config(body_timeout="500ms", header_timeout="1h"))
    head = b"PUT /v1/split HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\n"
    slow = await Raw.open(proxy, head + TOKEN_LINE + b"Content-Length: 100\r\n\r\n{")
    raws.append(slow)
    answer = problem(await slow.until_closed(), 408)
    assert "admin.body_timeout (0.5s)" in answer["detail"], answer
    # The split is unchanged, and the listener answers the next call.
    status = await admin_api(proxy, "GET", "/v1/status")
    assert status["split"]["candidate_weight"] == 0


async def test_an_idle_connection_closes_at_the_idle_timeout(
    zdproxy: StartProxy, raws: list[Raw]
) -> None:
    proxy = zdproxy(admin_config(header_timeout="1h", idle_timeout="500ms"))
    idle = await Raw.open(proxy, b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
    raws.append(idle)
    [(status, _, body)] = responses(await idle.until_closed())
    assert (status, json.loads(body)) == (200, {"status": "ok"})  # then closed, silently


# -- the connection limits -------------------------------------------------------------------


async def test_a_flood_of_slow_heads_evicts_the_oldest_and_status_keeps_answering(
    zdproxy: StartProxy, raws: list[Raw]
) -> None:
    # A header timeout far past the test: every close here is the limits' doing.
    limits = {"max_connections": 20, "max_pending_heads": 10, "header_timeout": "1h"}
    proxy = zdproxy(admin_config(**limits))
    raws.extend([await Raw.open(proxy, PARTIAL_HEAD) for _ in range(15)])  # one by one
    for raw in raws[:5]:  # each new one past the cap displaced the oldest
        detail = problem(await raw.until_closed(), 408)["detail"]
        assert "admin.max_pending_heads (10)" in detail

    status = await admin_api(proxy, "GET", "/v1/status")  # the operator gets in
    assert set(status["pools"]) == {"blue", "green"}
    problem(await raws[5].until_closed(), 408)  # its connection displaced the oldest
    # The ten newest are still open: one can still finish its request.
    await raws[6].send(TOKEN_LINE + b"Connection: close\r\n\r\n")
    [(code, _, body)] = responses(await raws[6].until_closed())
    assert code == 200 and json.loads(body)["split"]["live"] == "blue"
    assert any("by admin.max_pending_heads" in line for line in proxy.log_lines)


async def test_every_slot_busy_refuses_with_503_and_an_idle_connection_makes_room(
    zdproxy: StartProxy, raws: list[Raw]
) -> None:
    proxy = zdproxy(admin_config(max_connections=3, max_pending_heads=2))
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession(headers=ADMIN_AUTH))
        followers = []
        for _ in range(3):  # event streams: answering a request for as long as they last
            stream = await stack.enter_async_context(
                session.get(proxy.admin_url + "/v1/events?follow=1")
            )
            assert stream.status == 200
            followers.append(stream)

        refused = await Raw.open(proxy)
        raws.append(refused)
        detail = problem(await refused.until_closed(), 503)["detail"]
        assert "admin.max_connections (3)" in detail

        followers[0].close()  # a slot frees once zdproxy sees the close

        async def healthz() -> int:
            raw = await Raw.open(proxy, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            raws.append(raw)
            async with asyncio.timeout(10):
                line = await raw.reader.readline()
            return int(line.split(b" ")[1]) if line else 0

        async with asyncio.timeout(10):
            while await healthz() != 200:  # noqa: ASYNC110 - the state is zdproxy's
                await asyncio.sleep(0.01)
        idle = raws[-1]  # answered, kept open: idle, and the oldest such
        status = await admin_api(proxy, "GET", "/v1/status")  # no slot free: idle makes room
        assert status["split"]["live"] == "blue"
        rest = await idle.until_closed()
        assert b"HTTP/" not in rest  # closed without another answer


# -- errors aiohttp answers itself -----------------------------------------------------------


@pytest.fixture(scope="module")
def default_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZdProxy]:
    proxy = start_zdproxy(tmp_path_factory.mktemp("hardening"), QUIET)
    yield proxy
    proxy.stop()


MALFORMED = [
    pytest.param(
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 9000 + b"\r\n\r\n",
        431,
        "request head too large",
        id="a header over 8190 bytes",
    ),
    pytest.param(
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
        431,
        "request head too large",
        id="a request line over 8190 bytes",
    ),
    pytest.param(
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
        + b"\r\n",
        400,
        "malformed request",
        id="200 header fields",
    ),
    pytest.param(b"HELLO\x1b[31m\r\n\r\n", 400, "malformed request", id="not a request line"),
    pytest.param(b"GET /healthz HTTP/1.1\r\n\r\n", 400, "Host", id="no Host"),
    pytest.param(
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nExpect: tea\r\nConnection: close\r\n\r\n",
        417,
        "Expect",
        id="an unknown Expect",
    ),
]


@pytest.mark.parametrize(("request_bytes", "status", "detail"), MALFORMED)
async def test_malformed_requests_get_problem_json(
    default_proxy: ZdProxy, raws: list[Raw], request_bytes: bytes, status: int, detail: str
) -> None:
    raw = await Raw.open(default_proxy, request_bytes)
    raws.append(raw)
    answer = problem(await raw.until_closed(), status)
    assert detail in answer["detail"], answer
    assert "\x1b" not in answer["detail"] and "xxxx" not in answer["detail"]


async def test_json_nested_past_the_limit_is_400_naming_the_problem(
    default_proxy: ZdProxy,
) -> None:
    async def put_split(depth: int) -> dict[str, Any]:
        body = b'{"candidate_weight": ' + b"[" * (depth - 1) + b"1" + b"]" * (depth - 1) + b"}"
        async with (
            aiohttp.ClientSession(headers=ADMIN_AUTH) as session,
            session.put(default_proxy.admin_url + "/v1/split", data=body) as response,
        ):
            assert response.status == 400, await response.text()
            answer: dict[str, Any] = await response.json(content_type=None)
            return answer

    for depth in (MAX_JSON_DEPTH + 1, 2000):  # 2000: deeper than Python's JSON decoder goes
        answer = await put_split(depth)
        assert answer["errors"] == [
            {"field": "body", "reason": f"JSON nested deeper than {MAX_JSON_DEPTH} levels"}
        ]
    # At the limit the depth passes; the model refuses the value itself.
    answer = await put_split(MAX_JSON_DEPTH)
    assert [e["field"] for e in answer["errors"]] == ["candidate_weight"]


# -- an admin socket other hosts can reach ------------------------------------------------------


async def test_an_inherited_wildcard_admin_socket_without_a_token_is_refused(
    tmp_path: Path,
) -> None:
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate is missing: `make test` installs systemd"
    port, admin_port = free_port(), free_port()
    config = {
        # The file names loopback: only the passed socket is exposed.
        **QUIET,
        "proxy": {"listen": f"127.0.0.1:{free_port()}"},
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "state": {"dir": str(tmp_path / "state")},
    }
    path = tmp_path / "zdproxy.toml"
    path.write_text(to_toml(config))
    argv = [activate, "-l", f"127.0.0.1:{port}", "-l", f"0.0.0.0:{admin_port}"]
    argv += ["--fdname=proxy:admin", "--", sys.executable, "-m", "zdproxy", "run"]
    process = await asyncio.create_subprocess_exec(
        *argv, "--config", str(path), stderr=asyncio.subprocess.PIPE, cwd=tmp_path
    )
    try:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            listening = 0
            while listening < 2:  # both sockets bound
                listening += b"Listening on" in await process.stderr.readline()
            # The first connection makes the activator exec zdproxy.
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
            err = (await process.stderr.read()).decode()
            assert await process.wait() == 2, err  # the config's problem
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await process.wait()
    assert (
        f"cannot start: admin listener 0.0.0.0:{admin_port} is reachable from other hosts and "
        "no admin token is set: set admin.token_file (or ZDPROXY_ADMIN__TOKEN)" in err
    ), err
    assert not (tmp_path / "state").exists()  # refused before anything was written


def test_reachability_of_a_listening_socket() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert reachable_from_other_hosts(sock) is None
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        assert reachable_from_other_hosts(sock) == f"0.0.0.0:{sock.getsockname()[1]}"
    with (
        tempfile.TemporaryDirectory(prefix="zd-") as short,
        socket.socket(socket.AF_UNIX) as sock,
    ):
        sock.bind(str(Path(short) / "admin.sock"))
        assert reachable_from_other_hosts(sock) is None


# -- the settings --------------------------------------------------------------------------------


def test_pending_heads_must_leave_room_below_max_connections() -> None:
    with pytest.raises(ConfigError) as refused:
        settings_from_mapping({"admin": {"max_connections": 10, "max_pending_heads": 10}})
    assert refused.value.errors == [
        "admin.max_pending_heads: 10 must be below max_connections (10)"
    ]


# -- the bookkeeping, unit-tested ---------------------------------------------------------------


def test_admission_caps_pending_heads_by_displacing_the_oldest() -> None:
    admission: Admission[str] = Admission(max_connections=10, max_pending_heads=2)
    assert admission.admit("a").evict is None
    assert admission.admit("b").evict is None
    verdict = admission.admit("c")
    assert verdict.admitted and verdict.evict is not None
    assert (verdict.evict.conn, verdict.evict.phase) == ("a", Phase.HEAD)
    assert verdict.evict.limit is Limit.MAX_PENDING_HEADS
    assert admission.phase("a") is None and len(admission) == 2
    # A keep-alive connection starting its next head counts too, and displaces another.
    assert admission.move("b", Phase.BUSY) is None
    assert admission.move("b", Phase.IDLE) is None
    assert admission.admit("d").evict is None
    evict = admission.move("b", Phase.HEAD)
    assert evict is not None and evict.conn == "c"
    assert admission.move("c", Phase.BUSY) is None  # closed stays closed
    assert admission.phase("c") is None


def test_admission_at_max_connections_displaces_discarding_then_idle_then_heads() -> None:
    admission: Admission[str] = Admission(max_connections=4, max_pending_heads=3)
    for conn, phase in (("h", Phase.HEAD), ("i", Phase.IDLE), ("d", Phase.DISCARDING)):
        admission.admit(conn)
        admission.move(conn, phase)
    admission.admit("b")
    admission.move("b", Phase.BUSY)
    order = []
    for new in ("n1", "n2", "n3"):
        verdict = admission.admit(new)
        assert verdict.admitted and verdict.evict is not None
        assert verdict.evict.limit is Limit.MAX_CONNECTIONS
        order.append(verdict.evict.conn)
        admission.move(new, Phase.BUSY)
    assert order == ["d", "i", "h"]
    assert admission.admit("n4").admitted is False  # every one busy
    assert len(admission) == 4 and admission.count(Phase.BUSY) == 4


def test_admission_orders_a_phase_by_when_it_was_entered() -> None:
    admission: Admission[str] = Admission(max_connections=3, max_pending_heads=2)
    for conn in ("a", "b", "c"):
        admission.admit(conn)
        admission.move(conn, Phase.IDLE)
    admission.move("a", Phase.BUSY)
    admission.move("a", Phase.IDLE)  # idle again: now the newest idle one
    verdict = admission.admit("d")
    assert verdict.evict is not None and verdict.evict.conn == "b"


# -- the input checks, unit-tested ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code", "kind"),
    [
        ("a\x00b", "U+0000", "a control character"),
        ("tab\there", "U+0009", "a control character"),
        ("del\x7f", "U+007F", "a control character"),
        ("c1\x85", "U+0085", "a control character"),
        ("v1\u202egnp.exe", "U+202E", "a bidirectional formatting character"),
        ("\u2066isolate\u2069", "U+2066", "a bidirectional formatting character"),
        ("mark\u200f", "U+200F", "a bidirectional formatting character"),
    ],
)
def test_control_and_bidi_characters_are_named(text: str, code: str, kind: str) -> None:
    reason = text_problem(text)
    assert reason is not None and code in reason and kind in reason


def test_printable_text_passes_and_escapes_are_readable() -> None:
    assert text_problem("v2.1 déploiement 中文 🚀") is None
    assert printable("/x\x1b[31m\u202e\udcff") == "/x\\x1b[31m\\u202e\\udcff"
    assert printable("plain é") == "plain é"


def test_json_problem_names_the_field_and_the_depth() -> None:
    assert json_problem({"rules": [{"name": "ok"}, {"name": "bad\x07"}]}) is not None
    error = json_problem({"rules": [{"name": "ok"}, {"name": "bad\x07"}]})
    assert error is not None and error.field == "rules[1].name"
    key = json_problem({"pools": {"x\x1by": 1}})
    assert key is not None and key.field == "pools.x\\x1by" and "its name" in key.reason
    surrogate = json_problem({"version": "\ud800"})
    assert surrogate is not None and "lone surrogate" in surrogate.reason
    deep: Any = []
    for _ in range(MAX_JSON_DEPTH - 1):
        deep = [deep]
    assert json_problem(deep) is None
    too_deep = json_problem([deep])
    assert too_deep is not None and too_deep.field == "body"
