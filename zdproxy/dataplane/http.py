"""HTTP/1.1 vocabulary shared by both sides of the proxy: header classes and canned replies."""

from __future__ import annotations

from http import HTTPStatus

CRLF = b"\r\n"

# Headers that describe one connection, not the message (RFC 9110 7.6.1); never forwarded.
# Each maps to a code so that on_header does one dict lookup per header.
H_CONNECTION = 1
H_DROP = 2  # keep-alive, proxy-connection, te
H_TRANSFER_ENCODING = 3
H_UPGRADE = 4
H_CONTENT_LENGTH = 5
H_HOST = 6
H_EXPECT = 7
H_X_FORWARDED_FOR = 8
H_X_FORWARDED_PROTO = 9
H_X_FORWARDED_HOST = 10
H_COOKIE = 11
H_IDEMPOTENCY_KEY = 12  # makes any method safe to retry (draft-ietf-httpapi-idempotency-key)
H_STICKY = 13  # the header the sticky policy hashes (configured, so added per snapshot)
# Credentials for a proxy, not the app (RFC 9110 11.7.4): forwarded only if configured.
H_PROXY_AUTHORIZATION = 14
# With proxy.request_id, captured and replaced by zdproxy's own line (request_id.py);
# else forwarded as it came.
H_REQUEST_ID = 15
# Configured per snapshot too: the preview header (captured, never forwarded), then the
# headers pin rules read (captured and forwarded), H_PIN + i for the i-th such header.
H_PREVIEW = 16
H_PIN = 17

# Framing and hop-by-hop fields: what both directions interpret.
RESPONSE_HEADERS: dict[bytes, int] = {
    b"connection": H_CONNECTION,
    b"keep-alive": H_DROP,
    b"proxy-connection": H_DROP,
    b"te": H_DROP,
    b"transfer-encoding": H_TRANSFER_ENCODING,
    b"upgrade": H_UPGRADE,
    b"content-length": H_CONTENT_LENGTH,
}

REQUEST_HEADERS: dict[bytes, int] = {
    **RESPONSE_HEADERS,
    b"host": H_HOST,
    b"expect": H_EXPECT,
    b"x-forwarded-for": H_X_FORWARDED_FOR,
    b"x-forwarded-proto": H_X_FORWARDED_PROTO,
    b"x-forwarded-host": H_X_FORWARDED_HOST,
    b"cookie": H_COOKIE,
    b"idempotency-key": H_IDEMPOTENCY_KEY,
    b"proxy-authorization": H_PROXY_AUTHORIZATION,
    b"x-request-id": H_REQUEST_ID,
}

# Connection options that are about this hop only and name no header to strip.
CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


# Connection values that name no header: nothing to parse.
PLAIN_CONNECTION_VALUES = frozenset({b"keep-alive", b"close", b"upgrade"})


def connection_tokens(value: bytes) -> list[bytes]:
    return [token.strip().lower() for token in value.split(b",") if token.strip()]


# Header fields are kept flat, four items a field: name, b": ", value, CRLF. Appending
# them is cheaper than formatting a line per field; one join builds the whole head.
SEP = b": "


def strip_named_headers(fields: list[bytes], names: set[bytes]) -> list[bytes]:
    """Remove the fields whose names a Connection header listed (rare, so not hot)."""
    kept: list[bytes] = []
    for i in range(0, len(fields), 4):
        if fields[i].lower() not in names:
            kept.extend(fields[i : i + 4])
    return kept


NO_COOKIES: dict[bytes, bytes] = {}


def parse_cookies(header: bytes) -> dict[bytes, bytes]:
    """Cookie name -> value (quotes stripped) from a Cookie header; the first of a
    repeated name wins, as browsers send the most specific cookie first."""
    cookies: dict[bytes, bytes] = {}
    for part in header.split(b";"):
        name, sep, value = part.strip().partition(b"=")
        if sep:
            cookies.setdefault(name, value.strip().strip(b'"'))
    return cookies


def origin_form(
    method: bytes, url: bytes, lines: list[bytes]
) -> tuple[bytes, list[bytes], bytes | None]:
    """A request target that is not a path: "*" for OPTIONS, or an absolute form (RFC 9112
    3.2), made (path, header fields, its authority); any other target is refused."""
    if url == b"*" and method == b"OPTIONS":
        return url, lines, None
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise Reject(400, "invalid request target")
    # The authority ends where the path begins, or the query of an empty path (RFC 3986 3).
    ends = [i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0]
    cut = min(ends) if ends else len(rest)
    authority, path = rest[:cut], rest[cut:]
    if not authority:
        raise Reject(400, "invalid request target")
    # The target's authority replaces any Host header (RFC 9112 3.2.2).
    lines = strip_named_headers(lines, {b"host"})
    lines.extend((b"Host", SEP, authority, CRLF))
    return path if path[:1] == b"/" else b"/" + path, lines, authority


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def status_line(status: int, reason: bytes) -> bytes:
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % key
        if len(_STATUS_LINES) < 256:  # reason phrases are the upstream's: bound the cache
            _STATUS_LINES[key] = line
    return line


def error_response(status: int, detail: str, *, close: bool, request_id: bytes = b"") -> bytes:
    """A short plain-text reply zdproxy writes itself, saying which failure happened."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {detail}\n".encode()
    return b"".join(
        (
            status_line(status, phrase.encode()),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Cache-Control: no-store\r\n",
            b"X-Request-Id: %s\r\n" % request_id if request_id else b"",
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )


CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class Reject(Exception):
    """Raised inside a parser callback: answer `status` with `detail` and close the connection."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
