"""Value types that config files spell as strings: durations, sizes and addresses.

Each parser accepts the spelling an operator would write ("500ms", "16KiB",
"[::1]:9001", "unix:/run/app.sock") and raises ValueError with the reason, which
pydantic turns into an error that names the field.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    BeforeValidator,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
)
from pydantic_settings import NoDecode

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """Seconds from "500ms", "30s", "2m", "1h", "30d" or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '500ms' or '30s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: expected e.g. '500ms', '30s', '2m', '1h'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from "16KiB", "100MiB", "1GB" or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '16KiB' or '10MiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise ValueError(f"invalid size {value!r}: expected e.g. '16KiB', '10MiB' or 1048576")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def check_networks(values: list[str]) -> list[str]:
    for text in values:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not a network") from None
    return values


def format_duration(seconds: float) -> str:
    """The spelling parse_duration reads back: "250ms", "30s", "2592000s" (no exponent)."""
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


Duration = Annotated[
    float, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]
Size = Annotated[int, BeforeValidator(parse_size)]
Networks = Annotated[list[str], AfterValidator(check_networks)]  # CIDR, e.g. "10.0.0.0/8"


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


def _to_address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    return Address.parse(value)  # type: ignore[arg-type]


AddressField = Annotated[
    Address,
    NoDecode,  # an environment value is the address text, not JSON
    PlainValidator(_to_address),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["127.0.0.1:9001", "unix:/run/app.sock"]}),
]


MIN_SECRET_BYTES = 16  # an HMAC key or bearer token shorter than this is open to guessing


def read_secret(path: str) -> bytes:
    """A secret from a file (surrounding whitespace dropped); ValueError says why not."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{path} holds a secret shorter than {MIN_SECRET_BYTES} bytes")
    return secret


def lone_surrogate(value: object, path: str = "") -> str | None:
    """Where in a decoded JSON value a string is not valid Unicode (JSON can spell a lone
    surrogate, "\\ud800", which no UTF-8 encoder takes), or None."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return path or "(top level)"
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if (found := lone_surrogate(key, where) or lone_surrogate(item, where)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := lone_surrogate(item, f"{path}[{i}]")) is not None:
                return found
    return None
