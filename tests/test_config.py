"""Configuration: value parsers, `zdproxy check`, `zdproxy run` on bad input, env overrides."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Upstream, ZdProxy, free_port, pools, to_toml
from zdproxy.config.units import Address, parse_duration, parse_size

REPO = Path(__file__).resolve().parent.parent
UNUSED = "127.0.0.1:9"  # an upstream address for files that are only checked, never run
EXAMPLE_CONFIG = REPO / "config" / "zdproxy.toml"


# -- helpers ---------------------------------------------------------------------------


def clean_env(**overrides: str) -> dict[str, str]:
    """The test runner's environment without any ZDPROXY_ variable, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZDPROXY_")}
    env.update(overrides)
    return env


def zdproxy_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 15
) -> subprocess.CompletedProcess[str]:
    """Run `python -m zdproxy ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "zdproxy", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        timeout=timeout,
        check=False,
    )


def write_config(tmp_path: Path, text: str, name: str = "zdproxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


async def get_json(url: str, **session_options: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession(**session_options) as session, session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


# A file with five independent mistakes: each must be reported with its field path.
MANY_ERRORS = """\
[proxy]
listen = "localhost"
idle_timeot = "5s"
header_timeout = "5 parsecs"

[pools.blue]
upstreams = ["127.0.0.1:9001", "127.0.0.1:9001"]

[split]
candidate_weight = 20000
"""


# -- value parsers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("30d", 30 * 86400.0),
        ("1.5s", 1.5),
        (" 10 s ", 10.0),
        ("7", 7.0),
        (5, 5.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("5 parsecs", "invalid duration"),
        ("1w", "invalid duration"),
        ("ms", "invalid duration"),
        ("", "invalid duration"),
        ("-1s", "invalid duration"),
        (-1, "cannot be negative"),
        (True, "expected a duration"),
        (None, "invalid duration"),
    ],
)
def test_parse_duration_refuses(value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16KiB", 16 * 1024),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("1KB", 1000),
        ("1GB", 1000**3),
        ("512B", 512),
        ("2 MiB", 2 * 1024**2),
        ("4096", 4096),
        (1048576, 1048576),
        (0, 0),
    ],
)
def test_parse_size_accepts(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1.5MiB", "invalid size"),
        ("10 furlongs", "invalid size"),
        ("MiB", "invalid size"),
        ("", "invalid size"),
        (1.5, "invalid size"),
        (-1, "cannot be negative"),
        (False, "expected a size"),
    ],
)
def test_parse_size_refuses(value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_size(value)


@pytest.mark.parametrize(
    ("text", "host", "port", "path"),
    [
        ("127.0.0.1:9001", "127.0.0.1", 9001, None),
        ("localhost:80", "localhost", 80, None),
        ("app.internal:65535", "app.internal", 65535, None),
        ("0.0.0.0:0", "0.0.0.0", 0, None),
        ("[::1]:9001", "::1", 9001, None),
        ("[fe80::1%eth0]:9001", "fe80::1%eth0", 9001, None),
        ("unix:/run/app.sock", None, 0, "/run/app.sock"),
    ],
)
def test_address_parse_accepts(text: str, host: str | None, port: int, path: str | None) -> None:
    address = Address.parse(text)
    assert (address.host, address.port, address.path) == (host, port, path)
    assert address.is_unix is (path is not None)
    # The canonical spelling parses back to the same address.
    assert str(address) == text
    assert Address.parse(str(address)) == address


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("unix:run/app.sock", "must be absolute"),
        ("unix:", "must be absolute"),
        ("127.0.0.1:65536", "port must be 0-65535"),
        ("127.0.0.1:-1", "port must be 0-65535"),
        ("127.0.0.1:http", "port must be 0-65535"),
        ("127.0.0.1:", "port must be 0-65535"),
        ("[::1]:70000", "port must be 0-65535"),
        ("localhost", "expected host:port"),
        (":9001", "expected host:port"),
        ("::1:9001", r"write IPv6 hosts as \[::1\]:port"),
        ("[::1]9001", r"expected \[ipv6\]:port"),
        ("[not-v6]:9001", "is not IPv6"),
        ("", "expected an address"),
    ],
)
def test_address_parse_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Address.parse(text)


def test_address_loopback() -> None:
    assert Address.parse("127.0.0.1:1").is_loopback
    assert Address.parse("[::1]:1").is_loopback
    assert Address.parse("localhost:1").is_loopback
    assert Address.parse("unix:/tmp/x.sock").is_loopback
    assert not Address.parse("0.0.0.0:1").is_loopback
    assert not Address.parse("192.0.2.1:1").is_loopback


# -- zdproxy check -----------------------------------------------------------------------


def test_check_valid_file(tmp_path: Path) -> None:
    config = {
        "proxy": {"listen": "127.0.0.1:8080", "header_timeout": "5s", "max_header_bytes": "32KiB"},
        "upstream": {"connect_timeout": "500ms"},
        "pools": {
            "blue": {"upstreams": ["127.0.0.1:9001", "[::1]:9002"], "version": "v1"},
            "green": {"upstreams": [{"address": "unix:/run/green.sock", "weight": 3}]},
        },
        "split": {"live": "blue", "candidate_weight": 500},
    }
    path = write_config(tmp_path, to_toml(config))
    result = zdproxy_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok"
    assert result.stderr == ""


def test_check_reports_every_error_with_its_field(tmp_path: Path) -> None:
    path = write_config(tmp_path, MANY_ERRORS)
    result = zdproxy_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert "ok" not in result.stdout
    err = result.stderr
    assert f"{path}: invalid configuration" in err
    expected = [
        "proxy.listen: invalid address 'localhost'",
        "proxy.idle_timeot: unknown option",
        "proxy.header_timeout: invalid duration '5 parsecs'",
        "split.candidate_weight: ",
        "pools.blue.upstreams: 127.0.0.1:9001 is listed twice",
    ]
    for line in expected:
        assert line in err, f"{line!r} missing from:\n{err}"
    assert "10000" in err  # the bound candidate_weight broke
    # One line per problem, no traceback.
    assert "Traceback" not in err
    problem_lines = [ln for ln in err.splitlines() if ln.startswith("  ")]
    assert len(problem_lines) == len(expected), err


def test_check_listener_that_is_also_an_upstream(tmp_path: Path) -> None:
    config = {"proxy": {"listen": "127.0.0.1:9001"}, "pools": pools(["127.0.0.1:9001"])}
    result = zdproxy_cli("check", "--config", str(write_config(tmp_path, to_toml(config))))
    assert result.returncode == 2
    assert "pools.blue: 127.0.0.1:9001 is zdproxy's own listener" in result.stderr


@pytest.mark.parametrize(
    ("admin", "env", "message"),
    [
        ({"listen": "0.0.0.0:9901"}, {}, "admin.listen: 0.0.0.0:9901 is not loopback"),
        ({"listen": "127.0.0.1:9901"}, {"ZDPROXY_ADMIN__TOKEN": "short"}, "at least 16 bytes"),
        ({"token_file": "/nonexistent/token"}, {}, "admin: cannot read /nonexistent/token"),
    ],
)
def test_check_refuses_an_unsafe_admin_listener(
    tmp_path: Path, admin: dict[str, str], env: dict[str, str], message: str
) -> None:
    path = write_config(tmp_path, to_toml({"admin": admin}))
    result = zdproxy_cli("check", "--config", str(path), env=clean_env(**env))
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_check_accepts_a_public_admin_listener_with_a_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    admin = {"listen": "0.0.0.0:9901", "token_file": str(token)}
    path = write_config(tmp_path, to_toml({"admin": admin, "pools": pools([UNUSED])}))
    result = zdproxy_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr


def test_check_invalid_toml(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[proxy]\nlisten = "127.0.0.1:8080\n')
    result = zdproxy_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert f"{path}: invalid configuration" in result.stderr
    assert "not valid TOML" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    result = zdproxy_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "cannot read the file" in result.stderr
    assert "Traceback" not in result.stderr


def test_example_config_passes_check() -> None:
    assert EXAMPLE_CONFIG.is_file(), f"{EXAMPLE_CONFIG} is missing"
    result = zdproxy_cli("check", "--config", str(EXAMPLE_CONFIG))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": ok")


# -- zdproxy run on an invalid file --------------------------------------------------------


def test_run_refuses_invalid_file_and_does_not_listen(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, MANY_ERRORS.replace('"localhost"', f'"127.0.0.1:{port}"'))
    checked = zdproxy_cli("check", "--config", str(path))
    ran = zdproxy_cli("run", "--config", str(path))
    assert ran.returncode == 2
    assert checked.returncode == 2
    assert ran.stderr == checked.stderr  # the same message, every error named
    assert "proxy.idle_timeot: unknown option" in ran.stderr
    assert "listening on" not in ran.stderr
    assert refuses_connections(port)


def test_run_refuses_invalid_toml(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[proxy\n")
    ran = zdproxy_cli("run", "--config", str(path))
    assert ran.returncode == 2
    assert "not valid TOML" in ran.stderr
    assert "listening on" not in ran.stderr


# -- environment overrides ---------------------------------------------------------------


async def test_env_candidate_weight_overrides_file(
    zdproxy: Callable[..., ZdProxy], upstream: Callable[..., Any]
) -> None:
    blue: Upstream = await upstream("blue")
    green: Upstream = await upstream("green")
    config = {
        "pools": pools([blue.address], [green.address]),
        "split": {"live": "blue", "candidate_weight": 0},
    }
    plain = zdproxy(config, env=clean_env())
    assert (await get_json(plain.url + "/"))["name"] == "blue"

    overridden = zdproxy(config, env=clean_env(ZDPROXY_SPLIT__CANDIDATE_WEIGHT="10000"))
    names = {(await get_json(overridden.url + f"/{i}"))["name"] for i in range(10)}
    assert names == {"green"}


async def test_env_listen_overrides_file(
    zdproxy: Callable[..., ZdProxy], upstream: Callable[..., Any]
) -> None:
    blue: Upstream = await upstream("blue")
    port = free_port()
    proxy = zdproxy(
        {"pools": pools([blue.address])},
        env=clean_env(ZDPROXY_PROXY__LISTEN=f"127.0.0.1:{port}"),
    )
    assert "127.0.0.1:0" in proxy.config_path.read_text()  # the file says otherwise
    assert proxy.address == f"127.0.0.1:{port}"
    assert (await get_json(f"http://127.0.0.1:{port}/env"))["path"] == "/env"


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("ZDPROXY_SPLIT__CANDIDATE_WEIGHT", "lots", "Input should be a valid integer"),
        ("ZDPROXY_SPLIT__CANDIDATE_WEIGHT", "10001", "Input should be less than or equal to 10000"),
        ("ZDPROXY_PROXY__LISTEN", "nowhere", "invalid address 'nowhere'"),
        ("ZDPROXY_PROXY__IDLE_TIMEOUT", "soon", "invalid duration 'soon'"),
    ],
)
def test_env_override_with_invalid_value_is_refused(
    tmp_path: Path, name: str, value: str, error: str
) -> None:
    path = write_config(tmp_path, to_toml({"pools": pools([UNUSED])}))  # valid on its own
    checked = zdproxy_cli("check", "--config", str(path), env=clean_env(**{name: value}))
    assert checked.returncode == 2
    # The variable is at fault, not the file: its name leads the line.
    field = name.removeprefix("ZDPROXY_").lower().replace("__", ".")
    assert f"{name}: {error}" in checked.stderr, checked.stderr
    assert f"(from the environment, for {field})" in checked.stderr
    assert str(path) not in checked.stderr
    assert "Traceback" not in checked.stderr


def test_run_refuses_invalid_env_override_and_does_not_listen(tmp_path: Path) -> None:
    port = free_port()
    config = {"proxy": {"listen": f"127.0.0.1:{port}"}, "pools": pools([UNUSED])}
    path = write_config(tmp_path, to_toml(config))
    assert zdproxy_cli("check", "--config", str(path)).returncode == 0

    env = clean_env(ZDPROXY_SPLIT__CANDIDATE_WEIGHT="20000")
    ran = zdproxy_cli("run", "--config", str(path), env=env)
    assert ran.returncode == 2
    assert "ZDPROXY_SPLIT__CANDIDATE_WEIGHT: " in ran.stderr
    assert "listening on" not in ran.stderr
    assert refuses_connections(port)
