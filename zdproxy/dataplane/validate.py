"""The strictness llhttp leaves out: the request line's separators and the Host value.

llhttp (through httptools) accepts a run of spaces between the parts of a request
line and, in Host, any bytes a field value may hold. zdproxy writes its own request
line and Host to the upstream, so neither leniency reaches an app as such; but a
request that RFC 9112 makes a 400 must get that 400 here too, not be repaired and
served. Plain functions over bytes, cheap enough for every request.

Which request lines are checked: httptools tells no byte offsets, so zdproxy finds a
request line where a read begins with one (after any empty lines): every request of a
client that waits for each answer, the first of a pipelined batch, and a line that
spans reads (its SPs are counted across them). A request pipelined behind another in
the same read starts after that one's head and Content-Length body (framing.py finds
it, at the cost of a search only when one follows). Behind a chunked body, or one
that began in an earlier read, its start is not known: such a request is parsed as
llhttp parses it, and reaches the app with zdproxy's own single-spaced line.
"""

from __future__ import annotations

import re
from ipaddress import IPv6Address

from zdproxy.dataplane.http import Reject

LINE_DONE = -1  # line_spaces: the request line ended, and it was well formed
CR = 13
EMPTY_LINE = b"\r\n"  # the bytes of the empty lines a client may send before a request

# RFC 3986 3.2.2-3.2.3: host [":" port], where host is a reg-name (unreserved, sub-delims,
# pct-encoded; an IPv4 address is one too, as far as characters go) or an IP literal,
# whose address ipaddress checks. No IPvFuture: no app server could route one.
_HOST = re.compile(
    rb"(?:[-.\w~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+(?::[0-9]*)?"
    rb"|\[([0-9A-Fa-f:.]+)\](?::[0-9]*)?"
)
# The same for nearly every Host, a name or an IPv4 address without %-escapes: one
# character class, which the regex engine matches several times faster than _HOST.
_PLAIN_HOST = re.compile(rb"[-.\w~!$&'()*+,;=]+(?::[0-9]*)?")
# Hosts found valid. A site serves a few, so most checks are a set lookup; bounded (as
# http._STATUS_LINES) so that made-up hosts cannot grow it.
_KNOWN_HOSTS: set[bytes] = set()
_MAX_KNOWN_HOSTS = 1024


def valid_host(value: bytes) -> bool:
    """Whether a Host value, or the authority of an absolute-form target, is a host with
    an optional port. An empty one is not: an http URI must name a host (RFC 9110 4.2.1),
    so RFC 9112 3.2's "empty Host" applies to no request a reverse proxy serves."""
    if value in _KNOWN_HOSTS:
        return True
    if _PLAIN_HOST.fullmatch(value) is None:
        match = _HOST.fullmatch(value)
        if match is None:
            return False
        if match[1] is not None:
            try:
                IPv6Address(match[1].decode())
            except ValueError:
                return False
    if len(_KNOWN_HOSTS) < _MAX_KNOWN_HOSTS:
        _KNOWN_HOSTS.add(value)
    return True


def line_start(data: bytes, at: int) -> int:
    """Where the request line at `at` in `data` starts, after the empty lines a server
    ignores before a request (RFC 9112 2.2)."""
    while data[at] in EMPTY_LINE:
        at += 1
    return at


def line_spaces(data: bytes, start: int, counted: int) -> int:
    """Check the request line that starts at `start` in `data`, or goes on there after
    `counted` SPs in earlier reads. Returns LINE_DONE when it ends in `data`, else the
    SPs it has so far. Raises Reject once it has more than two: llhttp accepts a run of
    SPs between its three parts, and checks the parts themselves, which hold none, so
    counting is the whole check (RFC 9112 3: one SP each). Fewer than two llhttp refuses,
    or takes for HTTP/0.9, which gets 505."""
    end = data.find(b"\n", start)
    spaces = counted + (data.count(b" ", start) if end < 0 else data.count(b" ", start, end))
    if spaces > 2:
        raise Reject(400, "malformed request line: method, target and version take one space each")
    return spaces if end < 0 else LINE_DONE
