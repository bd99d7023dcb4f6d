"""Does anything answer at all? A bare connect, for refusing a deploy to nothing; and
why a connection or an exchange failed, in words (health checks, the CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import aiohttp

from zdproxy.config.units import Address
from zdproxy.routing.local import local_error_kind

CONNECT_TIMEOUT = 1.0


async def answering(addresses: list[Address], within: float = CONNECT_TIMEOUT) -> int:
    """How many of `addresses` accept a connection within `within` seconds (all at once).
    Raises a local resource error instead of counting it (see connect_failure)."""
    failures = await asyncio.gather(*(connect_failure(a, within) for a in addresses))
    return failures.count(None)


async def connect_failure(address: Address, within: float) -> str | None:
    """Why `address` accepts no connection within `within` seconds, or None if it does
    (also the default health check, control/health.py). A local resource error
    (routing/local.py) is raised: it says nothing about the address."""
    try:
        async with asyncio.timeout(within):
            if address.path is not None:
                _, writer = await asyncio.open_unix_connection(address.path)
            else:
                _, writer = await asyncio.open_connection(address.host, address.port)
    except TimeoutError:
        return f"no connection within {within:g}s"
    except OSError as exc:
        if local_error_kind(exc) is not None:
            raise
        return f"cannot connect: {os_error_text(exc)}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


def os_error_text(exc: OSError) -> str:
    """An OSError as a person reads it: "connection refused", not asyncio's
    "[Errno 111] Connect call failed ('127.0.0.1', 9001)"."""
    if isinstance(exc, socket.gaierror):  # its errno is no errno: EAI_NONAME is -2
        return f"cannot resolve the host: {exc.strerror}"
    if exc.errno and exc.errno > 0:
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return exc.strerror or str(exc) or type(exc).__name__


def failure_text(exc: Exception) -> str:
    """Why an HTTP exchange failed, in words (the health checks' reasons, the CLI's
    errors): "cannot connect: connection refused", never a library's class name."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {os_error_text(exc.os_error)}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection closed before the answer"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer broke off"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status}"
    if isinstance(exc, OSError):
        return os_error_text(exc)
    return str(exc) or type(exc).__name__
