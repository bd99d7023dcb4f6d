"""The admin server: the API's routes, /metrics and /v1/openapi.json on one listener."""

from __future__ import annotations

import socket

from aiohttp import web
from pydantic import BaseModel

from zdproxy.admin.app import AdminListener, Call, Route, Tokens, build_app
from zdproxy.admin.handlers import AdminAPI, ServiceState
from zdproxy.admin.metrics import CONTENT_TYPE, Exporter
from zdproxy.admin.openapi import openapi_document
from zdproxy.control.plane import ControlPlane


class AdminServer:
    def __init__(self, control: ControlPlane, service: ServiceState, token: bytes) -> None:
        self.tokens = Tokens(token)
        self._exporter = Exporter(control, service)
        routes = AdminAPI(control, service).routes()
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
        app = build_app(routes, self.tokens, lambda: service.stopping)
        self._listener = AdminListener(app)

    async def _metrics(self, call: Call) -> BaseModel | web.StreamResponse:
        return web.Response(body=self._exporter.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _openapi(self, call: Call) -> BaseModel | web.StreamResponse:
        return web.json_response(self._openapi_body)

    async def start(self, sock: socket.socket) -> None:
        await self._listener.start(sock)

    async def close(self) -> None:
        await self._listener.close()
