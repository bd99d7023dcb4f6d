"""The CLI's client of the admin API: where it is, the token, and one call.

Each of the two is taken from the first of these that gives it:

- address: `--admin`, ZDPROXY_ADMIN_URL, the config file's `admin.listen`,
  127.0.0.1:9901;
- token: ZDPROXY_ADMIN__TOKEN (the daemon's own variable), ZDPROXY_TOKEN (its older
  name), the config file's `admin.token_file`, none.

The config file is `--config`, else /etc/zdproxy/zdproxy.toml when it exists, and is
read only when a flag or variable leaves something to find; only its [admin] section
is read, so a deploy user needs no access to the rest.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import ValidationError

from zdproxy import __version__
from zdproxy.config.loader import format_validation_error
from zdproxy.config.service import AdminSettings
from zdproxy.config.units import Address
from zdproxy.control.probe import failure_text, os_error_text

DEFAULT_CONFIG = Path("/etc/zdproxy/zdproxy.toml")
DEFAULT_ADDRESS = "127.0.0.1:9901"
USER_AGENT = f"zdproxy-cli/{__version__}"  # the admin API records such changes as actor "cli"
ADDRESS_VARIABLE = "ZDPROXY_ADMIN_URL"
TOKEN_VARIABLES = ("ZDPROXY_ADMIN__TOKEN", "ZDPROXY_TOKEN")
# The admin address's variable before ZDPROXY_ADMIN_URL: pydantic-settings reads it as
# the daemon's whole [admin] section, so `zdproxy run` and `check` failed with it set.
RETIRED_ADDRESS_VARIABLE = "ZDPROXY_ADMIN"
HINT = "is zdproxy running? see `systemctl status zdproxy`"


class UsageError(Exception):
    """The CLI cannot even try: a bad argument or config (exit 2)."""


class Unreachable(Exception):
    """zdproxy's admin API did not answer (exit 3)."""


class ApiRefused(Exception):
    """The admin API answered with an error (exit 1); the message is its problem detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


@dataclass(frozen=True)
class Endpoint:
    address: Address
    token: str

    @classmethod
    def find(cls, config: str | None, admin: str | None) -> Endpoint:
        """The admin API's address and token, by the rules of the module docstring."""
        if RETIRED_ADDRESS_VARIABLE in os.environ:
            raise UsageError(
                f"{RETIRED_ADDRESS_VARIABLE} is no longer read (zdproxy run and check take "
                f"it for their whole [admin] section): set {ADDRESS_VARIABLE} instead"
            )
        address_text, source = admin, "--admin"
        if address_text is None and ADDRESS_VARIABLE in os.environ:
            address_text, source = os.environ[ADDRESS_VARIABLE], ADDRESS_VARIABLE
        token = next((os.environ[v] for v in TOKEN_VARIABLES if os.environ.get(v)), None)
        if address_text is not None and token is not None:
            return cls(_address(address_text, source), token)
        path = Path(config) if config is not None else DEFAULT_CONFIG
        if config is None and not path.exists():
            section = AdminSettings()
        else:
            section = _admin_section(path, token)
        return cls(
            section.listen if address_text is None else _address(address_text, source),
            section.bearer_token.decode() if token is None else token,
        )

    @property
    def url(self) -> str:
        return f"unix:{self.address.path}" if self.address.path else f"http://{self.address}"


def _address(text: str, source: str) -> Address:
    """`http://HOST:PORT`, `HOST:PORT` or `unix:/PATH`: the admin API speaks plain HTTP."""
    bare = text.strip().removeprefix("http://").rstrip("/")
    if "://" in bare:
        raise UsageError(f"{source}: {text!r}: the admin API speaks plain HTTP (http://...)")
    try:
        return Address.parse(bare)
    except ValueError as exc:
        raise UsageError(
            f"{source}: {exc} (expected http://HOST:PORT, HOST:PORT or unix:/PATH)"
        ) from None


def _admin_section(path: Path, token: str | None) -> AdminSettings:
    """The file's [admin] section; `token` (from the environment) replaces its token_file,
    which the deploy user then need not be able to read."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(
            f"{path}: cannot read the file: {exc.strerror} (or set {ADDRESS_VARIABLE} "
            f"and {TOKEN_VARIABLES[0]})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    section = data.get("admin", {})
    if token is not None and isinstance(section, dict):
        section = {**section, "token": token, "token_file": ""}
    try:
        return AdminSettings.model_validate(section)
    except ValidationError as exc:
        errors = "; ".join(f"admin.{e}" for e in format_validation_error(exc))
        raise UsageError(f"{path}: {errors}") from None


class AdminClient:
    def __init__(self, endpoint: Endpoint, timeout: float = 30.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        address = endpoint.address
        if address.path is not None:
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=address.path)
            self.base = "http://zdproxy"
        else:
            connector = aiohttp.TCPConnector()
            self.base = f"http://{address}"
        headers = {"User-Agent": USER_AGENT}
        if endpoint.token:
            headers["Authorization"] = f"Bearer {endpoint.token}"
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=5),
        )

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The JSON answer; ApiRefused for an error answer, Unreachable without one."""
        try:
            async with self.session.request(method, self.base + path, json=body) as response:
                text = await response.text()
                if response.status >= 400:
                    raise ApiRefused(response.status, _detail(response.status, text))
                return json.loads(text) if text else None
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc

    async def stream(self, path: str, last_id: int = 0) -> AsyncIterator[dict[str, Any]]:
        """Server-sent events of `path`, decoded, until the server ends the stream;
        `last_id` resumes after that event (Last-Event-ID)."""
        headers = {"Last-Event-ID": str(last_id)} if last_id else {}
        try:
            async with self.session.get(
                self.base + path,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            ) as response:
                if response.status >= 400:
                    raise ApiRefused(
                        response.status, _detail(response.status, await response.text())
                    )
                async for raw in response.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("data: "):
                        yield json.loads(line[len("data: ") :])
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: Exception) -> Unreachable:
        if isinstance(exc, aiohttp.ClientConnectorError):
            reason = os_error_text(exc.os_error)  # "connection refused"
        elif isinstance(exc, TimeoutError):
            reason = f"no answer within {self.timeout:g}s"
        else:
            reason = failure_text(exc)
        return Unreachable(
            f"cannot reach zdproxy's admin API at {self.endpoint.url}: {reason} ({HINT})"
        )


def _detail(status: int, text: str) -> str:
    try:
        return str(json.loads(text)["detail"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {text.strip()[:200]}"
