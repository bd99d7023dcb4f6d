"""The access log: one line per sampled response, off by default.

Off, it costs one attribute test per response. On, a sampled response becomes a
line on the `zdproxy.access` logger (logfmt or JSON, as `log.format` says): method,
target, status, upstream, duration in microseconds, response body bytes, client,
user agent, and the request's X-Request-Id as forwarded, if it has one.
"""

from __future__ import annotations

import logging
import random
import re
from typing import TYPE_CHECKING

from zdproxy.dataplane.request_id import request_id_in

if TYPE_CHECKING:
    from zdproxy.dataplane.exchange import Exchange

log = logging.getLogger("zdproxy.access")

# The User-Agent in the head as forwarded: read back only for a line that is written,
# so that the hot path never looks for it.
_USER_AGENT = re.compile(rb"\r\nuser-agent:[ \t]*([^\r]*)", re.IGNORECASE)


class AccessLog:
    def __init__(self, sample: float) -> None:
        self.sample = sample

    def response(
        self, exchange: Exchange, status: int, upstream: str, seconds: float, sent: int | None
    ) -> None:
        """`sent`: the response body's bytes (zdproxy's own reply's), None if not counted."""
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        head = exchange.head
        line = head.split(b"\r\n", 1)[0].split(b" ")
        target = line[1].decode("latin-1") if len(line) > 1 else ""
        agent = _USER_AGENT.search(head)
        fields: dict[str, object] = {
            "method": exchange.method.decode("latin-1"),
            "target": target,
            "status": status,
            "upstream": upstream,
            "us": round(seconds * 1_000_000),
            "bytes": "-" if sent is None else sent,
            "client": exchange.client.peer_ip.decode(),
            "ua": agent[1].decode("latin-1") if agent else "",
        }
        if request_id := request_id_in(head):
            fields["request_id"] = request_id.decode("latin-1")
        log.info("%s %s %d", fields["method"], target, status, extra={"fields": fields})
