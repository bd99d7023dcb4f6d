"""Server-sent events for GET /v1/events?follow=1 (`zdproxy events -f`)."""

from __future__ import annotations

from aiohttp import web

from zdproxy.admin import models as m
from zdproxy.control.events import Event, EventLog

KEEPALIVE_SECONDS = 15.0  # an SSE comment this often keeps idle proxies from cutting the stream


async def stream_events(
    request: web.Request, events: EventLog, query: m.EventsQuery
) -> web.StreamResponse:
    """GET /v1/events?follow=1: the history the query asks for, then each new event as it
    comes; a client that reconnects with Last-Event-ID resumes where it stopped."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    resume = request.headers.get("Last-Event-ID", "")
    resuming = resume.isascii() and resume.isdigit()
    sent = max(query.since, int(resume)) if resuming else query.since
    with events.follow() as follower:  # subscribed first, so nothing falls in between
        await response.prepare(request)
        try:
            history = events.history(sent, query.kind)
            for past in history if resuming else history[-query.limit :]:  # resume: all
                await response.write(_sse(past))
                sent = past.id
            while True:
                event = await follower.next(KEEPALIVE_SECONDS)
                if event is None:
                    if follower.ended:
                        break  # stopping or lagged: the client reconnects with Last-Event-ID
                    await response.write(b": keep-alive\n\n")
                elif event.id > sent and query.kind in (None, event.kind):
                    await response.write(_sse(event))
                    sent = event.id
        except ConnectionResetError:
            pass  # the follower went away: nothing to answer
    return response


def _sse(event: Event) -> bytes:
    # Through the API's model, as GET /v1/events.
    data = m.Event(**event.to_dict()).model_dump_json()
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()
