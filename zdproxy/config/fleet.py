"""`[fleet]`: the etcd cluster that fleet mode shares its desired state through.

Without `endpoints` (the default) fleet mode is off and nothing of it runs.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr, field_validator, model_validator

from zdproxy.config.section import Section
from zdproxy.config.units import Duration
from zdproxy.tls import client_context

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _host_name() -> str:
    return socket.gethostname().split(".")[0] or "zdproxy"


class FleetSettings(Section):
    """Fleet mode: the members behind one load balancer share the split, the salt, the
    pin rules and the rollout through etcd; one leader drives a rollout, and any member
    rolls the whole fleet back."""

    endpoints: list[str] = Field(
        default_factory=list,
        max_length=16,
        description='etcd client URLs ("http://10.0.0.5:2379", "https://..."); tried in '
        "turn. Empty (the default): fleet mode is off.",
    )
    prefix: str = Field(
        default="/zdproxy/default",
        min_length=2,
        max_length=200,
        description="The key prefix of this fleet in etcd: members with the same prefix "
        "are one fleet. Starts with /, no trailing /.",
    )
    name: str = Field(
        default_factory=_host_name,
        min_length=1,
        max_length=64,
        description="This member's name, unique in the fleet: letters, digits, - _ . "
        "Default: the host name.",
    )
    lease_ttl: int = Field(
        default=3,
        ge=2,
        le=60,
        description="Seconds (2-60) a member's lease lives without a keepalive: a dead "
        "leader is replaced, and a dead member leaves the fleet's status, this long after.",
    )
    publish_interval: Duration = Field(
        default=1.0,
        ge=0.1,
        le=60,
        description="How often a member publishes its own state (pools, health, versions, "
        "applied revision) to etcd, at most; 100ms to 1m.",
    )
    telemetry_interval: Duration = Field(
        default=0.25,
        ge=0.05,
        le=10,
        description="While a rollout runs, how often a member publishes its response "
        "records (counts and latency histograms per upstream) for the leader's judge of the "
        "whole fleet; 50ms to 10s. Nothing is published between rollouts.",
    )
    timeout: Duration = Field(
        default=2.0,
        gt=0,
        le=60,
        description="An etcd call that has no answer in this time tries the next endpoint; "
        "past the last, etcd counts as unavailable.",
    )
    ca_file: str = Field(
        default="", description="CA bundle that verifies etcd's certificate (https endpoints)."
    )
    cert_file: str = Field(
        default="", description="Client certificate for etcd (with key_file): mutual TLS."
    )
    key_file: str = Field(default="", description="The client certificate's private key.")
    username: str = Field(default="", max_length=128, description="etcd user (etcd auth).")
    password_file: str = Field(
        default="", description="File holding that user's password; read at start."
    )
    _password: str = PrivateAttr(default="")

    @property
    def enabled(self) -> bool:
        return bool(self.endpoints)

    @property
    def password(self) -> str:
        return self._password

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, endpoints: list[str]) -> list[str]:
        for i, url in enumerate(endpoints):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"[{i}]: {url!r} is not an etcd client URL (http://HOST:PORT or https://...)"
                )
            if parts.path not in ("", "/") or parts.query:
                raise ValueError(f"[{i}]: {url!r}: give the URL without a path")
        return [url.rstrip("/") for url in endpoints]

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"{prefix!r} must start with / and not end with /")
        return prefix

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if bad := sorted(set(name) - _NAME_CHARS):
            raise ValueError(f"{name!r} has {bad[0]!r}: use letters, digits, - _ .")
        return name

    @model_validator(mode="after")
    def _tls_and_auth(self) -> FleetSettings:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: a client certificate needs both cert_file and key_file")
        tls = any(url.startswith("https:") for url in self.endpoints)
        if (self.ca_file or self.cert_file) and not tls:
            field = "ca_file" if self.ca_file else "cert_file"
            raise ValueError(f"{field}: TLS files are set but no endpoint is https://")
        for field in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, field)
            if path and not Path(path).is_file():
                raise ValueError(f"{field}: {path} is not a readable file")
        if self.ca_file or self.cert_file:
            client_context(self.ca_file, self.cert_file, self.key_file)  # says which is unusable
        if bool(self.username) != bool(self.password_file):
            raise ValueError("username: etcd auth needs both username and password_file")
        if self.password_file:
            try:
                self._password = Path(self.password_file).read_text().strip()
            except OSError as exc:
                raise ValueError(
                    f"password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from None
            if not self._password:
                raise ValueError(f"password_file: {self.password_file} is empty")
        return self

    def key(self, *parts: str) -> str:
        """A key of this fleet: the prefix and `parts`, joined by /."""
        return "/".join((self.prefix, *parts))
