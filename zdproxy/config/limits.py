"""The limits sections: the client-facing listener (`[proxy]`) and how zdproxy talks
to the app servers (`[upstream]`). Kept apart from settings.py (which includes them)
so that module stays readable."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import Field, field_validator

from zdproxy.config.section import Section
from zdproxy.config.tls import TlsSettings
from zdproxy.config.units import (
    DAY,
    HOUR,
    MINUTE,
    Address,
    AddressField,
    Duration,
    GiB,
    MiB,
    Networks,
    Size,
)

MAX_WORKERS = 256


class ProxySettings(Section):
    """The client-facing listener and the limits that protect it."""

    listen: AddressField = Field(
        default=Address.parse("127.0.0.1:8080"),
        description="Where clients connect: host:port or unix:/path.",
    )
    # The bounds are also _workers's; here they reach the JSON schema.
    workers: Annotated[int, Field(ge=1, le=MAX_WORKERS)] | Literal["auto"] = Field(
        default=1,
        description="Data-plane processes that serve the listener. 1 (the default): this "
        "process serves it. N (2-256): N worker processes serve it behind one main "
        "process, which keeps the control plane, the admin API and the health checks. "
        '"auto": one worker per CPU zdproxy may run on. Takes effect at a restart.',
    )
    backlog: int = Field(
        default=1024,
        ge=1,
        le=65535,
        description="Listen backlog of the proxy socket (1-65535; the kernel caps it at "
        "net.core.somaxconn).",
    )
    header_timeout: Duration = Field(
        default=10.0,
        gt=0,
        le=HOUR,
        description="A request head must arrive in full within this time (slowloris guard); "
        "408. At most 1h.",
    )
    idle_timeout: Duration = Field(
        default=60.0,
        gt=0,
        le=DAY,
        description="An idle keep-alive client connection is closed after this. At most 1d.",
    )
    max_header_bytes: Size = Field(
        default=16384,
        ge=1024,
        le=MiB,
        description="Largest request line plus headers; larger gets 431. 1KiB to 1MiB.",
    )
    max_body_bytes: Size = Field(
        default=0,
        ge=0,
        le=1024 * GiB,
        description="Largest request body; larger gets 413, as soon as a Content-Length or a "
        "chunk-size line declares it. 0 means no limit (bodies stream). At most 1024GiB.",
    )
    trusted_proxies: Networks = Field(
        default_factory=list,
        description=(
            "Networks (CIDR) of proxies in front of zdproxy whose X-Forwarded-For/Proto/Host "
            "are kept and appended to; from anyone else they are replaced."
        ),
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> int | str:
        if value == "auto":
            return "auto"
        if isinstance(value, str) and value.isdigit():
            value = int(value)  # from an environment variable
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f'a number of processes (1-{MAX_WORKERS}) or "auto", not {value!r}')
        if not 1 <= value <= MAX_WORKERS:
            raise ValueError(f"from 1 to {MAX_WORKERS} processes, not {value}")
        return value

    @property
    def worker_count(self) -> int:
        """How many worker processes `workers` asks for on this host (1: none)."""
        if self.workers == "auto":
            return min(len(os.sched_getaffinity(0)), MAX_WORKERS)
        return self.workers

    shutdown_timeout: Duration = Field(
        default=10.0,
        gt=0,
        le=HOUR,
        description=(
            "On stop or restart, requests in flight (and WebSocket tunnels) get this long "
            "to finish; what is left is then cut. At most 1h."
        ),
    )
    tls: TlsSettings = Field(
        default_factory=TlsSettings, description="TLS on this listener ([proxy.tls])."
    )
    via: str = Field(
        default="zdproxy",
        pattern=r"^[!#-'*+.0-9A-Z^-z|~-]*$",
        description="Pseudonym in the Via header added both ways; empty disables Via.",
    )
    forward_proxy_authorization: bool = Field(
        default=False,
        description="Forward the Proxy-Authorization request header to the app servers. "
        "Off: it is removed, as credentials meant for a proxy (RFC 9110 11.7.4).",
    )
    request_id: bool = Field(
        default=False,
        description="Give every request an X-Request-Id: the client's own if it sent one "
        "(visible ASCII, at most 128 bytes), else a new one. Forwarded to the app, written "
        "in the access log and in zdproxy's own error replies. Off by default: it costs "
        "about 1% more CPU per small request.",
    )


class UpstreamSettings(Section):
    """How zdproxy talks to the app servers of both pools."""

    connect_timeout: Duration = Field(
        default=3.0,
        gt=0,
        le=5 * MINUTE,
        description="Connecting to an upstream; past it the client gets 504. At most 5m.",
    )
    timeout: Duration = Field(
        default=60.0,
        gt=0,
        le=DAY,
        description=(
            "Longest silence from an upstream while a request is in flight: waiting for the "
            "response head (504) or between body bytes (the connection is cut). At most 1d."
        ),
    )
    idle_timeout: Duration = Field(
        default=1.5,
        gt=0,
        le=HOUR,
        description=(
            "An idle pooled upstream connection is closed after this. Keep it below the app "
            "server's own keep-alive timeout (gunicorn 2s, node 5s) so zdproxy never reuses a "
            "connection the app is closing. At most 1h."
        ),
    )
    max_idle_per_upstream: int = Field(
        default=512,
        ge=0,
        le=65535,
        description="Idle connections kept per upstream; size it to the peak concurrency. "
        "At most 65535 (each is a file descriptor).",
    )
    tunnel_idle_timeout: Duration = Field(
        default=3600.0,
        gt=0,
        le=DAY,
        description="An Upgrade (WebSocket) tunnel silent this long is closed. At most 1d.",
    )
