"""The dashboard's page and assets, served under /ui/ on the admin listener.

They hold no data, so they load without the token; the page asks for it and sends it
with every API call it makes (docs/dashboard.md). The files ship in the package
(zdproxy/admin/ui/) and are read once, when the admin API is built: no CDN, no build
step, and a page that works with no network.

Every answer carries a Content-Security-Policy that allows scripts, styles and
connections from this origin only, and no inline script or style: what the page shows
of the API (event reasons, version labels, hook output) is set as text, and even if a
mistake put it into HTML, the browser would not run it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import PurePosixPath

from aiohttp import web

PREFIX = "/ui/"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidated on each load (an ETag makes that a 304): a zdproxy upgrade shows at once.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _walk(folder: Traversable, prefix: str = "") -> dict[str, Asset]:
    assets = {}
    for entry in folder.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            assets.update(_walk(entry, name + "/"))
        elif (kind := CONTENT_TYPES.get(PurePosixPath(name).suffix)) is not None:
            body = entry.read_bytes()
            assets[name] = Asset(body, kind, f'"{hashlib.sha256(body).hexdigest()[:16]}"')
    return assets


def load_assets() -> dict[str, Asset]:
    """The page's files by their path under /ui/ (the page itself is "index.html")."""
    return _walk(files("zdproxy.admin") / "ui")


def add_dashboard(app: web.Application, assets: dict[str, Asset]) -> None:
    """GET /ui/ (the page) and its assets; / and /ui lead to /ui/."""

    async def to_page(request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect(PREFIX)

    async def asset(request: web.Request) -> web.StreamResponse:
        found = assets.get(request.match_info["path"] or "index.html")
        if found is None:
            raise web.HTTPNotFound()
        headers = {**SECURITY_HEADERS, "ETag": found.etag}
        if request.headers.get("If-None-Match") == found.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=found.body, headers={**headers, "Content-Type": found.content_type}
        )

    app.router.add_get("/", to_page)
    app.router.add_get(PREFIX.rstrip("/"), to_page)
    app.router.add_get(PREFIX + "{path:.*}", asset)
