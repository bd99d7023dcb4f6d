"""Request and response bodies beyond what llhttp does for us: trailer fields, the
declared size of a chunk, and the body of an Upgrade request.

- Trailers (RFC 9110 6.5, RFC 9112 7.1.2) are forwarded in the last chunk, both ways,
  except the fields that frame, route or authenticate a message: a recipient must not
  merge those into the head, and zdproxy writes the head's own.
- A chunk's size is not told by httptools; `declared_chunk` reads it back from the
  bytes of the read, so a chunk beyond `max_body_bytes` is refused when its size line
  arrives, not after its data did.
- httptools ends an Upgrade request at its head and calls the rest a tunnel, so the
  body of an Upgrade request (RFC 9110 7.8 lets it have one) is found here.
"""

from __future__ import annotations

import httptools

from zdproxy.dataplane.http import CRLF, LAST_CHUNK, Reject

# Fields never forwarded as trailers: framing, routing, the connection, and fields whose
# meaning is the head's (RFC 9110 6.5.1). Lower-case names.
NOT_TRAILERS = frozenset(
    {
        b"authorization",
        b"cache-control",
        b"connection",
        b"content-encoding",
        b"content-length",
        b"content-range",
        b"content-type",
        b"cookie",
        b"expect",
        b"host",
        b"keep-alive",
        b"max-forwards",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"set-cookie",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"www-authenticate",
    }
)


def last_chunk(fields: list[bytes]) -> bytes:
    """The last chunk with the trailer fields that may be forwarded (kept flat as
    http.SEP's comment describes: name, SEP, value, CRLF)."""
    kept = [
        b"".join(fields[i : i + 4])
        for i in range(0, len(fields), 4)
        if fields[i].lower() not in NOT_TRAILERS
    ]
    if not kept:
        return LAST_CHUNK
    return b"".join((b"0\r\n", *kept, CRLF))


def declared_chunk(data: bytes, end: int) -> int:
    """The size the chunk-size line ending (CRLF included) at `end` in `data` declares;
    0 if no such line ends there. llhttp has checked the line, so it is hex digits, then
    any extensions after ';'. A line that began in an earlier read is read from the
    start of `data`: fewer digits, a smaller size, never a refusal it did not earn."""
    if end < 2 or data[end - 2 : end] != CRLF:
        return 0
    start = data.rfind(b"\n", 0, end - 2) + 1
    digits = data[start : end - 2].partition(b";")[0]
    try:
        return int(digits, 16)
    except ValueError:  # not a chunk-size line (e.g. a trailer field): no size
        return 0


class UpgradeBody:
    """Finds where the body of an Upgrade request ends in the bytes that follow its head,
    and checks its framing and size, as the request parser would have. The bytes
    themselves are forwarded as the client sent them: the body's framing is the one
    the head declares, and after the body the bytes are the new protocol's."""

    __slots__ = ("_done", "_left", "_limit", "_parser", "_seen")

    def __init__(self, *, chunked: bool, length: int, limit: int) -> None:
        self._limit = limit  # max_body_bytes, 0 for none
        self._seen = 0
        self._done = False
        self._left = length
        self._parser: httptools.HttpRequestParser | None = None
        if chunked:
            # A parser of its own, for the chunks alone: the head only sets its framing.
            self._parser = httptools.HttpRequestParser(self)
            self._parser.feed_data(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")

    def split(self, data: bytes) -> int:
        """How many leading bytes of `data` are body; all of them (len(data)) while the
        body goes on, fewer once it ended in `data`. Raises httptools.HttpParserError for
        a framing error, Reject for a body over the limit."""
        parser = self._parser
        if parser is None:  # Content-Length: the next `_left` bytes
            body = min(self._left, len(data))
            self._left -= body
            self._done = not self._left
            return body
        # Chunked: a chunked body ends at an LF, so feeding up to each LF in turn tells
        # where. An Upgrade request with a chunked body is rare; its cost is its own.
        start = 0
        while not self._done:
            lf = data.find(b"\n", start)
            stop = len(data) if lf < 0 else lf + 1
            parser.feed_data(data[start:stop])
            start = stop
            if start == len(data):
                break
        return start

    @property
    def done(self) -> bool:
        return self._done

    # -- httptools callbacks of the chunk parser ----------------------------------------

    def on_body(self, body: bytes) -> None:
        self._seen += len(body)
        if self._limit and self._seen > self._limit:
            raise Reject(413, f"request body larger than {self._limit} bytes")

    def on_message_complete(self) -> None:
        self._done = True
