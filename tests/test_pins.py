"""Pin rules and the preview override: a real zdproxy in front of real blue and green apps."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Upstream, ZdProxy, admin_api, pools, raw_exchange, to_toml
from tests.test_config import EXAMPLE_CONFIG, clean_env, write_config, zdproxy_cli

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]

SECRET = b"preview-secret-0123456789abcdef"
ELSEWHERE = ["10.0.0.0/8"]  # the tests' client is 127.0.0.1: never in this network
FAR = 4_000_000_000  # an expiry in 2096


def config(
    blue: Upstream | None,
    green: Upstream | None,
    *,
    live: str = "blue",
    weight: int = 0,
    pins: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "pools": pools([blue.address] if blue else [], [green.address] if green else []),
        "split": {"live": live, "candidate_weight": weight, **extra.pop("split", {})},
        **extra,
    }
    if pins is not None:
        result["pins"] = pins
    return result


def sign(secret: bytes, color: str, expiry: int) -> str:
    """A token made from the spec, independently of zdproxy's own code."""
    message = f"{color}.{expiry}".encode()
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return f"{color}.{expiry}." + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def secret_file(tmp_path: Path, secret: bytes = SECRET) -> str:
    path = tmp_path / "preview.secret"
    path.write_bytes(secret + b"\n")
    return str(path)


async def answer(
    proxy: ZdProxy, path: str = "/", headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """The echo of the upstream that served one GET (its name, and the headers it saw)."""
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.get(proxy.url + path, headers=headers or {}) as response,
    ):
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def color(proxy: ZdProxy, path: str = "/", **headers: str) -> str:
    return str(
        (await answer(proxy, path, {k.replace("_", "-"): v for k, v in headers.items()}))["name"]
    )


# -- pins ------------------------------------------------------------------------------


async def test_each_matcher_kind_pins_to_its_color(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    pins = [
        {"name": "tenants", "header": "X-Tenant", "values": ["acme", "globex"], "to": "green"},
        {"name": "beta", "cookie": "plan", "values": ["beta"], "to": "green"},
        {"name": "host", "host": ["Beta.Example.com"], "to": "green"},
        {"name": "path", "path_prefix": ["/green/", "/g2/"], "to": "green"},
        {
            "name": "both",
            "header": "X-Region",
            "values": ["eu"],
            "path_prefix": ["/api"],
            "to": "green",
        },
    ]
    proxy = zdproxy(config(blue, green, pins=pins))
    assert await color(proxy) == "blue"  # no rule matches: the split (all live)
    # header: any case of the name, one of the values, exactly
    assert await color(proxy, X_Tenant="acme") == "green"
    assert await color(proxy, **{"x-tenant": "globex"}) == "green"
    assert await color(proxy, X_Tenant="ACME") == "blue"
    assert await color(proxy, X_Tenant="acme2") == "blue"
    # cookie, among others
    assert await color(proxy, Cookie="theme=dark; plan=beta") == "green"
    assert await color(proxy, Cookie="plan=free") == "blue"
    # host: any case, port ignored
    assert await color(proxy, Host="beta.example.COM:8443") == "green"
    assert await color(proxy, Host="example.com") == "blue"
    # path prefix
    assert await color(proxy, "/green/x") == "green"
    assert await color(proxy, "/g2") == "blue"
    assert await color(proxy, "/g2/") == "green"
    # every condition of a rule must match
    assert await color(proxy, "/api/x", X_Region="eu") == "green"
    assert await color(proxy, "/api/x", X_Region="us") == "blue"
    assert await color(proxy, "/web", X_Region="eu") == "blue"
    # a pin's header still reaches the app
    seen = await answer(proxy, "/", {"X-Tenant": "acme"})
    assert seen["headers"]["X-Tenant"] == "acme"


async def test_network_pin_matches_the_client_address(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    here = [{"network": [*ELSEWHERE, "127.0.0.0/8"], "to": "green"}]
    proxy = zdproxy(config(blue, green, pins=here))
    assert await color(proxy) == "green"
    assert await proxy.reload(config(blue, green, pins=[{"network": ELSEWHERE, "to": "green"}]))
    assert await color(proxy) == "blue"


async def test_first_matching_rule_wins(zdproxy: StartProxy, upstream: StartUpstream) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    narrow = {"path_prefix": ["/x"], "to": "blue"}
    broad = {"path_prefix": ["/"], "to": "green"}
    proxy = zdproxy(config(blue, green, live="green", pins=[narrow, broad]))
    assert await color(proxy, "/x") == "blue"
    assert await color(proxy, "/y") == "green"
    assert await proxy.reload(config(blue, green, live="green", pins=[broad, narrow]))
    assert await color(proxy, "/x") == "green"


async def test_candidate_and_live_follow_the_split_and_beat_the_bucket(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    pins = [
        {"header": "X-Group", "values": ["canary"], "to": "candidate"},
        {"header": "X-Group", "values": ["stable"], "to": "live"},
    ]
    proxy = zdproxy(config(blue, green, live="blue", pins=pins))
    assert await color(proxy, X_Group="canary") == "green"
    assert await color(proxy, X_Group="stable") == "blue"
    assert await proxy.reload(config(blue, green, live="green", pins=pins))
    assert await color(proxy, X_Group="canary") == "blue"
    assert await color(proxy, X_Group="stable") == "green"
    # All traffic to the candidate (blue now), yet the pin keeps its users on live.
    assert await proxy.reload(config(blue, green, live="green", weight=10000, pins=pins))
    assert await color(proxy) == "blue"
    assert await color(proxy, X_Group="stable") == "green"


async def test_pin_on_the_sticky_header_and_the_split_for_everyone_else(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    sticky = {"sticky_key": "header:X-User"}
    pins = [{"header": "x-user", "values": ["vip"], "to": "green"}]
    proxy = zdproxy(config(blue, green, weight=5000, pins=pins, split=sticky))
    assert {await color(proxy, X_User="vip") for _ in range(10)} == {"green"}
    others = {await color(proxy, X_User=f"user-{i}") for i in range(40)}
    assert others == {"blue", "green"}  # 40 users at 50%: both colors, almost surely


async def test_pin_to_an_empty_color_falls_back(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    pins = [{"path_prefix": ["/"], "to": "green"}]
    proxy = zdproxy(config(blue, None, pins=pins))
    assert await color(proxy) == "blue"  # green has nothing routable
    await admin_api(proxy, "POST", "/v1/drain", {"color": "blue", "force": True})
    async with aiohttp.ClientSession() as session, session.get(proxy.url) as response:
        assert response.status == 503


async def test_pipelined_requests_keep_their_own_pins(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(config(blue, green, pins=[{"header": "X-T", "values": ["g"], "to": "green"}]))
    requests = (
        b"GET /slow/200 HTTP/1.1\r\nHost: a\r\nX-T: g\r\n\r\n"
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: a\r\nX-T: g\r\nConnection: close\r\n\r\n"
    )
    replies = await raw_exchange(proxy, requests)
    assert replies.count(b"HTTP/1.1 200") == 3
    assert replies.index(b"slow green") < replies.index(b'"name": "blue"')
    assert replies.index(b'"name": "blue"') < replies.index(b'"name": "green"')


# -- preview ---------------------------------------------------------------------------


def preview(tmp_path: Path, networks: list[str]) -> dict[str, Any]:
    return {"allow_networks": networks, "secret_file": secret_file(tmp_path)}


async def test_preview_from_an_allowed_network(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(config(blue, green, preview={"allow_networks": ["127.0.0.0/8"]}))
    seen = await answer(proxy, "/", {"X-Zd-Color": "green"})
    assert seen["name"] == "green"
    assert not {k for k in seen["headers"] if k.lower() == "x-zd-color"}  # a control header
    seen = await answer(proxy, "/", {"Cookie": "a=1; zd_color=green"})
    assert seen["name"] == "green"
    assert seen["headers"]["Cookie"] == "a=1; zd_color=green"  # the cookie is left alone
    assert await color(proxy, **{"x-zd-color": "GREEN"}) == "green"
    assert await color(proxy) == "blue"
    # Renamed header and cookie; the old names mean nothing any more.
    named = {"allow_networks": ["127.0.0.0/8"], "header": "X-Preview", "cookie": "pv"}
    assert await proxy.reload(config(blue, green, preview=named))
    assert await color(proxy, X_Preview="green") == "green"
    assert await color(proxy, Cookie="pv=green") == "green"
    assert await color(proxy, Cookie="zd_color=green") == "blue"


async def test_preview_beats_pins(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    pins = [{"path_prefix": ["/"], "to": "blue"}]
    proxy = zdproxy(config(blue, green, live="green", pins=pins, preview=preview(tmp_path, [])))
    assert await color(proxy) == "blue"
    token = sign(SECRET, "green", int(time.time()) + 600)
    assert await color(proxy, X_Zd_Color=token) == "green"


async def test_signed_preview_from_anywhere(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(config(blue, green, preview=preview(tmp_path, ELSEWHERE)))
    token = sign(SECRET, "green", int(time.time()) + 600)
    seen = await answer(proxy, "/", {"X-Zd-Color": token})
    assert seen["name"] == "green"
    assert not {k for k in seen["headers"] if k.lower() == "x-zd-color"}
    assert await color(proxy, Cookie=f"zd_color={token}") == "green"
    blue_token = sign(SECRET, "blue", int(time.time()) + 600)
    assert await proxy.reload(config(blue, green, live="green", preview=preview(tmp_path, [])))
    assert await color(proxy, X_Zd_Color=blue_token) == "blue"


async def test_secret_from_the_environment(zdproxy: StartProxy, upstream: StartUpstream) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    env = {"ZDPROXY_PREVIEW__SECRET": SECRET.decode()}
    proxy = zdproxy(config(blue, green), env=env)
    assert await color(proxy, X_Zd_Color=sign(SECRET, "green", int(time.time()) + 60)) == "green"
    assert not any(SECRET.decode() in line for line in proxy.log_lines)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("green", id="plain-from-elsewhere"),
        pytest.param(sign(b"another-secret-0123456789", "green", FAR), id="other-secret"),
        pytest.param(sign(SECRET, "green", FAR)[:-2] + "AA", id="bad-signature"),
        pytest.param(sign(SECRET, "blue", FAR).replace("blue", "green", 1), id="color-swapped"),
        pytest.param(sign(SECRET, "green", int(time.time()) - 1), id="expired"),
        pytest.param("green.notatime.abc", id="malformed"),
        pytest.param("purple", id="no-color"),
    ],
)
async def test_preview_ignored_when_forged_expired_or_from_elsewhere(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path, value: str
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(config(blue, green, preview=preview(tmp_path, ELSEWHERE)))
    seen = await answer(proxy, "/", {"X-Zd-Color": value})
    assert seen["name"] == "blue"  # routed as if the override were absent
    assert not {k for k in seen["headers"] if k.lower() == "x-zd-color"}  # and still removed
    assert await color(proxy, Cookie=f"zd_color={value}") == "blue"
    # The same proxy honours a genuine one: the refusal above was about the value.
    assert await color(proxy, X_Zd_Color=sign(SECRET, "green", FAR)) == "green"


async def test_without_a_secret_or_networks_nothing_is_honoured(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(config(blue, green))
    seen = await answer(proxy, "/", {"X-Zd-Color": "green"})
    assert seen["name"] == "blue"
    assert not {k for k in seen["headers"] if k.lower() == "x-zd-color"}


# -- the preview-token command and config errors ---------------------------------------


async def test_preview_token_command_mints_a_token_the_proxy_honours(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(config(blue, green, preview=preview(tmp_path, ELSEWHERE)))
    result = zdproxy_cli(
        "preview-token", "green", "--ttl", "1h", "--config", str(proxy.config_path)
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    color_part, expiry, _ = token.split(".")
    assert color_part == "green"
    assert 3598 <= int(expiry) - time.time() <= 3602  # the expiry is whole seconds
    assert await color(proxy, X_Zd_Color=token) == "green"
    assert await color(proxy, Cookie=f"zd_color={token}") == "green"
    assert SECRET.decode() not in result.stdout + result.stderr


def test_preview_token_without_a_secret_exits_2(tmp_path: Path) -> None:
    config = {"pools": pools(["127.0.0.1:9"]), "preview": {"allow_networks": ["127.0.0.0/8"]}}
    path = write_config(tmp_path, to_toml(config))
    result = zdproxy_cli("preview-token", "green", "--config", str(path))
    assert result.returncode == 2
    assert "no preview secret" in result.stderr
    assert "ZDPROXY_PREVIEW__SECRET" in result.stderr
    assert result.stdout == ""
    with_env = zdproxy_cli(
        "preview-token",
        "blue",
        "--ttl",
        "5m",
        "--config",
        str(path),
        env=clean_env(ZDPROXY_PREVIEW__SECRET=SECRET.decode()),
    )
    assert with_env.returncode == 0, with_env.stderr
    expiry = int(with_env.stdout.split(".")[1])
    assert with_env.stdout.strip() == sign(SECRET, "blue", expiry)


def test_help_documents_preview_token() -> None:
    overview = zdproxy_cli("--help")
    assert "preview-token" in overview.stdout
    detail = zdproxy_cli("preview-token", "--help")
    assert detail.returncode == 0
    assert "--ttl" in detail.stdout and "ZDPROXY_PREVIEW__SECRET" in detail.stdout


def test_invalid_rules_are_refused_with_the_field_named(tmp_path: Path) -> None:
    bad = {
        "pins": [
            {"header": "X-Tenant", "values": ["a"], "to": "green"},
            {"network": ["10.0.0.0/33"], "to": "green"},
            {"to": "blue"},
            {"path_prefix": ["api"], "to": "purple"},
            {"header": "X-Tenant", "to": "green"},
        ],
        "preview": {"allow_networks": ["nope"], "secret_file": str(tmp_path / "missing")},
    }
    result = zdproxy_cli("check", "--config", str(write_config(tmp_path, to_toml(bad))))
    assert result.returncode == 2
    errors = result.stderr
    assert "pins[1].network: '10.0.0.0/33' is not a network" in errors
    assert "pins[2]: a pin rule needs at least one condition" in errors
    assert "pins[3].path_prefix: 'api' must start with '/'" in errors
    assert "pins[3].to:" in errors
    assert "pins[4]: header needs a list of values" in errors
    assert "preview.allow_networks: 'nope' is not a network" in errors
    assert "preview.secret_file: cannot read" in errors
    assert "pins[0]" not in errors


async def test_invalid_pins_on_reload_keep_the_running_rules(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    pins = [{"header": "X-T", "values": ["g"], "to": "green"}]
    proxy = zdproxy(config(blue, green, pins=pins))
    assert not await proxy.reload(config(blue, green, pins=[{"name": "empty", "to": "green"}]))
    assert any("pins[0]: a pin rule needs" in line for line in proxy.log_lines)
    assert await color(proxy, X_T="g") == "green"


def test_example_pins_in_the_shipped_config_are_valid(tmp_path: Path) -> None:
    text = EXAMPLE_CONFIG.read_text()
    start = text.index("# Examples, to uncomment:")
    end = text.index("[preview]", start)
    example = re.sub(r"(?m)^# (\[\[pins\]\]|[a-z_]+ = .*)$", r"\1", text[start:end])
    uncommented = text[:start] + example + text[end:]
    assert len(tomllib.loads(uncommented)["pins"]) == 3
    result = zdproxy_cli("check", "--config", str(write_config(tmp_path, uncommented)))
    assert result.returncode == 0, result.stderr
