"""Settings of zdproxy's own service: the admin listener (`[admin]`) and the state
directory (`[state]`) that holds the journal and the event log."""

from __future__ import annotations

import os

from pydantic import Field, PrivateAttr, SecretStr, model_validator

from zdproxy.config.section import Section as _Section
from zdproxy.config.units import (
    DAY,
    HOUR,
    MIN_SECRET_BYTES,
    Address,
    AddressField,
    Duration,
    GiB,
    Size,
    read_secret,
)


class AdminSettings(_Section):
    """The admin API (JSON under /v1, /metrics, /healthz, /readyz, the dashboard at /ui/)
    that the CLI drives.

    Every /v1 call needs `Authorization: Bearer <token>`; without a configured token
    only /healthz, /readyz, /metrics, /v1/openapi.json and the dashboard's page and
    assets (which hold no data) answer. zdproxy refuses to
    listen on a non-loopback address without a token.
    """

    listen: AddressField = Field(
        default=Address.parse("127.0.0.1:9901"),
        description="host:port or unix:/path (created with mode 0660).",
    )
    token_file: str = Field(
        default="", description="File holding the bearer token; read at start and reload."
    )
    token: SecretStr = Field(
        default=SecretStr(""),
        description="The token itself: set it from the environment (ZDPROXY_ADMIN__TOKEN).",
    )
    status_window: Duration = Field(
        default=10.0,
        ge=1,
        le=600,
        description="The sliding window of the per-color rates and latencies in `status`, "
        "1s to 10m.",
    )
    header_timeout: Duration = Field(
        default=10.0,
        gt=0,
        le=HOUR,
        description="A request head must arrive in full within this time, counted from the "
        "accept for a connection's first request and from the first byte for a later one; "
        "past it: 408 and close. At most 1h.",
    )
    body_timeout: Duration = Field(
        default=10.0,
        gt=0,
        le=HOUR,
        description="A request body must arrive in full within this time after its head, "
        "token or not; past it: 408 and close. At most 1h.",
    )
    idle_timeout: Duration = Field(
        default=60.0,
        gt=0,
        le=DAY,
        description="A keep-alive connection idle this long between requests is closed. "
        "At most 1d.",
    )
    max_connections: int = Field(
        default=256,
        ge=2,
        le=65535,
        description="Admin connections open at once. A new one past it closes the oldest "
        "idle connection (one still sending a body its answer did not need goes first), "
        "else the oldest without a complete request head (408); when every one is "
        "answering a request, the new one gets 503. 2-65535 (each is a file descriptor).",
    )
    max_pending_heads: int = Field(
        default=64,
        ge=1,
        le=65534,
        description="Connections still sending their request head, at most; a new one past "
        "it closes the oldest of them (408). Below max_connections: the difference is kept "
        "for connections that sent their request, so slow clients cannot crowd them out.",
    )
    _file_token: bytes = PrivateAttr(default=b"")

    @model_validator(mode="after")
    def _load_token(self) -> AdminSettings:
        if self.token_file:
            self._file_token = read_secret(self.token_file)
        if 0 < len(self.token.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(
                f"token: must be at least {MIN_SECRET_BYTES} bytes (make one with "
                "`head -c 32 /dev/urandom | base64`)"
            )
        if self.max_pending_heads >= self.max_connections:
            raise ValueError(
                f"max_pending_heads: {self.max_pending_heads} must be below max_connections "
                f"({self.max_connections})"
            )
        if not self.bearer_token and not self.listen.is_loopback:
            raise ValueError(
                f"listen: {self.listen} is not loopback; an admin API reachable from other "
                "hosts needs a token (token_file or ZDPROXY_ADMIN__TOKEN)"
            )
        return self

    @property
    def bearer_token(self) -> bytes:
        """The token (the environment's wins over the file's), or b"" for none."""
        return self.token.get_secret_value().encode() or self._file_token


class ReloadSettings(_Section):
    """When the config file is read again besides SIGHUP (and `systemctl reload`)."""

    watch: bool = Field(
        default=True,
        description="Reload when the config file (or a TLS file it names) changes on disk.",
    )
    debounce: Duration = Field(
        default=0.5,
        ge=0.05,
        le=60,
        description="Changes within this time are one reload (an editor's save is several); "
        "50ms to 1m.",
    )


def _default_state_dir() -> str:
    # systemd's StateDirectory= exports STATE_DIRECTORY (colon-separated if several).
    return os.environ.get("STATE_DIRECTORY", "/var/lib/zdproxy").split(":")[0]


class StateSettings(_Section):
    """Where zdproxy keeps what must survive a restart: the state journal (runtime
    changes made through the API) and the event log."""

    dir: str = Field(
        default_factory=_default_state_dir,
        min_length=1,
        description="State directory; default $STATE_DIRECTORY (systemd) or /var/lib/zdproxy.",
    )
    events_in_memory: int = Field(
        default=1000,
        ge=10,
        le=100_000,
        description="Events kept in memory for GET /v1/events (10-100000).",
    )
    events_file_max: Size = Field(
        default=10 * 1024 * 1024,
        ge=4096,
        le=GiB,
        description="events.jsonl is rotated (events.jsonl.1, ...) when it would grow past "
        "this. 4KiB to 1GiB.",
    )
    events_files_kept: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Rotated event files kept besides the current one (0-100).",
    )
