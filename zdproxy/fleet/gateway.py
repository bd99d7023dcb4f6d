"""etcd's v3 JSON gateway over aiohttp: the calls, the endpoints, TLS, auth, the failures.

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
connection or its TLS handshake failed, or the member answered "no leader"); a write
whose answer was lost fails with StoreUnavailable, outcome unknown. Reads are retried
on any failure. Every call ends within `timeout` seconds, all endpoints included.

TLS: https endpoints are verified with the `ssl` context given (aiohttp's default, the
system's CAs, without one); the context also holds the client certificate when etcd
wants one. Auth: with a username, the gateway authenticates first
(/v3/auth/authenticate) and sends the token etcd gave as the `Authorization` header.
When etcd no longer takes it (a simple token expires after --auth-token-ttl idle, and
every token dies with a restart, a password change or a change of the auth store),
the gateway authenticates again, once for every call that had it refused, and repeats
the call once: a token refusal happens before the request is applied.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from ssl import SSLCertVerificationError, SSLContext, SSLError
from typing import Any

import aiohttp

from zdproxy.fleet.store import StoreError, StoreUnavailable

# gRPC status codes the gateway answers with (google.golang.org/grpc/codes).
GRPC_NOT_FOUND = 5
GRPC_PERMISSION_DENIED = 7
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16
NO_LEADER = "etcdserver: no leader"  # refused before it was proposed: not applied
PERMISSION_DENIED = "etcdserver: permission denied"
AUTH_NOT_ENABLED = "etcdserver: authentication is not enabled"
# etcd refuses the token (or its absence) before applying anything: authenticate again
# and repeat, as etcd's own client does (clientv3's shouldRefreshToken).
TOKEN_REFUSED = (
    "etcdserver: invalid auth token",  # expired, or dropped (restart, password change)
    "etcdserver: user name is empty",  # no token sent, and auth is on
    "etcdserver: revision of auth store is old",  # users or roles changed since
)
RETRY_PAUSE = 0.05  # seconds between rounds over the endpoints when none could answer
# A watch message holds whole revisions (up to etcd's --max-request-bytes, 1.5 MiB by
# default, as base64): aiohttp's line limit is twice its read buffer.
READ_BUFFER = 4 * 1024 * 1024
HEADERS = {"Grpc-Metadata-hasleader": "true"}
_SSL_TEXT = re.compile(r"\] (.+?)(?: \(_ssl\.c:\d+\))?$")  # "[SSL: X] text (_ssl.c:1)"

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


class AuthFailed(RequestFailed):
    """etcd refused this client's credentials (a wrong user or password), or wants
    credentials and was given none. Trying again does not help: fix the config."""


NOT_TRIED = "no endpoint tried"


class _Unreached(Exception):
    """This endpoint did not take the request: the call may go to the next one.
    `timed_out`: it had no answer in the time left (a reason saying less than one
    that came before it: a slow machine's last try of a refused handshake)."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


def _tls_failure(error: BaseException) -> SSLError | None:
    """The TLS error behind an aiohttp error, if that is what it is: the handshake
    failed (this client did not trust etcd, or etcd refused this client), so etcd
    never read the request."""
    # The cause first: aiohttp's own ClientConnector*Error classes are SSLErrors too.
    for cause in (getattr(error, "os_error", None), error.__cause__, error):
        if isinstance(cause, SSLError):
            return cause
    return None


def _describe_tls(error: SSLError) -> str:
    if isinstance(error, SSLCertVerificationError):
        return f"TLS: etcd's certificate is not trusted: {error.verify_message}"
    found = _SSL_TEXT.search(str(error.strerror or error))
    text = found.group(1) if found else str(error)
    if "ALERT" in (error.reason or "") and "CERTIFICATE" in (error.reason or ""):
        return f"TLS: etcd refused this client's certificate, or its lack of one ({text})"
    return f"TLS: {text}"


class Gateway:
    """JSON calls to one etcd cluster through its members' client URLs, over TLS with
    `ssl` (https endpoints), as etcd user `username` when one is given."""

    def __init__(
        self,
        endpoints: Sequence[str],
        timeout: float,
        *,
        ssl: SSLContext | None = None,
        username: str = "",
        password: str = "",
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = [url.rstrip("/") for url in endpoints]
        self.timeout = timeout
        self._ssl = ssl
        self._current = 0  # the endpoint that answered last
        self._session: aiohttp.ClientSession | None = None
        self._username = username
        self._password = password
        # The token sent: None until authenticated (or without a username), "" while
        # etcd has auth off (a token is then asked for when etcd wants one).
        self._token: str | None = None
        self._authenticating = asyncio.Lock()

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running event loop.
        if self._session is None:
            connector = None if self._ssl is None else aiohttp.TCPConnector(ssl=self._ssl)
            self._session = aiohttp.ClientSession(
                headers=HEADERS,
                read_bufsize=READ_BUFFER,
                raise_for_status=False,
                connector=connector,
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
        gateway's timeout by default); RequestFailed when etcd refused the request,
        AuthFailed when it refused the credentials."""
        deadline = time.monotonic() + (self.timeout if within is None else within)
        token = await self._token_for(deadline)
        try:
            return await self._round(path, body, idempotent, deadline, token)
        except RequestFailed as failed:
            if failed.message not in TOKEN_REFUSED:
                raise
            token = await self._renew(token, failed, deadline)
        try:
            return await self._round(path, body, idempotent, deadline, token)
        except RequestFailed as failed:
            if failed.message in TOKEN_REFUSED:  # even the token just given
                raise AuthFailed(failed.code, self._as_user(failed.message)) from failed
            raise

    async def _round(
        self, path: str, body: Message, idempotent: bool, deadline: float, token: str | None
    ) -> Message:
        """The call over the endpoints, in turn, until one answers or `deadline`."""
        reason = NOT_TRIED
        while True:
            for endpoint in self._rotation():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(f"etcd: {reason}")
                try:
                    answer = await self._post(endpoint, path, body, left, idempotent, token)
                except _Unreached as unreached:
                    if not unreached.timed_out or reason == NOT_TRIED:
                        reason = f"{endpoint}: {unreached}"
                    self.demote(endpoint)
                    continue
                self._promote(endpoint)
                return answer
            await asyncio.sleep(min(RETRY_PAUSE, max(0.0, deadline - time.monotonic())))

    async def _post(
        self,
        endpoint: str,
        path: str,
        body: Message,
        left: float,
        idempotent: bool,
        token: str | None,
    ) -> Message:
        try:
            async with self._http().post(
                endpoint + path,
                json=body,
                headers=_authorization(token),
                timeout=aiohttp.ClientTimeout(total=left),
            ) as response:
                message: Message = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as error:
            if tls := _tls_failure(error):  # the handshake failed: nothing was read
                raise _Unreached(_describe_tls(tls)) from error
            if isinstance(error, aiohttp.ClientConnectorError):  # not connected
                raise _Unreached(str(error.os_error)) from error
            timed_out = isinstance(error, TimeoutError)
            what = type(error).__name__ if timed_out else str(error)
            if idempotent:
                raise _Unreached(what, timed_out=timed_out) from error
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
        `timeout`; then its messages for as long as the caller reads them. etcd
        refuses a stream in its first message: pass its reason to `refused`."""
        deadline = time.monotonic() + self.timeout
        token = await self._token_for(deadline)
        reason = NOT_TRIED
        while time.monotonic() < deadline:
            for endpoint in self._rotation():
                # Bounded until the answer's headers; its body (the stream) may idle.
                unbounded = aiohttp.ClientTimeout(total=None)
                try:
                    async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                        response = await self._http().post(
                            endpoint + path,
                            json=body,
                            headers=_authorization(token),
                            timeout=unbounded,
                        )
                except (TimeoutError, aiohttp.ClientError) as error:
                    tls = _tls_failure(error)
                    failure = _describe_tls(tls) if tls else str(error) or type(error).__name__
                    reason = f"{endpoint}: {failure}"
                    self.demote(endpoint)
                    continue
                self._promote(endpoint)
                async with response:
                    yield Stream(endpoint, response, token)
                return
            await asyncio.sleep(min(RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
        raise StoreUnavailable(f"etcd: {reason}")

    async def refused(self, stream: Stream, reason: str) -> None:
        """etcd refused `stream`'s call with `reason` (a watch's cancel_reason, e.g.
        "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token").
        Returns when opening the stream again may work (after a new token when etcd
        refused the one sent); RequestFailed when it will not (permission denied)."""
        if PERMISSION_DENIED in reason:
            raise RequestFailed(GRPC_PERMISSION_DENIED, self._as_user(PERMISSION_DENIED))
        for refusal in TOKEN_REFUSED:
            if refusal in reason:
                failed = RequestFailed(GRPC_UNAUTHENTICATED, refusal)
                await self._renew(stream.token, failed, time.monotonic() + self.timeout)
                return

    async def _token_for(self, deadline: float) -> str | None:
        """The token to send: authenticates on first use."""
        if not self._username or self._token is not None:
            return self._token
        return await self._renew(None, None, deadline)

    async def _renew(
        self, refused: str | None, failed: RequestFailed | None, deadline: float
    ) -> str | None:
        """A token etcd takes, `refused` being the one it refused (`failed`): a new
        one, asked for once however many calls had `refused` refused at the same time."""
        if failed is not None and not self._username:
            wants = f"{failed.message}: etcd has authentication on, and no username was given"
            raise AuthFailed(failed.code, wants) from failed
        try:  # bounded: the call holding the lock may take until its own deadline
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._authenticating.acquire()
        except TimeoutError:
            late = f"etcd: user {self._username!r} not authenticated in time"
            raise StoreUnavailable(late) from None
        try:
            if self._token == refused:  # not renewed by another call meanwhile
                self._token = await self._authenticate(deadline)
            return self._token
        finally:
            self._authenticating.release()

    async def _authenticate(self, deadline: float) -> str:
        """A new token for the user; "" when etcd has auth off."""
        credentials = {"name": self._username, "password": self._password}
        try:
            answer = await self._round(
                "/v3/auth/authenticate", credentials, True, deadline, token=None
            )
        except RequestFailed as failed:
            if failed.message == AUTH_NOT_ENABLED:
                return ""  # as etcd's client does: the user is ready for when it is on
            raise AuthFailed(failed.code, self._as_user(failed.message)) from failed
        return str(answer["token"])

    def _as_user(self, text: str) -> str:
        return f"etcd user {self._username!r}: {text}" if self._username else text

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _authorization(token: str | None) -> dict[str, str] | None:
    """etcd's gateway takes the token as is, no "Bearer"."""
    return {"Authorization": token} if token else None


class Stream:
    """The messages of one streaming call, from `endpoint`, opened with `token`.
    Iteration ends when the member ends the stream or the connection is lost."""

    def __init__(self, endpoint: str, response: aiohttp.ClientResponse, token: str | None) -> None:
        self.endpoint = endpoint
        self.token = token
        self._response = response

    async def __aiter__(self) -> AsyncIterator[Message]:
        try:
            async for line in self._response.content:
                if line.strip():
                    yield json.loads(line)
        except (aiohttp.ClientError, ValueError):
            return
