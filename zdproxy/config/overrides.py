"""Settings of the routing overrides: pin rules (`[[pins]]`) and the preview (`[preview]`).

Kept apart from settings.py (which includes them) so that module stays readable.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from zdproxy.config.section import Section as _Section
from zdproxy.config.units import MIN_SECRET_BYTES, Networks, read_secret
from zdproxy.routing.snapshot import AfterRollback, PinRule, PreviewPolicy
from zdproxy.routing.vocabulary import PinTarget

# An HTTP token (RFC 9110 5.6.2): the header and cookie names every section accepts.
TOKEN = r"[!#-'*+.0-9A-Z^-z|~-]+"

# The request headers zdproxy consumes or rewrites itself (dataplane.http.REQUEST_HEADERS;
# a test keeps the two equal): a rule could never see them as the client sent them.
INTERPRETED_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
        "content-length", "host", "expect", "x-forwarded-for", "x-forwarded-proto",
        "x-forwarded-host", "cookie", "idempotency-key", "proxy-authorization", "x-request-id",
    }
)  # fmt: skip

MAX_MATCHES = 10_000  # values, hosts, prefixes or networks of one rule


def _not_interpreted(name: str) -> str:
    if name and name.lower() in INTERPRETED_HEADERS:
        raise ValueError(f"{name!r} is interpreted by zdproxy and cannot be matched")
    return name


# A header a rule reads: never one zdproxy itself consumes or rewrites.
MatchedHeader = Annotated[str, AfterValidator(_not_interpreted)]


class PinSettings(_Section):
    """One pin rule: a request that matches every condition given goes to `to`."""

    name: str = Field(default="", description="Label in logs and metrics; default pins[N].")
    header: MatchedHeader = Field(
        default="",
        pattern=rf"^({TOKEN})?$",
        description="A request header (any case) whose value must be one of `values`.",
    )
    cookie: str = Field(
        default="", pattern=rf"^({TOKEN})?$", description="A cookie whose value is in `values`."
    )
    values: list[str] = Field(
        default_factory=list,
        max_length=MAX_MATCHES,
        description="Exact values for `header` or `cookie` (at most 10000).",
    )
    host: list[str] = Field(
        default_factory=list,
        max_length=MAX_MATCHES,
        description="Host names (any case, port ignored); one must match (at most 10000).",
    )
    path_prefix: list[str] = Field(
        default_factory=list,
        max_length=MAX_MATCHES,
        description="The request target starts with one of these (at most 10000).",
    )
    network: Networks = Field(
        default_factory=list,
        max_length=MAX_MATCHES,
        description="Client networks (CIDR), as zdproxy sees the client (at most 10000).",
    )
    to: PinTarget = Field(
        description='"blue", "green", "candidate" or "live". During a rollout "candidate" '
        'is its candidate and "live" the color it started from, in every phase; otherwise '
        "the split's colors."
    )
    after_rollback: AfterRollback = Field(
        default="live",
        description="When the last rollout was rolled back, aborted or failed and this rule "
        'leads to its candidate: "live" sends the requests to the live color until the '
        'next deploy; "stay" keeps them on the candidate.',
    )

    @field_validator("host")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not host or any(c.isspace() or c in "/?#@" for c in host):
                raise ValueError(f"{host!r} is not a host name")
        return value

    @field_validator("path_prefix")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/"):
                raise ValueError(f"{path!r} must start with '/'")
        return value

    @model_validator(mode="after")
    def _conditions(self) -> PinSettings:
        if self.header and self.cookie:
            raise ValueError("give header or cookie, not both (`values` would be ambiguous)")
        if (self.header or self.cookie) and not self.values:
            raise ValueError(f"{'header' if self.header else 'cookie'} needs a list of values")
        if self.values and not (self.header or self.cookie):
            raise ValueError("values needs a header or a cookie to compare with")
        if not (self.header or self.cookie or self.host or self.path_prefix or self.network):
            raise ValueError(
                "a pin rule needs at least one condition: header, cookie, host, "
                "path_prefix or network"
            )
        return self

    def rule(self, index: int) -> PinRule:
        """The rule as the routing snapshot carries it; unnamed rules are named by place."""
        return PinRule(
            self.name or f"pins[{index}]",
            self.to,
            self.header,
            self.cookie,
            tuple(self.values),
            tuple(self.host),
            tuple(self.path_prefix),
            tuple(self.network),
            self.after_rollback,
        )


class PreviewSettings(_Section):
    """The preview override: a header or cookie naming a color, honoured from trusted
    networks or when it is a signed, unexpired token."""

    header: MatchedHeader = Field(
        default="X-Zd-Color",
        pattern=rf"^({TOKEN})?$",
        description="Request header naming a color or carrying a token; removed upstream.",
    )
    cookie: str = Field(
        default="zd_color", pattern=rf"^({TOKEN})?$", description="Cookie doing the same."
    )
    allow_networks: Networks = Field(
        default_factory=list, description="Clients (CIDR) whose plain color is honoured."
    )
    secret_file: str = Field(
        default="", description="File holding the token signing secret; read at load and reload."
    )
    secret: SecretStr = Field(
        default=SecretStr(""),
        description="The secret itself: set it from the environment (ZDPROXY_PREVIEW__SECRET).",
    )
    _file_secret: bytes = PrivateAttr(default=b"")

    @field_validator("secret_file")
    @classmethod
    def _readable(cls, value: str) -> str:
        if value:
            read_secret(value)
        return value

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if 0 < len(value.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes")
        return value

    @model_validator(mode="after")
    def _load_secret(self) -> PreviewSettings:
        if self.secret_file:
            self._file_secret = read_secret(self.secret_file)
        return self

    @property
    def signing_secret(self) -> bytes:
        """The HMAC secret (the environment's wins over the file's), or b"" for none."""
        return self.secret.get_secret_value().encode() or self._file_secret

    def policy(self, rollout_key: bytes = b"") -> PreviewPolicy:
        """The preview as the routing snapshot carries it, secret included: with no
        secret configured, the active rollout's own key (so that its verify hooks'
        tokens are honoured, and no other's)."""
        return PreviewPolicy(
            self.header,
            self.cookie,
            tuple(self.allow_networks),
            self.signing_secret or rollout_key,
        )
