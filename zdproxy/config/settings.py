"""The settings model: one class per config file section, every option with a default.

The TOML file is the source of truth; `ZDPROXY_<SECTION>__<OPTION>` environment
variables override single options (e.g. `ZDPROXY_PROXY__LISTEN=127.0.0.1:8081`).
Unknown keys are errors so that a typo never passes silently.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from zdproxy.config.overrides import PinSettings, PreviewSettings
from zdproxy.config.plans import HookSettings, PlanSettings, RolloutSettings, check_plans
from zdproxy.config.service import AdminSettings, ReloadSettings, StateSettings
from zdproxy.config.tls import TlsSettings
from zdproxy.config.units import Address, AddressField, Duration, Networks, Size

Color = Literal["blue", "green"]
COLORS: tuple[Color, Color] = ("blue", "green")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProxySettings(Section):
    """The client-facing listener and the limits that protect it."""

    listen: AddressField = Field(
        default=Address.parse("127.0.0.1:8080"),
        description="Where clients connect: host:port or unix:/path.",
    )
    backlog: int = Field(default=1024, ge=1, description="Listen backlog of the proxy socket.")
    header_timeout: Duration = Field(
        default=10.0,
        gt=0,
        description="A request head must arrive in full within this time (slowloris guard); 408.",
    )
    idle_timeout: Duration = Field(
        default=60.0, gt=0, description="An idle keep-alive client connection is closed after this."
    )
    max_header_bytes: Size = Field(
        default=16384, ge=1024, description="Largest request line plus headers; larger gets 431."
    )
    max_body_bytes: Size = Field(
        default=0,
        ge=0,
        description="Largest request body; larger gets 413. 0 means no limit (bodies stream).",
    )
    trusted_proxies: Networks = Field(
        default_factory=list,
        description=(
            "Networks (CIDR) of proxies in front of zdproxy whose X-Forwarded-For/Proto/Host "
            "are kept and appended to; from anyone else they are replaced."
        ),
    )
    shutdown_timeout: Duration = Field(
        default=10.0,
        gt=0,
        description=(
            "On stop or restart, requests in flight (and WebSocket tunnels) get this long "
            "to finish; what is left is then cut."
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


class UpstreamSettings(Section):
    """How zdproxy talks to the app servers of both pools."""

    connect_timeout: Duration = Field(
        default=3.0, gt=0, description="Connecting to an upstream; past it the client gets 504."
    )
    timeout: Duration = Field(
        default=60.0,
        gt=0,
        description=(
            "Longest silence from an upstream while a request is in flight: waiting for the "
            "response head (504) or between body bytes (the connection is cut)."
        ),
    )
    idle_timeout: Duration = Field(
        default=1.5,
        gt=0,
        description=(
            "An idle pooled upstream connection is closed after this. Keep it below the app "
            "server's own keep-alive timeout (gunicorn 2s, node 5s) so zdproxy never reuses a "
            "connection the app is closing."
        ),
    )
    max_idle_per_upstream: int = Field(
        default=512,
        ge=0,
        description="Idle connections kept per upstream; size it to the peak concurrency.",
    )
    tunnel_idle_timeout: Duration = Field(
        default=3600.0,
        gt=0,
        description="An Upgrade (WebSocket) tunnel silent this long is closed.",
    )


class UpstreamEntry(Section):
    address: AddressField
    weight: int = Field(default=100, ge=1, le=10000, description="Relative share within the pool.")


def _entry(value: Any) -> Any:
    return {"address": value} if isinstance(value, str) else value


class HealthSettings(Section):
    """Active health checks of one pool's upstreams. Off unless `path` is set.

    An upstream is routable only after `rise` passing checks in a row, and leaves
    rotation after `fall` failing ones. A check passes when the answer comes
    within `timeout`, its status is one of `expect_status`, and, if `expect_json`
    is set, the JSON body has those values (dotted keys reach into objects), so a
    readiness endpoint can report its database and queue.
    """

    path: str = Field(
        default="",
        pattern=r"^(/[^\s]*)?$",
        description='Path to probe, e.g. "/readyz"; empty turns active checks off.',
    )
    method: Literal["GET", "HEAD", "OPTIONS"] = Field(default="GET", description="Probe method.")
    interval: Duration = Field(default=2.0, gt=0, description="Time between two probes.")
    jitter: Duration = Field(
        default=0.2, ge=0, description="Up to this much is added to each interval, at random."
    )
    timeout: Duration = Field(default=1.0, gt=0, description="A slower answer is a failure.")
    rise: int = Field(default=2, ge=1, le=100, description="Passes in a row to become routable.")
    fall: int = Field(default=3, ge=1, le=100, description="Failures in a row to leave rotation.")
    expect_status: list[int] = Field(
        default_factory=lambda: [200], min_length=1, description="Statuses that pass."
    )
    expect_json: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description='Body fields that must have these values, e.g. {db = "ok", queue = "ok"}.',
    )
    host: str = Field(default="", description="Host header of the probes; default the address.")

    @field_validator("expect_status")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        for status in value:
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.path)


class OutlierSettings(Section):
    """Passive outlier ejection: an upstream whose requests fail in a row leaves rotation
    for a while, without waiting for the active checks."""

    consecutive_failures: int = Field(
        default=5,
        ge=0,
        description="Failures in a row (5xx, connect, reset, timeout) that eject; 0 disables.",
    )
    base_ejection: Duration = Field(
        default=30.0,
        gt=0,
        description="Ejection time, times the number of times this upstream was ejected.",
    )
    max_ejected_percent: int = Field(
        default=50, ge=0, le=100, description="Never more than this share of the pool ejected."
    )


class PoolMembers(Section):
    """A pool's app servers and the build they run: what `PUT /v1/pools/{color}` sets."""

    upstreams: list[UpstreamEntry] = Field(
        default_factory=list,
        description='Addresses ("127.0.0.1:9001", "unix:/run/app.sock") or {address, weight}.',
    )
    version: str = Field(
        default="", max_length=200, description="Label of the build deployed to this pool."
    )

    @field_validator("upstreams", mode="before")
    @classmethod
    def _entries(cls, value: Any) -> Any:
        return [_entry(item) for item in value] if isinstance(value, list) else value

    @field_validator("upstreams")
    @classmethod
    def _unique(cls, value: list[UpstreamEntry]) -> list[UpstreamEntry]:
        seen: set[str] = set()
        for entry in value:
            if str(entry.address) in seen:
                raise ValueError(f"{entry.address} is listed twice")
            seen.add(str(entry.address))
        return value

    def members(self) -> dict[str, Any]:
        """The JSON form, as the API and the journal spell it."""
        return {
            "upstreams": [{"address": str(e.address), "weight": e.weight} for e in self.upstreams],
            "version": self.version,
        }


class PoolSettings(PoolMembers):
    """One color's app servers and how they are checked."""

    health: HealthSettings = HealthSettings()
    outlier: OutlierSettings = OutlierSettings()


class Pools(Section):
    blue: PoolSettings = PoolSettings()
    green: PoolSettings = PoolSettings()


TOKEN = r"[!#-'*+.0-9A-Z^-z|~-]+"  # an HTTP token (RFC 9110 5.6.2): header and cookie names


class SplitSettings(Section):
    """Which color is live, how much traffic the other one (the candidate) gets, and what
    keeps each user on one color while that share moves."""

    live: Color = Field(default="blue", description="The color that takes traffic by default.")
    candidate_weight: int = Field(
        default=0,
        ge=0,
        le=10000,
        description="The candidate's share in basis points: 0 = none, 10000 = all.",
    )
    sticky_key: str = Field(
        default="bucket-cookie",
        pattern=rf"^(bucket-cookie|client-ip|cookie:{TOKEN}|header:{TOKEN})$",
        description=(
            "What a user's bucket is hashed from: 'cookie:NAME', 'header:NAME', 'client-ip', "
            "or 'bucket-cookie' (zdproxy's own cookie). A request without the named cookie "
            "or header gets zdproxy's own bucket cookie."
        ),
    )
    bucket_cookie: str = Field(
        default="zd_bucket",
        pattern=rf"^{TOKEN}$",
        description="Name of the cookie zdproxy issues to users without another key.",
    )
    bucket_cookie_max_age: Duration = Field(
        default=30 * 86400.0, gt=0, description="Lifetime of zdproxy's bucket cookie."
    )
    salt: str = Field(
        default="",
        description=(
            "Mixed into every bucket hash; changing it reshuffles users between colors. "
            "Empty: zdproxy draws a random salt once and keeps it in the state journal."
        ),
    )


class RetrySettings(Section):
    """Sending a failed request again, where that is safe.

    A connect failure goes to another upstream of the same color (nothing was
    sent). A request that failed on the candidate before any response byte
    reached the client (connect failure, reset, or one of `statuses`) goes to the
    live pool once, if it is idempotent (GET, HEAD, OPTIONS, PUT, DELETE, TRACE, or
    any method with an Idempotency-Key header) and its body, if any, fit in
    `max_body`. A budget keeps the retries that load an upstream (all but
    same-color connect retries) to a share of recent requests, so a failing pool
    cannot double the load on the other.
    """

    on_live_pool: bool = Field(
        default=True, description="Retry the candidate's failed requests on the live pool."
    )
    statuses: list[int] = Field(
        default_factory=lambda: [502, 503, 504],
        description="Candidate statuses that are retried on the live pool.",
    )
    max_body: Size = Field(
        default=65536, ge=0, description="Largest request body kept so it can be sent again."
    )
    budget_percent: int = Field(
        default=20, ge=0, le=100, description="Retries allowed, as a share of recent requests."
    )

    @field_validator("statuses")
    @classmethod
    def _server_errors(cls, value: list[int]) -> list[int]:
        for status in value:
            if not 500 <= status <= 599:
                raise ValueError(f"{status} is not a 5xx status")
        return value


class LogSettings(Section):
    """Log lines go to stderr (journald under systemd) in logfmt: see ops/logs.py."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="The lowest level logged; a reload changes it."
    )
    access: bool = Field(default=False, description="Log one line per (sampled) response.")
    access_sample: float = Field(
        default=1.0, gt=0, le=1, description="Share of responses the access log writes."
    )


class Settings(BaseSettings):
    """The whole config file."""

    model_config = SettingsConfigDict(
        env_prefix="ZDPROXY_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    proxy: ProxySettings = ProxySettings()
    upstream: UpstreamSettings = UpstreamSettings()
    pools: Pools = Pools()
    split: SplitSettings = SplitSettings()
    pins: list[PinSettings] = Field(
        default_factory=list, description="Ordered pin rules ([[pins]]); the first match wins."
    )
    preview: PreviewSettings = PreviewSettings()
    retry: RetrySettings = RetrySettings()
    log: LogSettings = LogSettings()
    admin: AdminSettings = AdminSettings()
    state: StateSettings = StateSettings()
    reload: ReloadSettings = ReloadSettings()
    plans: dict[str, PlanSettings] = Field(
        default_factory=dict, description="Rollout plans by name ([plans.NAME])."
    )
    hooks: dict[str, HookSettings] = Field(
        default_factory=dict, description="Commands plans may run, by name ([hooks.NAME])."
    )
    rollout: RolloutSettings = RolloutSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init values; the environment overrides it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        self.check_consistency()
        return self

    def check_consistency(self) -> None:
        """The rules that span sections; also run on settings changed through the API."""
        self._listener_is_not_an_upstream()
        self._one_role_per_header()
        check_plans(self.plans, self.hooks, self.rollout.default_plan)

    def pool(self, color: str) -> PoolSettings:
        pool: PoolSettings = getattr(self.pools, color)
        return pool

    def _listener_is_not_an_upstream(self) -> None:
        listeners = {str(self.proxy.listen), str(self.admin.listen)}
        if len(listeners) == 1 and self.proxy.listen.port != 0:  # port 0: two fresh ports
            raise ValueError(f"admin.listen: {self.admin.listen} is also proxy.listen")
        for color in COLORS:
            for entry in self.pool(color).upstreams:
                if str(entry.address) in listeners:
                    raise ValueError(f"pools.{color}: {entry.address} is zdproxy's own listener")

    def _one_role_per_header(self) -> None:
        # The data plane files each request header under one role; a header with two
        # would silently lose one of them.
        preview = self.preview.header.lower()
        kind, _, sticky = self.split.sticky_key.partition(":")
        if preview and kind == "header" and sticky.lower() == preview:
            raise ValueError(f"preview.header: {self.preview.header!r} is also split.sticky_key")
        for i, pin in enumerate(self.pins):
            if preview and pin.header.lower() == preview:
                raise ValueError(f"pins[{i}].header: {pin.header!r} is the preview header")
