"""Operating zdproxy: hot reload under load (file watch), TLS with certificate reload,
the log format and the access log. Real processes, real sockets, real certificates."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Upstream, ZdProxy, admin_api, pools, to_toml, wait_until
from zdproxy.logs import LogfmtFormatter

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]
LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def logfmt(line: str) -> dict[str, str]:
    return {
        key: json.loads(value) if value.startswith('"') else value
        for key, value in LOGFMT.findall(line)
    }


def replace_file(path: Path, text: str) -> None:
    """Write the way deploy tools and editors do: a new file renamed over the old one."""
    temp = path.with_name(path.name + ".new")
    temp.write_text(text)
    os.replace(temp, path)


def applied_since(proxy: ZdProxy, mark: int) -> bool:
    return any('msg="reload_applied:' in line for line in proxy.log_lines[mark:])


def count_events(proxy: ZdProxy, kind: str) -> int:
    return sum(f'msg="{kind}:' in line for line in proxy.log_lines)


@pytest.mark.parametrize("workers", [1, 2])
async def test_twenty_reloads_from_file_changes_under_load_fail_nothing(
    zdproxy: StartProxy, upstream: StartUpstream, workers: int
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config: dict[str, Any] = {
        "proxy": {"workers": workers},
        "pools": pools([blue.address], [green.address]),
        "split": {"candidate_weight": 0},
        "reload": {"debounce": "100ms"},
        "log": {"level": "info"},
    }
    proxy = zdproxy(config)
    done = asyncio.Event()
    outcomes: list[str] = []

    async def client() -> None:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            while not done.is_set() and len(outcomes) < 100_000:
                try:
                    async with session.get(proxy.url + "/") as resp:
                        outcomes.append(
                            (await resp.json())["name"] if resp.status == 200 else str(resp.status)
                        )
                except (aiohttp.ClientError, ValueError) as exc:
                    outcomes.append(f"error: {exc!r}")

    async with aiohttp.ClientSession() as session, session.ws_connect(proxy.url + "/ws") as ws:
        await ws.send_str("before")
        assert (await ws.receive(timeout=5)).data == "blue:before"  # the app echoes
        load = [asyncio.ensure_future(client()) for _ in range(4)]
        try:
            for i in range(1, 21):
                weight = (i * 2500) % 12500  # 2500, 5000, 7500, 10000, 0, ...
                levels = ("info", "debug")
                new = {**proxy.config, "split": {"candidate_weight": weight}}
                new["upstream"] = {"timeout": f"{30 + i}s"}  # limits change too
                new["log"] = {"level": levels[i % 2]}
                mark = len(proxy.log_lines)
                replace_file(proxy.config_path, to_toml(new))
                # Any reload from now on reads the new file: wait for one, then check it.
                await wait_until(lambda mark=mark: applied_since(proxy, mark), within=10)
                split = await admin_api(proxy, "GET", "/v1/split")
                assert split["candidate_weight"] == weight
                target = len(outcomes) + 20
                await wait_until(lambda target=target: len(outcomes) >= target, within=10)

            # An invalid file changes nothing, and says which field and why.
            bad = {**proxy.config, "split": {"candidate_weight": 20000}}
            replace_file(proxy.config_path, to_toml(bad))
            await wait_until(lambda: count_events(proxy, "reload_refused") == 1, within=10)
            refused = [line for line in proxy.log_lines if 'msg="reload_refused:' in line][-1]
            assert "split.candidate_weight: Input should be less than or equal to 10000" in refused
            assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == 0
            events = await admin_api(proxy, "GET", "/v1/events?kind=reload_refused")
            assert events["events"][-1]["data"]["errors"] == [
                "split.candidate_weight: Input should be less than or equal to 10000"
            ]
        finally:
            done.set()
            await asyncio.gather(*load)
        # The WebSocket opened before the first reload is still open and working.
        await ws.send_str("after")
        assert (await ws.receive(timeout=5)).data == "blue:after"

    failures = [o for o in outcomes if o not in ("blue", "green")]
    assert failures == [], f"{len(failures)} of {len(outcomes)} failed: {failures[:5]}"
    assert set(outcomes) == {"blue", "green"}
    metrics = await metrics_text(proxy)
    applied = count_events(proxy, "reload_applied")
    assert applied >= 20  # one per change (a save that comes in two bursts makes two)
    assert f'zdproxy_config_reloads_total{{result="applied"}} {applied}.0' in metrics
    assert 'zdproxy_config_reloads_total{result="refused"} 1.0' in metrics


async def metrics_text(proxy: ZdProxy) -> str:
    async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/metrics") as r:
        return await r.text()


# -- TLS --------------------------------------------------------------------------------


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with openssl."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def served_certificate(proxy: ZdProxy) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection(proxy.host, proxy.port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


@pytest.mark.parametrize("workers", [1, 2])
async def test_tls_listener_and_certificate_reload(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path, workers: int
) -> None:
    blue = await upstream("blue")
    cert, key = make_certificate(tmp_path, "first")
    tls = {"cert_file": str(cert), "key_file": str(key)}
    proxy = zdproxy(
        {
            "pools": pools([blue.address]),
            "proxy": {"tls": tls, "workers": workers},
            "reload": {"debounce": "100ms"},
        }
    )
    # Its own ephemeral port although its config sets a [proxy] section (that used to
    # replace the listener with the default 127.0.0.1:8080).
    assert proxy.port != 8080 and proxy.address.startswith("127.0.0.1:")
    trusted = ssl.create_default_context(cafile=str(cert))
    url = f"https://{proxy.address}/hello"
    async with aiohttp.ClientSession() as session, session.get(url, ssl=trusted) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert echoed["name"] == "blue"
    assert echoed["headers"]["X-Forwarded-Proto"] == "https"
    assert await served_certificate(proxy) == ssl.PEM_cert_to_DER_cert(cert.read_text())

    # A renewed certificate (renamed over the old files) serves new connections.
    second_cert, second_key = make_certificate(tmp_path, "second")
    replace_file(key, second_key.read_text())
    replace_file(cert, second_cert.read_text())
    renewed = ssl.PEM_cert_to_DER_cert(second_cert.read_text())
    for _ in range(100):
        if await served_certificate(proxy) == renewed:
            break
        await asyncio.sleep(0.05)
    assert await served_certificate(proxy) == renewed
    assert any('msg="tls_reloaded:' in line for line in proxy.log_lines)

    # Plain HTTP on the TLS port is not served.
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" not in await reader.read(1024)
    writer.close()


def test_check_names_an_unusable_certificate(tmp_path: Path) -> None:
    cert = tmp_path / "bad.crt"
    cert.write_text("not a certificate\n")
    path = tmp_path / "zdproxy.toml"
    path.write_text(to_toml({"proxy": {"tls": {"cert_file": str(cert), "key_file": str(cert)}}}))
    result = subprocess.run(
        [sys.executable, "-m", "zdproxy", "check", "--config", str(path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "proxy.tls.cert_file: not a usable certificate and key" in result.stderr


# -- logs -------------------------------------------------------------------------------


async def test_log_lines_are_logfmt_and_the_access_log_samples(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address]), "log": {"level": "info", "access": True}})
    sizes = []
    async with aiohttp.ClientSession() as session:
        for path in ("/a", "/status/503"):
            async with session.get(proxy.url + path) as resp:
                sizes.append(len(await resp.read()))
    await wait_until(lambda: sum("logger=zdproxy.access" in line for line in proxy.log_lines) == 2)
    access = [logfmt(line) for line in proxy.log_lines if "logger=zdproxy.access" in line]
    assert [(a["method"], a["target"], a["status"]) for a in access] == [
        ("GET", "/a", "200"),
        ("GET", "/status/503", "503"),
    ]
    assert access[0]["upstream"] == f"blue/{blue.address}" and access[0]["client"] == "127.0.0.1"
    assert int(access[0]["us"]) > 0
    assert [int(a["bytes"]) for a in access] == sizes
    assert access[0]["ua"].startswith("Python/") and "request_id" not in access[0]
    for line in proxy.log_lines:
        fields = logfmt(line)
        assert list(fields)[:4] == ["ts", "level", "logger", "msg"], line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["ts"])
    started = next(logfmt(line) for line in proxy.log_lines if 'msg="started:' in line)
    assert started["actor"] == "auto" and started["event"].isdigit()

    # Sampled: about half of 200 responses (the odds of leaving 60-140 are below 1e-8).
    sampled = zdproxy(
        {"pools": pools([blue.address]), "log": {"access": True, "access_sample": 0.5}}
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.get(sampled.url + "/") as resp:
                await resp.read()
    assert await sampled.reload(sampled.config)  # its log line comes after every access line
    lines = sum("logger=zdproxy.access" in line for line in sampled.log_lines)
    assert 60 <= lines <= 140, lines


async def test_under_journald_lines_carry_their_priority(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address])}, env={"JOURNAL_STREAM": "8:1234"})
    levels = Counter(line[:3] for line in proxy.log_lines)
    assert levels["<6>"] >= 2  # info: admin API, started, listening
    assert all(line[:3] in ("<7>", "<6>", "<4>", "<3>") for line in proxy.log_lines)
    assert not any(" ts=" in line or line[3:].startswith("ts=") for line in proxy.log_lines)


@pytest.mark.parametrize("text", ["plain", 'say "hi"', "a=b c", ""])
def test_logfmt_values_round_trip(text: str) -> None:
    from zdproxy.logs import _value

    assert logfmt(f"msg={_value(text)}") == {"msg": text}


# -- what a reload or restart must not do ---------------------------------------------


async def test_a_file_that_does_not_fit_the_runtime_changes_is_refused(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy({"pools": pools([blue.address], [green.address])})
    rule = {"name": "tenant", "header": "X-Tenant", "values": ["acme"], "to": "green"}
    await admin_api(proxy, "PUT", "/v1/rules", {"rules": [rule]})
    await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 10000})
    # Valid alone, but the preview header would now be the header the API's rule reads.
    assert not await proxy.reload({**proxy.config, "preview": {"header": "X-Tenant"}})
    refused = (await admin_api(proxy, "GET", "/v1/events?kind=reload_refused"))["events"][-1]
    assert "rules[0].header" in refused["reason"] or "pins[0].header" in refused["reason"]
    assert (await admin_api(proxy, "GET", "/v1/rules"))["rules"][0]["name"] == "tenant"
    assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == 10000


async def test_editing_a_health_setting_keeps_the_verdicts(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    checked = {"path": "/readyz", "interval": "100ms", "rise": 2}
    config = {
        "pools": {**pools([blue.address]), "blue": {"upstreams": [blue.address], "health": checked}}
    }
    # Started off the loop: the upstream on this loop must answer the first checks.
    proxy = await asyncio.get_running_loop().run_in_executor(None, zdproxy, config)
    before = await admin_api(proxy, "GET", "/v1/status")
    assert before["pools"]["blue"]["upstreams"][0]["health"] == "up"
    edited = {**checked, "interval": "150ms"}
    mark = len(proxy.log_lines)
    assert await proxy.reload(
        {
            **config,
            "pools": {**config["pools"], "blue": {"upstreams": [blue.address], "health": edited}},
        }
    )
    # The snapshot the reload published still routes to blue: the verdict survived the
    # edit (a fresh probe would start "not up" and take blue out until `rise` checks).
    published = [line for line in proxy.log_lines[mark:] if "routing: live=blue" in line]
    assert published and all("blue=1 " in line for line in published), published
    status = await admin_api(proxy, "GET", "/v1/status")
    assert status["pools"]["blue"]["upstreams"][0]["routable"] is True
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/") as resp:
        assert resp.status == 200
    kinds = [e["kind"] for e in (await admin_api(proxy, "GET", "/v1/events"))["events"]]
    assert "upstream_down" not in kinds


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ('say "hi"\\now', '"say \\"hi\\"\\\\now"'),
        ("line\nbreak\r\ttab", '"line\\nbreak\\r\\ttab"'),
        ("esc\x1b[31mred\x00", '"esc\\x1b[31mred\\x00"'),
        ("del\x7f c1\x85", '"del\\x7f c1\\x85"'),
        ("admin\u202egnp.exe", '"admin\\u202egnp.exe"'),
        ("isolate\u2066x\u2069", '"isolate\\u2066x\\u2069"'),
    ],
)
def test_log_values_never_carry_control_or_bidi_characters_raw(text: str, written: str) -> None:
    """A label or path from a client or a config file is logged escaped: no terminal
    escape, NUL or bidirectional override reaches whoever reads the log."""
    record = logging.LogRecord("zdproxy.test", logging.INFO, __file__, 1, "msg", None, None)
    record.fields = {"value": text}
    line = LogfmtFormatter(journald=True).format(record)
    assert line.endswith(f" value={written}")
