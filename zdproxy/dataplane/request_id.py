"""Request ids (`proxy.request_id`): every request reaches the app with one
`X-Request-Id`, the client's own if it sent a usable one, else one made here; the
access log and zdproxy's own error replies carry it, so one id follows a request
through the client's report, zdproxy's log and the app's.

Made ids are a random prefix drawn once per process and a counter: unique across
restarts and workers without a system call per request, and 14 to 29 characters.
"""

from __future__ import annotations

import os
import re

from zdproxy.dataplane.http import H_REQUEST_ID

# The id in a request head as forwarded: zdproxy's own line with proxy.request_id, or
# else the client's, whatever its case.
_IN_HEAD = re.compile(rb"\r\nx-request-id:[ \t]*([^\r]*)", re.IGNORECASE)
# What a client's id may be: visible ASCII without spaces or commas (one id, not a
# list), at most 128 bytes; anything else is replaced, never forwarded or logged.
_USABLE = re.compile(rb"[!-+\--~]{1,128}")


class RequestIds:
    __slots__ = ("_made", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex().encode() + b"-"
        self._made = 0

    def take(self, captured: dict[int, bytes] | None) -> bytes:
        """The request's id: the client's, among the header fields the client connection
        captured, if it is usable, else a new one."""
        if captured is not None:
            sent = captured.get(H_REQUEST_ID)
            if sent is not None and _USABLE.fullmatch(sent):
                return sent
        self._made += 1
        return self._prefix + b"%x" % self._made


def request_id_in(head: bytes) -> bytes:
    """The X-Request-Id of a request head as forwarded, b"" if none: read back only where
    one is written (zdproxy's own error replies, the access log), never per request."""
    found = _IN_HEAD.search(head)
    return found[1] if found else b""
