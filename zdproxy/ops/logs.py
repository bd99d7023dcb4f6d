"""Log lines in one format, logfmt, to stderr:

    ts=2026-11-26T22:38:19.123Z level=info logger=zdproxy.events msg="split_changed: ..."

Fields after `msg` (an event's kind and actor, an access log line's status and
upstream) are key=value too, so `grep`, `journalctl` and log shippers all read
them. Under systemd (JOURNAL_STREAM set) each line starts with its syslog priority,
`<6>`, so journald files it under the right level, and `ts` is left to journald.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

# syslog priorities (sd-daemon.h) by logging level
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


# Characters never written raw: C0 and C1 controls and DEL (a terminal obeys them), and
# the bidirectional controls (they reorder what a reader sees: "Trojan Source").
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def _value(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and not _CONTROL.search(text):
        return text
    escaped = _CONTROL.sub(_escape, text.replace("\\", "\\\\").replace('"', '\\"'))
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {}
        if not self.journald:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            fields["ts"] = f"{stamp}.{int(record.msecs):03d}Z"
        fields["level"] = record.levelname.lower()
        fields["logger"] = record.name
        fields["msg"] = record.getMessage()
        fields.update(getattr(record, "fields", {}))
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        line = " ".join(f"{key}={_value(value)}" for key, value in fields.items())
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


def set_level(level: str) -> None:
    """The level of every zdproxy logger, changed by a reload of the config."""
    logging.getLogger().setLevel(level.upper())
