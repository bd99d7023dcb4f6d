"""The settings model: one class per config file section, every option with a default.

The TOML file is the source of truth; `ZDPROXY_<SECTION>__<OPTION>` environment
variables override single options (e.g. `ZDPROXY_PROXY__LISTEN=127.0.0.1:8081`).
Unknown keys are errors so that a typo never passes silently.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from zdproxy.config.fleet import FleetSettings
from zdproxy.config.limits import ProxySettings, UpstreamSettings
from zdproxy.config.overrides import TOKEN, PinSettings, PreviewSettings
from zdproxy.config.plans import HookSettings, Plans, RolloutSettings, check_plans
from zdproxy.config.section import Section
from zdproxy.config.service import AdminSettings, ReloadSettings, StateSettings
from zdproxy.config.units import DAY, HOUR, AddressField, Duration, MiB, Size
from zdproxy.logs import LogFormat
from zdproxy.routing.vocabulary import COLORS as COLORS
from zdproxy.routing.vocabulary import Color as Color


class UpstreamEntry(Section):
    address: AddressField
    weight: int = Field(
        default=100, ge=1, le=10000, description="Relative share within the pool, 1-10000."
    )


def _entry(value: Any) -> Any:
    return {"address": value} if isinstance(value, str) else value


class HealthSettings(Section):
    """Active health checks of one pool's upstreams, on by default.

    Without a `path` a check is a TCP connect (a unix socket connect for unix:
    addresses); with one, an HTTP request that passes when the answer comes within
    `timeout`, its status is one of `expect_status`, and, if `expect_json` is set, the
    JSON body has those values (dotted keys reach into objects), so a readiness
    endpoint can report its database and queue. An upstream is "unknown", and not
    routable, until it has passed `rise` checks in a row; it leaves rotation after
    `fall` failing ones. `enabled = false` turns the checks off: the pool's upstreams
    are then routable unchecked, shown as "unchecked", never as healthy.
    """

    enabled: bool = Field(
        default=True,
        description="False: no active checks; the upstreams take traffic unchecked.",
    )
    path: str = Field(
        default="",
        max_length=2048,
        description='Path of an HTTP check, e.g. "/readyz"; empty: a TCP connect check.',
    )
    method: Literal["GET", "HEAD", "OPTIONS"] = Field(default="GET", description="Probe method.")
    interval: Duration = Field(
        default=2.0, gt=0, le=3600, description="Time between two probes (at most 1h)."
    )
    jitter: Duration = Field(
        default=0.2,
        ge=0,
        le=3600,
        description="Up to this much is added to each interval, at random (at most 1h).",
    )
    timeout: Duration = Field(
        default=1.0, gt=0, le=300, description="A slower answer is a failure (at most 5m)."
    )
    rise: int = Field(default=2, ge=1, le=100, description="Passes in a row to become routable.")
    fall: int = Field(default=3, ge=1, le=100, description="Failures in a row to leave rotation.")
    expect_status: list[int] = Field(
        default_factory=lambda: [200],
        min_length=1,
        max_length=500,
        description="Statuses that pass (HTTP checks).",
    )
    expect_json: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        max_length=100,
        description='Body fields that must have these values, e.g. {db = "ok", queue = "ok"}.',
    )
    host: str = Field(
        default="", max_length=255, description="Host header of the probes; default the address."
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if value and (not value.startswith("/") or any(c.isspace() for c in value)):
            raise ValueError(
                "must start with '/' and hold no spaces (e.g. \"/readyz\"), or be empty for a "
                "TCP connect check"
            )
        return value

    @field_validator("expect_status")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        for status in value:
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status")
        return value

    @property
    def http(self) -> bool:
        """Checked with an HTTP request (else a TCP connect, or not at all)."""
        return self.enabled and bool(self.path)

    def describe(self) -> str:
        """The check in a few words, for `zdproxy check` and the status view."""
        if not self.enabled:
            return "no check (enabled = false)"
        return f"{self.method} {self.path}" if self.path else "TCP connect"


class OutlierSettings(Section):
    """Passive outlier ejection: an upstream whose requests fail in a row leaves rotation
    for a while, without waiting for the active checks."""

    consecutive_failures: int = Field(
        default=5,
        ge=0,
        le=10000,
        description="Failures in a row (5xx, connect, reset, timeout) that eject; 0 disables. "
        "At most 10000.",
    )
    base_ejection: Duration = Field(
        default=30.0,
        gt=0,
        le=HOUR,
        description="Ejection time, times the number of times this upstream was ejected. "
        "At most 1h.",
    )
    max_ejected_percent: int = Field(
        default=50,
        ge=0,
        le=100,
        description="Never more than this share of the pool ejected, rounded down: at 50, "
        "one of 2 or 3 upstreams, none of a pool of one.",
    )


class PoolMembers(Section):
    """A pool's app servers and the build they run: what `PUT /v1/pools/{color}` sets."""

    upstreams: list[UpstreamEntry] = Field(
        default_factory=list,
        max_length=1000,
        description='Addresses ("127.0.0.1:9001", "unix:/run/app.sock") or {address, weight}; '
        "at most 1000.",
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


STICKY_KEY = rf"^(bucket-cookie|client-ip|cookie:{TOKEN}|header:{TOKEN})$"


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
        pattern=STICKY_KEY,
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
        default=30 * DAY,
        gt=0,
        le=400 * DAY,
        description="Lifetime of zdproxy's bucket cookie. At most 400d (browsers cap "
        "cookies there, RFC 6265bis).",
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

    Which requests: a connect failure reached no app, so any request may go again; a
    reset (the upstream closed the connection before any response byte) or a status
    in `statuses` only for an idempotent request (GET, HEAD, OPTIONS, PUT, DELETE,
    TRACE, or any method with an Idempotency-Key header) whose body, if any, fit in
    `max_body`, and before any response byte reached the client. A POST without an
    Idempotency-Key that reached an app is never sent twice, not even after a timeout.

    Where to: a request the split sent to the candidate goes to the live pool (with
    `on_live_pool`); any other, after a connect failure or a reset, to another upstream
    of its color (a pinned or preview request keeps its color). Only the candidate's
    statuses are ever retried, on the live pool. At most 2 retries per request.

    The budget keeps retries that load a second app (after a reset or a status) to a
    share of recent requests, so a failing pool cannot double the load on the other;
    a connect failure's retry loads one app once and is never refused. When a rollout
    rolls back, the candidate's requests in flight that are safe to send again move to
    the live pool at once: they spend the budget but are never refused by it (they are
    bounded by what was in flight); the rest get a grace period, then a 504.
    """

    on_live_pool: bool = Field(
        default=True,
        description="Retry on the live pool the requests the split sent to the candidate.",
    )
    statuses: list[int | Literal["5xx"]] = Field(
        default_factory=lambda: list[int | Literal["5xx"]](["5xx"]),
        max_length=100,
        description='Candidate statuses answered by the live pool instead: 5xx codes, or "5xx" '
        "for all of 500-599; [] for none. The candidate's answer still counts in its record.",
    )
    max_body: Size = Field(
        default=65536,
        ge=0,
        le=64 * MiB,
        description="Largest request body kept (in memory) so it can be sent again. At most 64MiB.",
    )
    budget_percent: int = Field(
        default=20, ge=0, le=100, description="Retries allowed, as a share of recent requests."
    )

    @field_validator("statuses")
    @classmethod
    def _server_errors(cls, value: list[int | Literal["5xx"]]) -> list[int | Literal["5xx"]]:
        for status in value:
            if status != "5xx" and not 500 <= status <= 599:
                raise ValueError(f"{status} is not a 5xx status")
        return value

    @property
    def status_codes(self) -> frozenset[int]:
        """`statuses` as the status codes they name."""
        codes: set[int] = set()
        for status in self.statuses:
            codes.update(range(500, 600) if status == "5xx" else (status,))
        return frozenset(codes)


class LogSettings(Section):
    """Log lines go to stderr (journald under systemd): see zdproxy/logs.py."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="The lowest level logged; a reload changes it."
    )
    format: LogFormat = Field(
        default="logfmt",
        description='"logfmt": key=value lines; "json": one JSON object per line, with the '
        "same fields (ts, level, logger, msg, then the record's own). A reload changes it.",
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
        default_factory=list,
        max_length=1000,
        description="Ordered pin rules ([[pins]]); the first match wins. At most 1000 "
        "(as PUT /v1/rules).",
    )
    preview: PreviewSettings = PreviewSettings()
    retry: RetrySettings = RetrySettings()
    log: LogSettings = LogSettings()
    admin: AdminSettings = AdminSettings()
    state: StateSettings = StateSettings()
    reload: ReloadSettings = ReloadSettings()
    plans: Plans = Field(
        default_factory=dict,
        validate_default=True,  # the built-in plans, for a file without [plans] too
        description="Rollout plans by name ([plans.NAME]), and the built-in canary and "
        "blue-green unless the file declares a plan of that name.",
    )
    hooks: dict[str, HookSettings] = Field(
        default_factory=dict, description="Commands plans may run, by name ([hooks.NAME])."
    )
    rollout: RolloutSettings = RolloutSettings()
    fleet: FleetSettings = FleetSettings()

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
        check_plans(self.plans, self.hooks, self.rollout.default_plan, self.pins)

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
