"""The admin API's frame: a route table, bearer-token checks, request parsing and
problem+json errors. The listener that serves it is admin/listener.py.

Handlers (admin/handlers.py) receive a validated `Call` and return a response
model; everything about HTTP — parsing, auth, errors, the OpenAPI document — is
here, driven by the same `Route` entries, so documentation and behaviour cannot
drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, NoReturn

from aiohttp import web
from pydantic import BaseModel, ValidationError

from zdproxy.admin.dashboard import add_dashboard, load_assets
from zdproxy.admin.inputs import json_problem, printable, too_deep
from zdproxy.admin.models import FieldError, Problem
from zdproxy.config.loader import format_validation_error
from zdproxy.control.desired import Refused
from zdproxy.control.events import Actor

log = logging.getLogger("zdproxy.admin")

CLI_AGENT = "zdproxy-cli/"  # the CLI's User-Agent prefix: its changes are actor "cli"
PROBLEM_JSON = "application/problem+json"
SETTLE_SECONDS = 1.0  # at most this long an answer waits for the workers to apply a change

Handler = Callable[["Call"], Awaitable[BaseModel | web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # aiohttp syntax; {color} is limited to blue|green
    summary: str
    handler: Handler
    response: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    auth: bool = True
    description: str = ""
    media_type: str = "application/json"
    streams: bool = False  # may answer text/event-stream instead


@dataclass(frozen=True)
class Call:
    """One validated API call."""

    request: web.Request
    body: Any
    query: Any
    actor: Actor

    def param(self, name: str) -> str:
        return self.request.match_info[name]


class ApiError(Exception):
    def __init__(self, status: int, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []


def problem(status: int, detail: str, errors: list[FieldError] | None = None) -> web.Response:
    body = Problem(
        title=HTTPStatus(status).phrase, status=status, detail=detail, errors=errors or []
    )
    response = web.json_response(body.model_dump(), status=status, content_type=PROBLEM_JSON)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="zdproxy"'
    return response


def _field_errors(exc: ValidationError, where: str, model: type[BaseModel]) -> ApiError:
    errors = []
    for line in format_validation_error(exc, model):
        field, _, reason = line.partition(": ")
        errors.append(FieldError(field=field if field != "(top level)" else where, reason=reason))
    detail = "; ".join(f"{e.field}: {e.reason}" for e in errors)
    return ApiError(400, f"invalid {where}: {detail}", errors)


class Tokens:
    """The bearer token, swappable on reload; compared in constant time."""

    def __init__(self, token: bytes) -> None:
        self.token = token

    def check(self, request: web.Request) -> None:
        if not self.token:
            raise ApiError(
                401,
                "no admin token is configured: set admin.token_file or ZDPROXY_ADMIN__TOKEN "
                "(only /healthz, /readyz, /metrics, /v1/openapi.json and the dashboard's page, "
                "/ui/, answer without one)",
            )
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # aiohttp keeps undecodable header bytes as surrogate escapes: give them back.
        presented = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, self.token):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")


def _actor(request: web.Request) -> Actor:
    return "cli" if request.headers.get("User-Agent", "").startswith(CLI_AGENT) else "api"


def _invalid(error: FieldError) -> ApiError:
    return ApiError(400, f"{error.field}: {error.reason}", [error])


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")


def _decode(raw: bytes) -> Any:
    """The body as JSON, checked (depth, Unicode, control characters) before any model
    sees it; an empty body is an empty object."""
    if not raw:
        return {}
    try:
        data = json.loads(raw, parse_constant=_not_json)  # NaN, Infinity
    except RecursionError:  # deeper than the decoder can go: far past MAX_JSON_DEPTH
        raise _invalid(too_deep()) from None
    except ValueError:
        raise _invalid(FieldError(field="body", reason="not valid JSON")) from None
    if (error := json_problem(data)) is not None:
        raise _invalid(error)
    return data


async def _parse(route: Route, request: web.Request, body_timeout: float) -> tuple[Any, Any]:
    query = body = None
    if route.query is not None:
        params = dict(request.query)
        if (error := json_problem(params)) is not None:
            raise _invalid(error)
        try:
            query = route.query.model_validate(params)
        except ValidationError as exc:
            raise _field_errors(exc, "query", route.query) from None
    if route.body is not None:
        try:
            async with asyncio.timeout(body_timeout):
                raw = await request.read()
        except TimeoutError:
            # Checked after the token: a valid one must not hold a handler open either.
            detail = f"request body not complete within admin.body_timeout ({body_timeout:g}s)"
            raise ApiError(408, detail) from None
        except (web.RequestPayloadError, ConnectionResetError) as exc:
            # A broken chunked framing, or the client left before its body was complete.
            reason = f"could not be read: {exc}"
            raise _invalid(FieldError(field="body", reason=reason)) from None
        data = _decode(raw)
        try:
            # Strict: a JSON number only where a number is expected (not true, not "5").
            body = route.body.model_validate(data, strict=True)
        except ValidationError as exc:
            raise _field_errors(exc, "body", route.body) from None
    return body, query


def _endpoint(
    route: Route,
    tokens: Tokens,
    stopping: Callable[[], bool],
    body_timeout: float,
    settled: Callable[[bool], Awaitable[None]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def endpoint(request: web.Request) -> web.StreamResponse:
        try:
            if route.auth:
                tokens.check(request)
            if route.method != "GET" and stopping():
                # Health checks and the tick are closing: a change now would not be acted on.
                raise ApiError(503, "zdproxy is stopping: try again when it is back")
            body, query = await _parse(route, request, body_timeout)
            result = await route.handler(Call(request, body, query, _actor(request)))
            if not isinstance(result, web.StreamResponse):
                # An answer describes what every data-plane worker does (and, in fleet
                # mode, the fleet's state): it waits, SETTLE_SECONDS at most, until all
                # route by the latest snapshot. A worker being replaced gets it at its start.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SETTLE_SECONDS):
                        await settled(route.method != "GET")
        except ApiError as exc:
            answer = problem(exc.status, exc.detail, exc.errors)
            if exc.status == HTTPStatus.REQUEST_TIMEOUT:
                answer.force_close()  # the rest of the body may still come: not a request
            return answer
        except Refused as exc:
            return problem(exc.status, str(exc), [FieldError(field=exc.field, reason=exc.reason)])
        if isinstance(result, web.StreamResponse):
            return result
        return web.json_response(result.model_dump(mode="json"))

    return endpoint


@web.middleware
async def _problems(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own errors (no such route, wrong method) as problem+json too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = problem(exc.status, f"{request.method} {request.path}: {exc.reason}")
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("admin: %s %s failed", printable(request.method), printable(request.path))
        return problem(500, "internal error; see zdproxy's log")


def build_app(
    routes: list[Route],
    tokens: Tokens,
    stopping: Callable[[], bool],
    body_timeout: float,
    settled: Callable[[bool], Awaitable[None]],
) -> web.Application:
    app = web.Application(middlewares=[_problems], client_max_size=1024 * 1024)
    for route in routes:
        path = route.path.replace("{color}", "{color:blue|green}")
        endpoint = _endpoint(route, tokens, stopping, body_timeout, settled)
        app.router.add_route(route.method, path, endpoint)
        if route.method == "GET" and not route.auth and not route.streams:
            # The open endpoints (probes, /metrics) also answer HEAD, as load balancers'
            # and monitors' checks send it: the same status and headers, no body.
            app.router.add_route("HEAD", path, endpoint)
    # The dashboard's page and assets: no data, no token; its calls are the routes above.
    add_dashboard(app, load_assets())
    return app
