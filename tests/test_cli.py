"""The `zdproxy` CLI end to end: real processes against a running zdproxy's admin API.

The CLI finds the admin API through ZDPROXY_ADMIN_URL and ZDPROXY_TOKEN here (the test
proxies bind an ephemeral admin port); the demo test covers `--config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ADMIN_TOKEN, CliResult, Upstream, ZdProxy, pools, run_cli, wait_until

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]


def admin_env(proxy: ZdProxy) -> dict[str, str]:
    return {"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_TOKEN": ADMIN_TOKEN}


async def cli(proxy: ZdProxy, *args: str) -> CliResult:
    return await run_cli(*args, env=admin_env(proxy))


async def answering(
    proxy: ZdProxy, count: int, headers: dict[str, str] | None = None
) -> Counter[str]:
    """Which apps answer `count` GETs from as many new users."""
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        names: Counter[str] = Counter()
        for _ in range(count):
            async with session.get(proxy.url + "/", headers=headers) as resp:
                names[(await resp.json())["name"]] += 1
        return names


async def two_colors(
    zdproxy: StartProxy, upstream: StartUpstream
) -> tuple[ZdProxy, Upstream, Upstream]:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy({"pools": pools([blue.address], [green.address])})
    return proxy, blue, green


async def test_status_shift_pool_rules_and_events(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    proxy, blue, green = await two_colors(zdproxy, upstream)

    status = await cli(proxy, "status")
    assert status.code == 0, status.err
    assert "live blue, candidate green at 0%" in status.out
    assert f"blue/{blue.address}" in status.out and f"green/{green.address}" in status.out
    as_json = json.loads((await cli(proxy, "status", "--json")).out)
    assert as_json["split"]["candidate_weight"] == 0

    shifted = await cli(proxy, "shift", "100%")
    assert (shifted.code, shifted.out.strip()) == (0, "live blue, green at 100%")
    assert await answering(proxy, 10) == Counter({"green": 10})
    assert (await cli(proxy, "shift", "12.5")).out.strip() == "live blue, green at 12.5%"
    assert (await cli(proxy, "shift", "0", "--live", "green")).code == 0
    assert await answering(proxy, 10) == Counter({"green": 10})

    spare = await upstream("green-2")
    pool = await cli(proxy, "pool", "set", "blue", spare.address, "--version", "v9")
    assert pool.code == 0, pool.err
    assert pool.out.strip() == f"blue: {spare.address} (version v9)"
    shown = json.loads((await cli(proxy, "pool", "show", "blue")).out)
    assert shown == {"upstreams": [{"address": spare.address, "weight": 100}], "version": "v9"}

    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(
        '[[pins]]\nname = "testers"\nheader = "X-Tester"\nvalues = ["yes"]\nto = "blue"\n'
    )
    rules = await cli(proxy, "rules", "--set", str(rules_file))
    assert rules.code == 0, rules.err
    assert rules.out.startswith('testers -> blue: {"header": "X-Tester"')
    assert await answering(proxy, 5, {"X-Tester": "yes"}) == Counter({"green-2": 5})
    assert (await cli(proxy, "rules")).out == rules.out

    events = await cli(proxy, "events", "--kind", "split_changed")
    assert events.code == 0
    assert len(events.out.splitlines()) == 3
    assert all("split_changed [cli]" in line for line in events.out.splitlines())
    decoded = [json.loads(line) for line in (await cli(proxy, "events", "--json")).out.splitlines()]
    assert {e["kind"] for e in decoded} >= {"split_changed", "pool_changed", "rules_changed"}
    assert [e["id"] for e in decoded] == sorted(e["id"] for e in decoded)


async def test_refusals_and_bad_input_exit_codes(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address], [])})

    refused = await cli(proxy, "shift", "50")  # green has no upstream
    assert refused.code == 1
    assert "refused: candidate_weight: green would get 50% of the traffic" in refused.err
    assert json.loads((await cli(proxy, "status", "--json")).out)["split"]["candidate_weight"] == 0

    bad_address = await cli(proxy, "pool", "set", "green", "not-an-address")
    assert bad_address.code == 1 and "upstreams[0].address" in bad_address.err

    for args in (["shift", "101"], ["shift", "half"], ["drain", "red"], ["wait", "--until", "x"]):
        result = await cli(proxy, *args)
        assert result.code == 2, (args, result)
        assert result.err.startswith(f"zdproxy {args[0]}: ")
    missing = await run_cli("status", "--config", str(tmp_path / "none.toml"))
    assert missing.code == 2 and "cannot read the file" in missing.err

    wrong_token = await run_cli(
        "status", env={"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_TOKEN": "x" * 20}
    )
    assert wrong_token.code == 1 and "wrong bearer token" in wrong_token.err

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
        unreachable = await run_cli("status", env={"ZDPROXY_ADMIN_URL": closed})
    assert unreachable.code == 3 and "cannot reach zdproxy's admin API" in unreachable.err


async def test_wait_exit_codes_and_drained_only_after_requests_finish(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    proxy, blue, _ = await two_colors(zdproxy, upstream)

    healthy = await cli(proxy, "wait", "--until", "healthy:green", "--timeout", "5s")
    assert (healthy.code, healthy.out.strip()) == (0, "healthy:green: ok")
    timed_out = await cli(proxy, "wait", "--until", "live:green", "--timeout", "300ms")
    assert timed_out.code == 4
    assert "timed out after 300ms: green is not live" in timed_out.err

    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(session.get(proxy.url + "/slow/2000"))
        await wait_until(lambda: bool(blue.seen))  # the request is in flight on blue
        assert (await cli(proxy, "shift", "100")).code == 0
        drain = await cli(proxy, "drain", "blue")
        assert drain.code == 0 and drain.out.startswith("draining blue/")
        waiting = asyncio.ensure_future(
            cli(proxy, "wait", "--until", "drained:blue", "--interval", "50ms", "--timeout", "10s")
        )
        # While the request runs, blue is drained but not done: `wait` must keep waiting.
        await asyncio.sleep(0.5)
        assert not waiting.done()
        async with await slow as response:
            assert response.status == 200
        result = await waiting
        assert result.code == 0, result.err
    status = json.loads((await cli(proxy, "status", "--json")).out)
    assert status["pools"]["blue"]["upstreams"][0]["drained"] is True
    undrained = await cli(proxy, "undrain", "blue")
    assert undrained.out.strip() == f"back in rotation: blue/{blue.address}"


async def test_wait_keeps_trying_while_zdproxy_is_away(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
        result = await run_cli(
            "wait", "--until", "healthy:blue", "--timeout", "400ms", "--interval", "100ms",
            env={"ZDPROXY_ADMIN_URL": closed},
        )  # fmt: skip
    assert result.code == 4
    assert "cannot reach zdproxy's admin API" in result.err


async def test_events_follow_streams_new_events(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    proxy, _, _ = await two_colors(zdproxy, upstream)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "zdproxy", "events", "--follow", "--kind", "split_changed"),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **admin_env(proxy)},
    )
    assert process.stdout is not None
    try:
        # Events from before the stream connects come with its history: no race here.
        for percent in ("10", "20"):
            assert (await cli(proxy, "shift", percent)).code == 0
        lines: list[Any] = []
        async with asyncio.timeout(10):
            while len(lines) < 2:
                lines.append((await process.stdout.readline()).decode())
        assert "green at 10%" in lines[0] and "green at 20%" in lines[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def test_admin_api_on_a_unix_socket(zdproxy: StartProxy, upstream: StartUpstream) -> None:
    blue = await upstream("blue")
    with tempfile.TemporaryDirectory(prefix="zd-") as short:  # sun_path holds 108 bytes
        path = Path(short) / "admin.sock"
        proxy = zdproxy({"pools": pools([blue.address]), "admin": {"listen": f"unix:{path}"}})
        assert proxy.admin_address == f"unix:{path}"
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        env = {"ZDPROXY_ADMIN_URL": f"unix:{path}", "ZDPROXY_TOKEN": ADMIN_TOKEN}
        status = await run_cli("status", "--json", env=env)
        assert status.code == 0, status.err
        assert (
            json.loads(status.out)["pools"]["blue"]["upstreams"][0]["id"] == f"blue/{blue.address}"
        )
        assert (await run_cli("shift", "0", env=env)).code == 0
