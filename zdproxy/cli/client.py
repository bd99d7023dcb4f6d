"""The CLI's client of the admin API: where it is, the token, and one call.

The address and token come from `--config` (only its [admin] section is read,
so a deploy user needs no access to the rest), else from ZDPROXY_ADMIN and
ZDPROXY_TOKEN, else from /etc/zdproxy/zdproxy.toml when it exists, else the
default 127.0.0.1:9901 without a token.
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

DEFAULT_CONFIG = Path("/etc/zdproxy/zdproxy.toml")
USER_AGENT = f"zdproxy-cli/{__version__}"  # the admin API records such changes as actor "cli"


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
    def find(cls, config: str | None) -> Endpoint:
        if config is not None:
            return cls.from_config(Path(config))
        if "ZDPROXY_ADMIN" in os.environ or "ZDPROXY_TOKEN" in os.environ:
            try:
                address = Address.parse(os.environ.get("ZDPROXY_ADMIN", "127.0.0.1:9901"))
            except ValueError as exc:
                raise UsageError(f"ZDPROXY_ADMIN: {exc}") from None
            return cls(address, os.environ.get("ZDPROXY_TOKEN", ""))
        if DEFAULT_CONFIG.exists():
            return cls.from_config(DEFAULT_CONFIG)
        return cls(Address.parse("127.0.0.1:9901"), "")

    @classmethod
    def from_config(cls, path: Path) -> Endpoint:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"{path}: cannot read the file: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: not valid TOML: {exc}") from None
        section = data.get("admin", {})
        env_token = os.environ.get("ZDPROXY_ADMIN__TOKEN")
        if env_token:
            section = {**section, "token": env_token}
        try:
            admin = AdminSettings.model_validate(section)
        except ValidationError as exc:
            errors = "; ".join(f"admin.{e}" for e in format_validation_error(exc))
            raise UsageError(f"{path}: {errors}") from None
        token = admin.bearer_token.decode() or os.environ.get("ZDPROXY_TOKEN", "")
        return cls(admin.listen, token)


class AdminClient:
    def __init__(self, endpoint: Endpoint, timeout: float = 30.0) -> None:
        self.endpoint = endpoint
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
        reason = str(exc) or type(exc).__name__
        return Unreachable(
            f"no answer from zdproxy's admin API at {self.endpoint.address}: {reason}"
        )


def _detail(status: int, text: str) -> str:
    try:
        return str(json.loads(text)["detail"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {text.strip()[:200]}"
