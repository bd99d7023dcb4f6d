"""Does anything answer at all? A bare connect, for refusing a deploy to nothing."""

from __future__ import annotations

import asyncio
import contextlib

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
        return f"cannot connect: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None
