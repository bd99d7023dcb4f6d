"""Log lines to stderr, one per record, in the format `log.format` names:

- logfmt (the default), for people, `grep` and `journalctl`:

    ts=2026-11-26T22:38:19.123Z level=info logger=zdproxy.events msg="..." event=42 actor=cli

- json, one object per line, for log shippers:

    {"ts":"2026-11-26T22:38:19.123Z","level":"info","logger":"zdproxy.events","msg":"...",...}

Both carry the same fields in the same order: ts (RFC 3339, UTC), level, logger, msg,
then the record's structured fields (an event's kind and actor, an access log line's
status and upstream) and a traceback as `error`. Neither writes a control or
bidirectional character raw: whatever a client or a config file put in a value
cannot move a terminal's cursor or reorder what a reader sees.

Under systemd (JOURNAL_STREAM set) each line starts with its syslog priority, `<6>`,
which journald strips to file the line under its level. logfmt then leaves `ts` to
journald; json keeps it, so a shipper that reads the journal's MESSAGE still gets a
whole object.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Literal

LogFormat = Literal["logfmt", "json"]  # the values of `log.format`

# syslog priorities (sd-daemon.h) by logging level
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}

# Characters never written raw: C0 and C1 controls and DEL (a terminal obeys them), and
# the bidirectional controls (they reorder what a reader sees: "Trojan Source").
_CONTROLS = "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[{_CONTROLS}]")
# json.dumps escapes C0 itself but passes the rest through; lone surrogates (bytes
# decoded with surrogateescape) are escaped too, so every line is valid UTF-8.
_JSON_RAW = re.compile(f"[{_CONTROLS}\ud800-\udfff]")
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


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _json_value(value: Any) -> Any:
    """A field's value as JSON has it: numbers, booleans and null as they are, anything
    else (and inf or nan, which JSON cannot spell) as its text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return str(value)


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class _Formatter(logging.Formatter):
    """A record's fields, rendered by a subclass, with the journald priority prefix."""

    stamps_under_journald = False

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {}
        if self.stamps_under_journald or not self.journald:
            fields["ts"] = _timestamp(record)
        fields["level"] = record.levelname.lower()
        fields["logger"] = record.name
        fields["msg"] = record.getMessage()
        fields.update(getattr(record, "fields", {}))
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        line = self.render(fields)
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line

    def render(self, fields: dict[str, Any]) -> str:
        raise NotImplementedError


class LogfmtFormatter(_Formatter):
    def render(self, fields: dict[str, Any]) -> str:
        return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


class JsonFormatter(_Formatter):
    stamps_under_journald = True

    def render(self, fields: dict[str, Any]) -> str:
        values = {str(key): _json_value(value) for key, value in fields.items()}
        text = json.dumps(values, ensure_ascii=False, separators=(",", ":"))
        return _JSON_RAW.sub(_json_escape, text)  # raw only inside strings: escapes are valid


_FORMATTERS: dict[LogFormat, type[_Formatter]] = {
    "logfmt": LogfmtFormatter,
    "json": JsonFormatter,
}


def setup_logging(level: str, log_format: LogFormat = "logfmt") -> None:
    """At start: stderr becomes the one handler, logging from `level` up in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_FORMATTERS[log_format](journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def reconfigure_logging(level: str, log_format: LogFormat) -> None:
    """On a reload: the level, and the format of the handler setup_logging installed
    (a handler someone else added, such as a test's capture, keeps its own)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    wanted = _FORMATTERS[log_format]
    for handler in root.handlers:
        current = handler.formatter
        if isinstance(current, _Formatter) and type(current) is not wanted:
            handler.setFormatter(wanted(journald=current.journald))
