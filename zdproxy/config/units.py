"""Value types that config files spell as strings: durations, sizes and addresses.

Each parser accepts the spelling an operator would write ("500ms", "16KiB",
"[::1]:9001", "unix:/run/app.sock") and raises ValueError with the reason, which
pydantic turns into an error that names the field.
"""

from __future__ import annotations

import ipaddress
import math
import re
from decimal import Decimal, localcontext
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

# The plain type lives in routing, which must not import config; re-exported here.
from zdproxy.routing.address import Address as Address

# A duration is a bare number of seconds, or parts from the largest unit to the smallest,
# each unit at most once: "250ms", "1.5s", "90s", "2m30s", "1h30m", "7d".
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {
    "d": Decimal(86400),
    "h": Decimal(3600),
    "m": Decimal(60),
    "s": Decimal(1),
    "ms": Decimal("0.001"),
}
DURATION_FORMS = "a number of seconds, or e.g. '250ms', '1.5s', '90s', '2m30s', '1h30m', '7d'"
_DURATION_MAX_TEXT = 100  # characters: no duration needs more; a megabyte of digits is junk

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


# Upper bounds the settings use (each Field says which): past them a timer is a typo,
# and a huge or infinite one overflows the event loop's arithmetic or the kernel's.
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
KiB, MiB, GiB = 1024, 1024**2, 1024**3


def _shown(value: object) -> str:
    """The value as an error message quotes it: a whole megabyte of digits helps no one."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_duration(value: object) -> float:
    """Seconds from a number, or from a text of DURATION_FORMS ("1h30m", "250ms").

    The parts are summed in decimal, so a text reads back exactly as the float that
    format_duration wrote it from."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration: {DURATION_FORMS}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (total := _duration_text(value)) is not None:
        seconds = float(total)
    else:
        raise ValueError(f"invalid duration {_shown(value)}: expected {DURATION_FORMS}")
    if not math.isfinite(seconds):  # TOML spells inf and nan; a long digit string overflows
        raise ValueError(f"invalid duration {_shown(value)}: must be a finite number of seconds")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _duration_text(text: str) -> Decimal | None:
    """The seconds a duration text spells, exactly; None when it is no duration."""
    if len(text) > _DURATION_MAX_TEXT or not text.strip():
        return None
    units = list(_DURATION_UNITS)
    total, position, end = Decimal(0), 0, len(text.rstrip())
    with localcontext(prec=60):  # exact for every text of at most 100 characters
        while position < end:
            part = _DURATION_PART.match(text, position)
            if part is None or part.end() == position:
                return None
            number, unit = part.groups()
            if unit is None:  # a bare number: seconds, and nothing else in the text
                return Decimal(number) if position == 0 and part.end() >= end else None
            if unit not in units:  # a unit again, or after a smaller one: "30m1h"
                return None
            units = units[units.index(unit) + 1 :]
            total += Decimal(number) * _DURATION_UNITS[unit]
            position = part.end()
    return total


def parse_size(value: object) -> int:
    """Bytes from "16KiB", "100MiB", "1GB" or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '16KiB' or '10MiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise ValueError(f"invalid size {_shown(value)}: expected e.g. '16KiB', '10MiB' or 1048576")
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
    """The spelling an operator would write, and parse_duration reads back as the same
    float: "250ms", "1.5s", "2m30s", "1h30m", "30d"."""
    exact = Decimal(repr(float(seconds)))  # the shortest decimal that is this float
    if 0 < exact < 1:
        return f"{_decimal_text(exact * 1000)}ms"
    whole = int(exact)
    minutes, rest = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if rest or exact != whole or not parts:
        parts.append(f"{_decimal_text(rest + (exact - whole))}s")
    return "".join(parts)


def _decimal_text(number: Decimal) -> str:
    """Positional digits, no exponent, no trailing zeros: 30, 1.5, 0.01."""
    return format(number.normalize(), "f")


Duration = Annotated[
    float, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]
Size = Annotated[int, BeforeValidator(parse_size)]
Networks = Annotated[list[str], AfterValidator(check_networks)]  # CIDR, e.g. "10.0.0.0/8"


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
