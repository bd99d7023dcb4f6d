"""The upstream app the tests put behind zdproxy: one aiohttp app, many behaviours by path."""

from __future__ import annotations

import asyncio
import hashlib
from functools import partial
from typing import Any

from aiohttp import WSMsgType, web

BLOCK = hashlib.sha256(b"zdproxy").digest() * 2048  # 64 KiB of fixed, non-trivial bytes


def pattern(size: int) -> bytes:
    """The first `size` bytes of the endless BLOCK pattern (for small bodies)."""
    return (BLOCK * (size // len(BLOCK) + 1))[:size]


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    full, rest = divmod(size, len(BLOCK))
    for _ in range(full):
        digest.update(BLOCK)
    digest.update(BLOCK[:rest])
    return digest.hexdigest()


def upstream_app(name: str, seen: list[dict[str, Any]], **options: Any) -> web.Application:
    """`seen` gets one dict per request: method, path, headers, body size, upstream conn port."""

    async def record(request: web.Request) -> dict[str, Any]:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        entry = {
            "name": name,
            "method": request.method,
            "path": request.path_qs,
            "headers": list(request.raw_headers),
            "body_size": size,
            "body_sha256": digest.hexdigest(),
            "conn": peer[1] if peer else None,
            "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked",
        }
        seen.append(entry)
        return entry

    async def echo(request: web.Request) -> web.Response:
        entry = await record(request)
        headers = {k.decode(): v.decode() for k, v in entry["headers"]}
        return web.json_response(
            {
                "name": name,
                "method": entry["method"],
                "path": entry["path"],
                "headers": headers,
                "body_size": entry["body_size"],
                "body_sha256": entry["body_sha256"],
            }
        )

    async def stream(request: web.Request, *, chunked: bool) -> web.StreamResponse:
        """`size` bytes of the pattern, framed by Content-Length or chunked."""
        await record(request)
        size = int(request.match_info["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = size
        await response.prepare(request)
        if request.method != "HEAD":  # aiohttp would send it; a correct server does not
            await _write_pattern(response, size)
        await response.write_eof()
        return response

    async def status(request: web.Request) -> web.Response:
        await record(request)
        code = int(request.match_info["code"])
        headers = {"ETag": '"v1"', "X-Status": str(code)}
        if code in (204, 304):
            return web.Response(status=code, headers=headers)
        return web.Response(status=code, text=f"status {code} from {name}\n", headers=headers)

    async def slow(request: web.Request) -> web.Response:
        await record(request)
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return web.Response(text=f"slow {name}\n")

    async def hop_headers(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(
            text="hop\n",
            headers={"Connection": "X-Resp-Secret", "X-Resp-Secret": "1", "Keep-Alive": "5"},
        )

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        await record(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(f"{name}:{message.data}")
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    readiness: dict[str, Any] = options.get("readiness", {"status": 200, "db": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        """Readiness as the test sets it: `readiness` is shared and mutable."""
        body = {k: v for k, v in readiness.items() if k != "status"}
        return web.json_response(body, status=int(readiness.get("status", 200)))

    failing: dict[str, int] = options.get("failing", {})
    delay: dict[str, float] = options.get("delay", {})

    @web.middleware
    async def fail_on_purpose(request: web.Request, handler: Any) -> web.StreamResponse:
        """While the test sets failing["status"], every request but /readyz gets it; while
        it sets delay["seconds"], every such request waits that long first."""
        if delay.get("seconds") and request.path != "/readyz":
            await asyncio.sleep(delay["seconds"])
        if failing.get("status") and request.path != "/readyz":
            await record(request)
            return web.Response(status=failing["status"], text=f"{name} failing\n")
        response: web.StreamResponse = await handler(request)
        return response

    app = web.Application(client_max_size=1024**4, middlewares=[fail_on_purpose])
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/bytes/{size:\\d+}", partial(stream, chunked=False))
    app.router.add_route("*", "/chunked/{size:\\d+}", partial(stream, chunked=True))
    app.router.add_route("*", "/status/{code:\\d+}", status)
    app.router.add_route("*", "/slow/{ms:\\d+}", slow)
    app.router.add_get("/hop-headers", hop_headers)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def _write_pattern(response: web.StreamResponse, size: int) -> None:
    full, rest = divmod(size, len(BLOCK))
    for _ in range(full):
        await response.write(BLOCK)
    if rest:
        await response.write(BLOCK[:rest])


def main() -> None:
    """`python -m tests.apps NAME`: serve the app on an ephemeral port in its own process
    (for tests that kill an upstream), printing "PORT <n>" once it listens."""
    import sys

    async def serve() -> None:
        runner = web.AppRunner(upstream_app(sys.argv[1], []), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
