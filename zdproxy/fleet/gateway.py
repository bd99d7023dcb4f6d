"""etcd's v3 JSON gateway over aiohttp: the calls, the endpoints, the failures.

Every etcd member serves its gRPC API as JSON over HTTP/1.1 on its client URL, under
/v3/ (etcd >= 3.4): a call is a POST of the request message, the answer is the reply
message (int64 fields as strings, bytes as base64); a streaming call (watch) answers
one JSON message a line. aiohttp, already zdproxy's HTTP client, is the whole client:
no gRPC, no protobuf. docs/fleet.md has the measurements behind this choice.

The endpoints are tried in turn: a call goes to the endpoint that answered last, and
moves on to the next when it cannot be reached or says it has no leader. Each request
carries gRPC metadata `hasleader` (as the `Grpc-Metadata-hasleader` header), as etcd's
own client sends it: a member that has lost its leader then fails the call at once
("no leader") and ends its watches, instead of holding them until a timeout.

A write is sent again to another endpoint only when it surely was not applied (the
connection was refused, or the member answered "no leader"); a write whose answer was
lost fails with StoreUnavailable, outcome unknown. Reads are retried on any failure.
Every call ends within `timeout` seconds, all endpoints included.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from zdproxy.fleet.store import StoreError, StoreUnavailable

# gRPC status codes the gateway answers with (google.golang.org/grpc/codes).
GRPC_NOT_FOUND = 5
GRPC_UNAVAILABLE = 14
NO_LEADER = "etcdserver: no leader"  # refused before it was proposed: not applied
RETRY_PAUSE = 0.05  # seconds between rounds over the endpoints when none could answer
# A watch message holds whole revisions (up to etcd's --max-request-bytes, 1.5 MiB by
# default, as base64): aiohttp's line limit is twice its read buffer.
READ_BUFFER = 4 * 1024 * 1024
HEADERS = {"Grpc-Metadata-hasleader": "true"}

Message = dict[str, Any]


def error_of(message: Message) -> tuple[int, str]:
    """The gRPC code and message of an error answer. A unary call's error is flat
    ({"error", "code", "message"}); a streaming call's (keepalive, watch) is nested
    ({"error": {"grpc_code", "message", ...}})."""
    error = message["error"]
    if isinstance(error, dict):
        return int(error.get("grpc_code", 0)), str(error.get("message", ""))
    return int(message.get("code", 0)), str(message.get("message", error))


class RequestFailed(StoreError):
    """etcd refused the request (not an availability problem): its gRPC code and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (gRPC code {code})")
        self.code = code
        self.message = message


class _Unreached(Exception):
    """This endpoint did not take the request: the call may go to the next one."""


class Gateway:
    """JSON calls to one etcd cluster through its members' client URLs."""

    def __init__(self, endpoints: Sequence[str], timeout: float) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = [url.rstrip("/") for url in endpoints]
        self.timeout = timeout
        self._current = 0  # the endpoint that answered last
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=HEADERS, read_bufsize=READ_BUFFER, raise_for_status=False
            )
        return self._session

    def _rotation(self) -> list[str]:
        """The endpoints from the current one on."""
        n = len(self.endpoints)
        return [self.endpoints[(self._current + i) % n] for i in range(n)]

    def demote(self, endpoint: str) -> None:
        """The next call starts with the endpoint after `endpoint`."""
        if endpoint in self.endpoints and self.endpoints[self._current] == endpoint:
            self._current = (self._current + 1) % len(self.endpoints)

    def _promote(self, endpoint: str) -> None:
        self._current = self.endpoints.index(endpoint)

    async def call(
        self, path: str, body: Message, *, idempotent: bool, within: float | None = None
    ) -> Message:
        """POST `body` to `path` (e.g. "/v3/kv/range") and return the reply message.
        StoreUnavailable when no endpoint answered within `within` seconds (the
        gateway's timeout by default); RequestFailed when etcd refused the request."""
        deadline = time.monotonic() + (self.timeout if within is None else within)
        reason = "no endpoint tried"
        while True:
            for endpoint in self._rotation():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(f"etcd: {reason}")
                try:
                    answer = await self._post(endpoint, path, body, left, idempotent)
                except _Unreached as unreached:
                    reason = f"{endpoint}: {unreached}"
                    self.demote(endpoint)
                    continue
                self._promote(endpoint)
                return answer
            await asyncio.sleep(min(RETRY_PAUSE, max(0.0, deadline - time.monotonic())))

    async def _post(
        self, endpoint: str, path: str, body: Message, left: float, idempotent: bool
    ) -> Message:
        try:
            async with self._http().post(
                endpoint + path, json=body, timeout=aiohttp.ClientTimeout(total=left)
            ) as response:
                message: Message = await response.json(content_type=None)
        except aiohttp.ClientConnectorError as error:  # not connected: nothing was sent
            raise _Unreached(str(error.os_error)) from error
        except (TimeoutError, aiohttp.ClientError, ValueError) as error:
            what = type(error).__name__ if isinstance(error, TimeoutError) else str(error)
            if idempotent:
                raise _Unreached(what) from error
            raise StoreUnavailable(f"etcd {endpoint}: {what} (the write may be applied)") from error
        if "error" not in message:
            return message
        code, text = error_of(message)
        if code == GRPC_UNAVAILABLE and (idempotent or text == NO_LEADER):
            raise _Unreached(text)
        if code == GRPC_UNAVAILABLE:
            raise StoreUnavailable(f"etcd {endpoint}: {text} (the write may be applied)")
        raise RequestFailed(code, text)

    @asynccontextmanager
    async def stream(self, path: str, body: Message) -> AsyncIterator[Stream]:
        """A streaming call (watch): the first endpoint that takes it, in turn, within
        `timeout`; then its messages for as long as the caller reads them."""
        deadline = time.monotonic() + self.timeout
        reason = "no endpoint tried"
        while time.monotonic() < deadline:
            for endpoint in self._rotation():
                # Bounded until the answer's headers; its body (the stream) may idle.
                unbounded = aiohttp.ClientTimeout(total=None)
                try:
                    async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                        response = await self._http().post(
                            endpoint + path, json=body, timeout=unbounded
                        )
                except (TimeoutError, aiohttp.ClientError) as error:
                    reason = f"{endpoint}: {error or type(error).__name__}"
                    self.demote(endpoint)
                    continue
                self._promote(endpoint)
                async with response:
                    yield Stream(endpoint, response)
                return
            await asyncio.sleep(min(RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
        raise StoreUnavailable(f"etcd: {reason}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Stream:
    """The messages of one streaming call, from `endpoint`. Iteration ends when the
    member ends the stream or the connection is lost."""

    def __init__(self, endpoint: str, response: aiohttp.ClientResponse) -> None:
        self.endpoint = endpoint
        self._response = response

    async def __aiter__(self) -> AsyncIterator[Message]:
        try:
            async for line in self._response.content:
                if line.strip():
                    yield json.loads(line)
        except (aiohttp.ClientError, ValueError):
            return
