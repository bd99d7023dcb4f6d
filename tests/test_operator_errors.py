"""Errors that say what is wrong and what to do: listeners that cannot be bound (exit 2,
one line, no traceback), the admin API's refusals, and config problems that name the
option meant, the rule broken, and the environment variable at fault.

A real zdproxy where the message comes from the daemon; the messages of cases a test
cannot bring about for real (a privileged port as root) from their builders."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    ADMIN_AUTH,
    Upstream,
    ZdProxy,
    admin_api,
    pools,
    run_cli,
    to_toml,
    unchecked,
    wait_healthy,
)
from zdproxy.config.loader import ConfigError, load_settings, settings_from_mapping
from zdproxy.config.units import Address
from zdproxy.control.availability import UpstreamState, unroutable
from zdproxy.ops.listen_errors import cannot_listen
from zdproxy.ops.sockets import bind

StartProxy = Callable[..., ZdProxy]
UNUSED = "127.0.0.1:9"


def config_file(tmp_path: Path, **listen: str) -> Path:
    """A valid config whose proxy and admin listeners are `listen`'s (else port 0)."""
    config = {
        "proxy": {"listen": listen.get("proxy", "127.0.0.1:0")},
        "admin": {"listen": listen.get("admin", "127.0.0.1:0")},
        "state": {"dir": str(tmp_path / "state")},
        "pools": unchecked(pools([UNUSED])),
    }
    path = tmp_path / "zdproxy.toml"
    path.write_text(to_toml(config))
    return path


# -- listeners ----------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["proxy", "admin"])
async def test_a_port_in_use_is_named_with_the_command_that_finds_its_holder(
    tmp_path: Path, listener: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        path = config_file(tmp_path, **{listener: f"127.0.0.1:{port}"})
        ran = await run_cli("run", "--config", str(path))
    assert ran.code == 2, ran.err  # the config's or the host's problem, not a crash
    assert (
        f"cannot listen on 127.0.0.1:{port} ({listener}.listen): address already in use "
        f"(another process holds it: `ss -ltnp 'sport = :{port}'`)"
    ) in ran.err
    assert "Traceback" not in ran.err
    assert len(ran.err.strip().splitlines()) == 1
    assert not (tmp_path / "state").exists()  # refused before anything was written


async def test_a_unix_socket_in_use_is_named_too(tmp_path: Path) -> None:
    held = tmp_path / "admin.sock"
    with socket.socket(socket.AF_UNIX) as taken:
        taken.bind(str(held))
        taken.listen()
        ran = await run_cli("run", "--config", str(config_file(tmp_path, admin=f"unix:{held}")))
    assert ran.code == 2, ran.err
    assert (
        f"cannot listen on unix:{held} (admin.listen): address already in use (a process "
        f"answers on it: `ss -lxp src {held}`)"
    ) in ran.err


def test_a_privileged_port_says_which_capability_it_needs() -> None:
    denied = OSError(errno.EACCES, "Permission denied")  # as a non-root user meets it
    message = str(cannot_listen("proxy.listen", Address.parse("0.0.0.0:80"), denied))
    assert message.startswith("cannot listen on 0.0.0.0:80 (proxy.listen): permission denied")
    assert "CAP_NET_BIND_SERVICE" in message and "socket activation" in message
    high = str(cannot_listen("proxy.listen", Address.parse("0.0.0.0:8080"), denied))
    assert "CAP_NET_BIND_SERVICE" not in high  # not the reason above 1023


def test_an_address_this_host_does_not_have(tmp_path: Path) -> None:
    address = Address.parse("192.0.2.1:8080")  # TEST-NET-1: on no interface
    with pytest.raises(OSError) as refused:
        bind(address, 1)
    message = str(cannot_listen("proxy.listen", address, refused.value))
    assert "address not available: no network interface of this host has 192.0.2.1" in message


def test_a_socket_path_without_its_directory(tmp_path: Path) -> None:
    address = Address.parse(f"unix:{tmp_path}/missing/admin.sock")
    with pytest.raises(OSError) as refused:
        bind(address, 1)
    message = str(cannot_listen("admin.listen", address, refused.value))
    assert f"no directory {tmp_path}/missing (create it" in message


# -- the admin API's refusals ---------------------------------------------------------------


async def refusal(proxy: ZdProxy, method: str, path: str, body: Any = None) -> str:
    async with (
        aiohttp.ClientSession(proxy.admin_url, headers=ADMIN_AUTH) as session,
        session.request(method, path, json=body) as response,
    ):
        answer = await response.json(content_type=None)
        assert 400 <= response.status < 500, answer
        return str(answer["detail"])


async def upstream_state(proxy: ZdProxy, color: str) -> str:
    status = await admin_api(proxy, "GET", "/v1/status")
    (upstream,) = status["pools"][color]["upstreams"]
    return str(upstream["state"])


async def until_state(proxy: ZdProxy, color: str, state: str) -> None:
    async with asyncio.timeout(10):
        while await upstream_state(proxy, color) != state:  # noqa: ASYNC110 - each try is a request
            await asyncio.sleep(0.02)


async def test_refusals_say_what_is_wrong_and_what_to_do(
    zdproxy: StartProxy, upstream: Callable[..., Any]
) -> None:
    blue: Upstream = await upstream("blue")
    green: Upstream = await upstream("green")
    # Checked by HTTP, with a long timeout: an upstream that never answers stays unknown.
    # (Green's upstream comes after the start: this loop, which serves it, waits for that.)
    health = {"path": "/readyz", "timeout": "60s", "interval": "100ms", "fall": 1}
    proxy = zdproxy(
        {
            "pools": {
                "blue": {"upstreams": [blue.address]},
                "green": {"upstreams": [], "health": health},
            },
            "plans": {"two": {"steps": [{"weight": 10, "hold": "1h"}, {"weight": 100}]}},
            "rollout": {"default_plan": "two"},
        }
    )
    await admin_api(proxy, "PUT", "/v1/pools/green", {"upstreams": [green.address]})
    await wait_healthy(proxy, "green")
    await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
    async with asyncio.timeout(10):
        while (await admin_api(proxy, "GET", "/v1/rollout"))["state"] != "step":  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    assert await refusal(proxy, "POST", "/v1/rollouts", {"color": "green"}) == (
        "color: rollout 1 (green, step 1 of 2) is running: abort it or wait for it to end "
        "(`zdproxy rollout abort`, `zdproxy wait --until done:1`)"
    )
    assert await refusal(proxy, "POST", "/v1/rollout/resume") == (
        "state: cannot resume rollout 1 (green, step 1 of 2): it is not paused"
    )
    await admin_api(proxy, "POST", "/v1/rollout/abort")
    assert await refusal(proxy, "POST", "/v1/rollout/abort") == (
        "state: cannot abort: no rollout is running (rollout 1 has ended: aborted)"
    )

    # "No routable upstream" says why: drained, down, or not checked yet.
    await admin_api(proxy, "POST", "/v1/drain", {"color": "green"})
    shift = {"candidate_weight": 1000}
    assert await refusal(proxy, "PUT", "/v1/split", shift) == (
        "candidate_weight: green would get 10% of the traffic but has no routable upstream: "
        "all of green's upstreams are drained: `zdproxy undrain green` (or pass force: its "
        "share then goes to the other color)"
    )
    with socket.socket() as closed, socket.create_server(("127.0.0.1", 0)) as silent:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        refusing = f"127.0.0.1:{closed.getsockname()[1]}"
        await admin_api(proxy, "PUT", "/v1/pools/green", {"upstreams": [refusing]})
        await until_state(proxy, "green", UpstreamState.DOWN)
        down = "all of green's upstreams are down by their health checks: `zdproxy status` shows"
        assert down in await refusal(proxy, "PUT", "/v1/split", shift)
        # Accepted by the kernel, never answered: the first check waits for its timeout.
        never = f"127.0.0.1:{silent.getsockname()[1]}"
        await admin_api(proxy, "PUT", "/v1/pools/green", {"upstreams": [never]})
        assert await upstream_state(proxy, "green") == UpstreamState.UNKNOWN
        assert (
            "all of green's upstreams are not checked yet (no health verdict): wait for their "
            "first checks: `zdproxy wait --until healthy:green`"
        ) in await refusal(proxy, "PUT", "/v1/split", shift)
        await admin_api(proxy, "PUT", "/v1/pools/green", {"upstreams": []})

    # A misspelt upstream, or field of a body, is offered the one meant.
    typo = f"blu/{blue.address}"
    assert await refusal(proxy, "POST", "/v1/drain", {"upstream": typo}) == (
        f"unknown upstream {typo!r}; did you mean 'blue/{blue.address}'?"
    )
    assert await refusal(proxy, "PUT", "/v1/split", {"candidate_weight": 0, "forse": True}) == (
        "invalid body: forse: unknown option; did you mean 'force'?"
    )


def test_several_reasons_are_told_apart() -> None:
    states = [UpstreamState.DRAINED, UpstreamState.DOWN, UpstreamState.DOWN, UpstreamState.UP]
    assert unroutable("blue", states) == (
        "none of blue's upstreams is routable: 1 drained (`zdproxy undrain blue`); 2 down by "
        "their health checks (`zdproxy status` shows why; fix or start the app)"
    )
    assert unroutable("green", []) == "green has no upstreams: `zdproxy pool set green ADDRESS...`"


# -- config problems ----------------------------------------------------------------------------


def refused(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "zdproxy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert error.value.origin == str(path)
    return error.value.errors


BLUE = '[pools.blue]\nupstreams = ["127.0.0.1:9"]\n'


def test_a_bad_health_path_states_the_rule_not_a_regex(tmp_path: Path) -> None:
    for path in ("readyz", "/ready z"):
        (error,) = refused(tmp_path, f'{BLUE}[pools.blue.health]\npath = "{path}"\n')
        assert error == (
            "pools.blue.health.path: must start with '/' and hold no spaces (e.g. \"/readyz\"), "
            "or be empty for a TCP connect check"
        )


def test_unknown_keys_are_offered_the_option_or_section_meant(tmp_path: Path) -> None:
    text = (
        f'[proxy]\nlistn = "127.0.0.1:0"\n[poolz]\n{BLUE}healthh = {{}}\n[spilt]\nlive = "blue"\n'
    )
    assert refused(tmp_path, text) == [
        "proxy.listn: unknown option; did you mean 'listen'?",
        "pools.blue.healthh: unknown section; did you mean 'health'?",
        "poolz: unknown section; did you mean 'pools'?",
        "spilt: unknown section; did you mean 'split'?",
    ]
    (far,) = refused(tmp_path, f"{BLUE}[proxy]\nzzz = 1\n")
    assert far == "proxy.zzz: unknown option (check the spelling)"


def test_a_pattern_is_said_in_words(tmp_path: Path) -> None:
    (error,) = refused(tmp_path, f'{BLUE}[split]\nsticky_key = "cookie:a b"\n')
    assert error == (
        "split.sticky_key: must be bucket-cookie, client-ip, cookie:NAME or header:NAME (NAME "
        "an HTTP token)"
    )


@pytest.mark.parametrize(
    ("name", "value", "line"),
    [
        (
            "ZDPROXY_PROXY__LISTEN",
            "garbage",
            "ZDPROXY_PROXY__LISTEN: invalid address 'garbage': expected host:port or "
            "unix:/path (from the environment, for proxy.listen)",
        ),
        (
            "ZDPROXY_PROXY__LISTN",
            "127.0.0.1:0",
            "ZDPROXY_PROXY__LISTN: unknown option; did you mean 'ZDPROXY_PROXY__LISTEN'? (from "
            "the environment, for proxy.listn)",
        ),
        (
            "ZDPROXY_PROXY",
            '{"listen": 5}',
            "ZDPROXY_PROXY: expected an address: host:port, [::1]:port or unix:/path (from the "
            "environment, for proxy.listen)",
        ),
        (
            "ZDPROXY_POOLS__BLUE__UPSTREAMS",
            "127.0.0.1:9",
            "ZDPROXY_POOLS__BLUE__UPSTREAMS: not valid JSON: it sets pools.blue.upstreams, a "
            """list, which the environment gives as JSON (e.g. '["a", "b"]')""",
        ),
    ],
)
def test_a_bad_value_from_the_environment_names_its_variable_not_the_file(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, line: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        settings_from_mapping({"pools": pools([UNUSED])}, "/etc/zdproxy/zdproxy.toml")
    assert error.value.errors == [line]
    assert str(error.value).startswith("the environment (ZDPROXY_* variables): invalid")
    assert "/etc/zdproxy/zdproxy.toml" not in str(error.value)


def test_a_file_value_under_a_variable_for_its_section_stays_the_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZDPROXY_PROXY", '{"backlog": 64}')  # sets proxy.backlog only
    with pytest.raises(ConfigError) as error:
        settings_from_mapping({"proxy": {"listen": "nowhere"}, "pools": pools([UNUSED])}, "f")
    assert error.value.errors == [
        "proxy.listen: invalid address 'nowhere': expected host:port or unix:/path"
    ]
    assert error.value.origin == "f"


async def test_check_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "zdproxy.toml"
    path.write_text(f'{BLUE}[pools.blue.health]\npath = "readyz"\n[proxy]\nbaklog = 64\n')
    checked = await run_cli(
        "check", "--config", str(path), env={"ZDPROXY_SPLIT__CANDIDATE_WEIGHT": "lots"}
    )
    assert checked.code == 2
    lines = checked.err.strip().splitlines()
    assert lines[0] == f"{path} and the environment (ZDPROXY_* variables): invalid configuration"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == [
        "ZDPROXY_SPLIT__CANDIDATE_WEIGHT",
        "pools.blue.health.path",
        "proxy.baklog",
    ]
    assert "did you mean 'backlog'?" in checked.err
