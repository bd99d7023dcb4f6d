"""Which side of the split a request belongs to: its sticky bucket.

bucket = blake2b(key, key=salt) mod 10000, and the request goes to the candidate
when its bucket is below the candidate's weight. A user's bucket never changes,
so raising the weight only ever moves users from live to candidate, and lowering
it only moves them back. The hash is computed only while the split is fractional.
"""

from __future__ import annotations

import secrets
from hashlib import blake2b

from zdproxy.routing.snapshot import BASIS_POINTS, StickyPolicy

KEY_BUCKET_COOKIE, KEY_CLIENT_IP, KEY_COOKIE, KEY_HEADER = range(4)


def bucket_of(salt: bytes, key: bytes) -> int:
    digest = blake2b(key, digest_size=8, key=salt[:64]).digest()
    return int.from_bytes(digest, "big") % BASIS_POINTS


class Steering:
    """The sticky policy of one snapshot, compiled for the hot path."""

    __slots__ = (
        "_buckets",
        "_cookie",
        "_kind",
        "_name",
        "_salt",
        "_set_cookie",
        "active",
        "header",
        "reads_cookies",
    )

    def __init__(self, policy: StickyPolicy, fractional: bool) -> None:
        self.active = fractional  # only a fractional split needs buckets
        kind, _, name = policy.key.partition(":")
        self._kind = {
            "bucket-cookie": KEY_BUCKET_COOKIE,
            "client-ip": KEY_CLIENT_IP,
            "cookie": KEY_COOKIE,
            "header": KEY_HEADER,
        }[kind]
        self._name = name.encode()
        # The request header the client connection must capture for us, if any.
        self.header = name.lower().encode() if self._kind == KEY_HEADER else None
        # The Cookie header is read for a cookie key, and for the bucket cookie, which
        # every key but the client's address falls back to.
        self.reads_cookies = self._kind != KEY_CLIENT_IP
        self._salt = policy.salt.encode()
        self._buckets: dict[bytes, int] = {}  # a user's requests hash their key once
        self._cookie = policy.bucket_cookie.encode()
        self._set_cookie = b"Set-Cookie: %s=%%s; Path=/; Max-Age=%d; HttpOnly; SameSite=Lax\r\n" % (
            self._cookie,
            policy.bucket_cookie_max_age,
        )

    def bucket(
        self, peer_ip: bytes, cookies: dict[bytes, bytes], header: bytes | None
    ) -> tuple[int, bytes]:
        """(bucket, Set-Cookie header line or b"") for one request."""
        kind = self._kind
        if kind == KEY_CLIENT_IP:
            return self._bucket_of(peer_ip), b""
        key: bytes | None = None
        if kind == KEY_HEADER:
            key = header
        elif kind == KEY_COOKIE:
            key = cookies.get(self._name) or None  # an empty value is no key
        if key is not None:
            return self._bucket_of(key), b""
        token = cookies.get(self._cookie) or None
        if token is not None:
            return self._bucket_of(token), b""
        token = secrets.token_hex(12).encode()
        return bucket_of(self._salt, token), self._set_cookie % token

    def _bucket_of(self, key: bytes) -> int:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= 16384:  # bounded: start over rather than grow
                self._buckets.clear()
            bucket = self._buckets[key] = bucket_of(self._salt, key)
        return bucket
