"""Network addresses as operators write them: "host:port", "[::1]:port", "unix:/path".

A plain value type: the settings wrap it in a pydantic field (config/units.py),
the routing snapshot carries it to the data plane, which connects to it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint (host, port) or a unix socket path (host is None)."""

    host: str | None
    port: int = 0
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> Address:
        if not isinstance(text, str) or not text:
            raise ValueError("expected an address: host:port, [::1]:port or unix:/path")
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if not path.startswith("/"):
                raise ValueError(f"invalid address {text!r}: unix socket paths must be absolute")
            return cls(host=None, path=path)
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"invalid address {text!r}: expected [ipv6]:port")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"invalid address {text!r}: {host!r} is not IPv6") from None
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"invalid address {text!r}: expected host:port or unix:/path")
            if ":" in host:
                raise ValueError(f"invalid address {text!r}: write IPv6 hosts as [::1]:port")
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"invalid address {text!r}: port must be 0-65535")
        return cls(host=host, port=int(port_text))

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def is_loopback(self) -> bool:
        if self.is_unix:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host or "").is_loopback
        except ValueError:
            return False

    def reaches(self, listener: Address) -> bool:
        """Would connecting here reach `listener` (a socket bound there)? Host names are
        not resolved; a wildcard listener is reached on its port from any address."""
        if self.path is not None or listener.path is not None:
            return self.path == listener.path
        if self.port != listener.port:
            return False
        return (
            self.host == listener.host
            or listener.host in ("0.0.0.0", "::", "")
            or (self.is_loopback and listener.is_loopback)
        )

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"
