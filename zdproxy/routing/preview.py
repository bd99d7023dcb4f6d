"""Signed preview tokens: `COLOR.EXPIRY.SIG`, minted by `zdproxy preview-token`.

SIG is the unpadded urlsafe base64 of HMAC-SHA256(secret, b"COLOR.EXPIRY"), EXPIRY a
Unix time in seconds. A token carries no secret and every byte of it is safe in a
header or a cookie value, so a tester can paste it into either.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

PREVIEW_COLORS = (b"blue", b"green")

# Why a token was refused; the data plane counts these per reason.
FORGED = "forged"
EXPIRED = "expired"
MALFORMED = "malformed"

_MAX_EXPIRY_DIGITS = 12  # far beyond any real expiry; bounds int() on hostile input


def _signature(secret: bytes, message: bytes) -> bytes:
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=")


def mint_token(secret: bytes, color: str, expiry: int) -> str:
    """A token for `color` valid until the Unix time `expiry`."""
    message = f"{color}.{expiry}".encode()
    if color.encode() not in PREVIEW_COLORS:
        raise ValueError(f"{color!r} is not a color")
    return (message + b"." + _signature(secret, message)).decode()


def verify_token(secret: bytes | None, token: bytes, now: float) -> tuple[bytes | None, str]:
    """(color, "") for a valid token, else (None, the reason it was refused)."""
    color, _, rest = token.partition(b".")
    expiry, _, signature = rest.partition(b".")
    if (
        color not in PREVIEW_COLORS
        or not expiry.isdigit()
        or len(expiry) > _MAX_EXPIRY_DIGITS
        or not signature
    ):
        return None, MALFORMED
    if not secret:  # nothing to check a signature against: no token can be genuine
        return None, FORGED
    expected = _signature(secret, color + b"." + expiry)
    # Constant time, so the signature cannot be learnt byte by byte from response times.
    if not hmac.compare_digest(expected, signature):
        return None, FORGED
    if int(expiry) <= now:
        return None, EXPIRED
    return color, ""
