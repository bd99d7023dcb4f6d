"""The admin server: the API's routes, /metrics and /v1/openapi.json on one listener."""

from __future__ import annotations

import socket

from aiohttp import web
from pydantic import BaseModel

from zdproxy.admin.app import Call, Route, Tokens, build_app
from zdproxy.admin.fleet import FleetAPI
from zdproxy.admin.handlers import AdminAPI, ServiceState
from zdproxy.admin.listener import AdminListener, ListenerLimits, reachable_from_other_hosts
from zdproxy.admin.metrics import Exporter
from zdproxy.admin.openapi import openapi_document
from zdproxy.config.service import AdminSettings
from zdproxy.control.plane import ControlPlane


class Unprotected(Exception):
    """An admin listener other hosts can reach, and no token to keep them out."""

    def __init__(self, address: str) -> None:
        super().__init__(
            f"admin listener {address} is reachable from other hosts and no admin token is "
            "set: set admin.token_file (or ZDPROXY_ADMIN__TOKEN), or listen on a loopback "
            "address or a unix socket (under systemd: ListenStream= of zdproxy-admin.socket)"
        )


class AdminServer:
    def __init__(self, control: ControlPlane, service: ServiceState, admin: AdminSettings) -> None:
        self.tokens = Tokens(admin.bearer_token)
        self._exporter = Exporter(control, service)
        api = AdminAPI(control, service)
        self._feed = api.feed
        routes = api.routes() + FleetAPI(control).routes()
        routes += [
            Route(
                "GET",
                "/metrics",
                "Prometheus metrics",
                self._metrics,
                auth=False,
                media_type="text/plain",
            ),
            Route("GET", "/v1/openapi.json", "This document", self._openapi, auth=False),
        ]
        self._openapi_body = openapi_document(routes)
        app = build_app(
            routes, self.tokens, lambda: service.stopping, admin.body_timeout, control.settled
        )
        limits = ListenerLimits(
            header_timeout=admin.header_timeout,
            idle_timeout=admin.idle_timeout,
            max_connections=admin.max_connections,
            max_pending_heads=admin.max_pending_heads,
        )
        self._listener = AdminListener(app, limits)

    async def _metrics(self, call: Call) -> BaseModel | web.StreamResponse:
        body, content_type = self._exporter.render(call.request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _openapi(self, call: Call) -> BaseModel | web.StreamResponse:
        return web.json_response(self._openapi_body)

    def check_reach(self, sock: socket.socket) -> None:
        """Refuse a listening socket that other hosts can reach while no token is set,
        whoever opened it: the settings check admin.listen, but a socket passed by systemd
        is wherever its unit put it."""
        if not self.tokens.token and (address := reachable_from_other_hosts(sock)) is not None:
            raise Unprotected(address)

    async def start(self, sock: socket.socket) -> None:
        self.check_reach(sock)
        await self._listener.start(sock)
        self._feed.start()

    async def close(self) -> None:
        await self._feed.close()  # ends the dashboards' streams before the listener waits
        await self._listener.close()
