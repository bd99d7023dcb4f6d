"""The access log: one line per sampled response, off by default.

Off, it costs one attribute test per response. On, a sampled response becomes a
logfmt line on the `zdproxy.access` logger: method, target, status, upstream,
duration and client.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zdproxy.dataplane.exchange import Exchange

log = logging.getLogger("zdproxy.access")


class AccessLog:
    def __init__(self, sample: float) -> None:
        self.sample = sample

    def response(self, exchange: Exchange, status: int, upstream: str, seconds: float) -> None:
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        line = exchange.head.split(b"\r\n", 1)[0].split(b" ")
        target = line[1].decode("latin-1") if len(line) > 1 else ""
        fields = {
            "method": exchange.method.decode("latin-1"),
            "target": target,
            "status": status,
            "upstream": upstream,
            "ms": round(seconds * 1000, 3),
            "client": exchange.client.peer_ip.decode(),
        }
        log.info("%s %s %d", fields["method"], target, status, extra={"fields": fields})
