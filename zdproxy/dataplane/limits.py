"""The data plane's limits: every timeout, size and policy it takes from the config.

A frozen plain value, built from the settings outside the data plane (ops/limits.py)
so that a data-plane worker never carries the settings machinery. A reload builds a
new one and swaps it in whole; connections read it through their Context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zdproxy.dataplane.access import AccessLog
from zdproxy.dataplane.peers import IPNetwork, in_networks, networks
from zdproxy.dataplane.request_id import RequestIds


@dataclass(frozen=True, slots=True)
class Limits:
    # The client side (config [proxy]).
    header_timeout: float
    idle_timeout: float
    max_header_bytes: int
    max_body_bytes: int  # 0: no limit
    trusted_proxies: tuple[str, ...]  # CIDR; only their X-Forwarded-* are kept
    via: str  # the Via header's pseudonym; "" sends none
    forward_proxy_authorization: bool  # else Proxy-Authorization is removed from requests
    request_id: bool  # every request gets an X-Request-Id
    # The upstream side (config [upstream]).
    connect_timeout: float
    upstream_timeout: float
    upstream_idle_timeout: float
    max_idle_per_upstream: int
    tunnel_idle_timeout: float
    # Retries (config [retry]).
    retry_on_live: bool
    retry_statuses: frozenset[int]  # the candidate's answers replaced by the live pool's
    retry_max_body: int
    retry_budget_percent: float
    # The access log (config [log]); a sample of 0 to 1 of the responses.
    access_log: bool
    access_sample: float
    # Derived once here, so the hot path reads them ready-made.
    via_line: bytes = field(init=False, repr=False)
    head_end: bytes = field(init=False, repr=False)  # the last bytes of every upstream head
    trusted: tuple[IPNetwork, ...] = field(init=False, repr=False)
    access: AccessLog | None = field(init=False, repr=False)
    request_ids: RequestIds | None = field(init=False, repr=False)
    retry_share: float = field(init=False, repr=False)
    tick: float = field(init=False, repr=False)  # how often the timeout sweep runs

    def __post_init__(self) -> None:
        via_line = b"Via: 1.1 %s\r\n" % self.via.encode() if self.via else b""
        shortest = min(
            self.header_timeout,
            self.idle_timeout,
            self.connect_timeout,
            self.upstream_timeout,
            self.upstream_idle_timeout,
        )
        derived = {
            "via_line": via_line,
            "head_end": via_line + b"\r\n",
            "trusted": networks(self.trusted_proxies),
            "access": AccessLog(self.access_sample) if self.access_log else None,
            "request_ids": RequestIds() if self.request_id else None,
            "retry_share": self.retry_budget_percent / 100,
            # Timeouts fire within a quarter of the shortest one; never spin faster than 5 ms.
            "tick": min(max(shortest / 4, 0.005), 0.5),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: only __post_init__ may set them

    def trusts(self, peer_ip: bytes) -> bool:
        """Whether the peer is a trusted proxy (its X-Forwarded-* headers are kept)."""
        return bool(self.trusted) and in_networks(peer_ip, self.trusted)
