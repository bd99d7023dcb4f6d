"""The state journal's file: one JSON document, replaced atomically on every change.

Write a temp file in the same directory, fsync it, rename it over the journal,
fsync the directory: after a crash at any moment the journal is either the old
document or the new one, never a mix.

Loading trusts nothing: every item is checked on its own (its envelope here, its
value by the caller's `check`), and one that does not fit is reported and left out,
never the whole document. A document nested too deeply for json.loads is split into
its items without recursion, so that one deep item costs only itself.

A reserve file (`.state.json.reserve`) holds disk space for the writes that matter
most: a save that may spend it (`reserve=True`: a rollback's ended record) deletes it
on ENOSPC and tries once more. It is made again after the next save that has room.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zdproxy.config.units import lone_surrogate
from zdproxy.control.events import Actor

FORMAT = 1
TEMP_SUFFIX = ".tmp"
# Room for a rollback's journal write on a full disk: many times a journal's usual few
# KiB (a rollout record's history is the bulk; see RESERVE_FACTOR for big ones).
RESERVE_BYTES = 512 * 1024
RESERVE_FACTOR = 4  # the reserve is also at least this many times the last document
FULL = (errno.ENOSPC, errno.EDQUOT)
_WHITESPACE = " \t\n\r"

Check = Callable[[str, Any], Any]


class JournalCorrupt(Exception):
    """The journal exists but is not a journal at all; the message says why."""


class JournalUnreadable(Exception):
    """The journal exists but reading it failed (permissions, I/O error): it may be fine."""


@dataclass(frozen=True, slots=True)
class JournalItem:
    """One runtime change: its value, and the config file's own value for the same
    thing when the change was made (its digest), which decides precedence."""

    value: Any
    basis: str
    at: float
    actor: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "basis": self.basis, "at": self.at, "actor": self.actor}


@dataclass(frozen=True, slots=True)
class Rejected:
    """An item (or a field of the document) left out on load, and why."""

    key: str
    reason: str


@dataclass(slots=True)
class Loaded:
    items: dict[str, JournalItem] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)


class _Envelope(BaseModel):
    """An item as written by `JournalItem.to_dict`; its value is the caller's to check."""

    model_config = ConfigDict(extra="forbid")
    value: Any = Field()
    basis: str = Field(max_length=64)
    at: float = Field(allow_inf_nan=False)
    actor: Actor


def _any(key: str, value: Any) -> Any:
    return value


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.reserve = path.with_name(f".{path.name}.reserve")
        self._last_size = 0  # bytes of the last document read or written

    # -- reading ------------------------------------------------------------------------

    def load(self, check: Check = _any) -> Loaded:
        """The journaled items that fit, and what was left out; nothing when there is no
        journal yet. `check(key, value)` returns the value to keep (it may normalize it)
        or raises ValueError. JournalCorrupt when the file is not a journal at all,
        JournalUnreadable when it cannot be read."""
        self._remove_leftovers()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Loaded()
        except OSError as exc:
            raise JournalUnreadable(f"cannot read {self.path}: {exc.strerror}") from None
        self._last_size = len(data)
        try:
            raw, loaded = _document(data.decode("utf-8"))
        except JournalCorrupt:
            raise
        except (ValueError, IndexError, RecursionError) as exc:
            raise JournalCorrupt(f"not a journal: {exc!r}"[:500]) from None
        for key, entry in raw.items():
            try:
                envelope = _Envelope.model_validate(entry)
                if (where := lone_surrogate(envelope.value)) is not None:
                    raise ValueError(f"{where} is not valid Unicode")
                value = check(key, envelope.value)
            except ValidationError as exc:
                loaded.rejected.append(Rejected(key, _reason(exc)))
                continue
            except ValueError as exc:
                loaded.rejected.append(Rejected(key, str(exc)))
                continue
            except RecursionError:
                loaded.rejected.append(Rejected(key, "nested too deeply"))
                continue
            loaded.items[key] = JournalItem(value, envelope.basis, envelope.at, envelope.actor)
        return loaded

    def keep_aside(self, why: str) -> Path:
        """A copy of the journal as it is, for a post-mortem (a hard link: no disk space
        needed, and the journal itself stays until a save replaces it). OSError if
        neither a link nor a copy can be made."""
        stamp = time.strftime("%Y%m%dT%H%M%S") + f".{time.time_ns() % 10**9:09d}"
        aside = self.path.with_name(f"{self.path.name}.{why}-{stamp}")
        try:
            os.link(self.path, aside)
        except OSError as exc:
            if exc.errno in (errno.EROFS, *FULL):
                raise
            shutil.copy2(self.path, aside)  # a file system without hard links
        return aside

    # -- writing ------------------------------------------------------------------------

    def save(self, items: dict[str, JournalItem], *, reserve: bool = False) -> bool:
        """Replace the journal with `items`, durably; True when that took the reserve
        (only with `reserve`, on a full disk). OSError if the disk refuses."""
        document = {
            "format": FORMAT,
            "written": time.time(),
            "items": {key: item.to_dict() for key, item in sorted(items.items())},
        }
        data = json.dumps(document, indent=1).encode()
        spent = False
        try:
            self._write(data)
        except OSError as exc:
            if not (reserve and exc.errno in FULL and self._spend_reserve()):
                raise
            self._write(data)
            spent = True
        self._last_size = len(data)
        self.make_reserve()
        return spent

    def make_reserve(self) -> bool:
        """Make (or complete) the reserve file; False, quietly, when there is no room or
        the directory cannot be written: a later save tries again."""
        size = max(RESERVE_BYTES, RESERVE_FACTOR * self._last_size)
        try:
            if self.reserve.stat().st_size >= size:
                return True
        except OSError:
            pass
        try:
            fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            _allocate(fd, size)
            os.fsync(fd)
        except OSError:
            return False  # what was allocated stays held; the next try completes it
        finally:
            os.close(fd)
        return True

    @property
    def reserved(self) -> bool:
        """Is the reserve in place (a rollback's record can be written on a full disk)?"""
        try:
            return self.reserve.stat().st_size >= RESERVE_BYTES
        except OSError:
            return False

    def writable(self) -> str | None:
        """None if a file can be created in the journal's directory, else why not."""
        probe = self.path.with_name(f".{self.path.name}.{os.getpid()}{TEMP_SUFFIX}")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            probe.unlink()
        except OSError as exc:
            return f"cannot write in {self.path.parent}: {exc.strerror}"
        return None

    def _write(self, data: bytes) -> None:
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}{TEMP_SUFFIX}")
        try:
            with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
        except OSError:
            # A half-written temp file holds the very space a retry needs.
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _spend_reserve(self) -> bool:
        try:
            self.reserve.unlink()
        except OSError:
            return False
        return True

    def _remove_leftovers(self) -> None:
        """Temp files of a save that a crash interrupted: never the journal, only noise.
        A read-only directory keeps them (they are never read)."""
        for leftover in self.path.parent.glob(f".{self.path.name}.*{TEMP_SUFFIX}"):
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                return


def _allocate(fd: int, size: int) -> None:
    """Really take `size` bytes of disk (not a sparse file)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        block = bytes(64 * 1024)
        os.lseek(fd, 0, os.SEEK_SET)
        for _ in range(0, size, len(block)):
            os.write(fd, block)


def _reason(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def _document(text: str) -> tuple[dict[str, Any], Loaded]:
    """The raw items of a journal document, and the fields of the document left out."""
    loaded = Loaded()
    try:
        document = json.loads(text)
    except RecursionError:
        return _salvage(text, loaded)
    if not isinstance(document, dict):
        raise JournalCorrupt(f"not a journal: a JSON {type(document).__name__}")
    if document.get("format") != FORMAT:
        raise JournalCorrupt(f"unknown format {document.get('format')!r}"[:200])
    items = document.get("items")
    if not isinstance(items, dict):
        raise JournalCorrupt("not a journal: no items object")
    for key in document.keys() - {"format", "written", "items"}:
        loaded.rejected.append(Rejected(key, "not a field of the journal"))
    return items, loaded


def _salvage(text: str, loaded: Loaded) -> tuple[dict[str, Any], Loaded]:
    """Too deep for json.loads somewhere: parse each item on its own."""
    top = _members(text)
    try:
        if json.loads(top.get("format", "null")) != FORMAT:
            raise JournalCorrupt("unknown format")
    except RecursionError:
        raise JournalCorrupt("the format is nested too deeply") from None
    if "items" not in top:
        raise JournalCorrupt("not a journal: no items object")
    items: dict[str, Any] = {}
    for key, raw in _members(top["items"]).items():
        try:
            items[key] = json.loads(raw)
        except RecursionError:
            loaded.rejected.append(Rejected(key, "nested too deeply"))
    for key in top.keys() - {"format", "written", "items"}:
        loaded.rejected.append(Rejected(key, "not a field of the journal"))
    return items, loaded


def _members(text: str) -> dict[str, str]:
    """A JSON object's members, each value as its own text, found without recursion.
    ValueError (or IndexError, when cut short) if it is not an object."""
    pos = _skip(text, 0)
    if text[pos] != "{":
        raise ValueError("not a JSON object")
    members: dict[str, str] = {}
    pos = _skip(text, pos + 1)
    while text[pos] != "}":
        if text[pos] != '"':
            raise ValueError(f"a key expected at {pos}")
        end = _string_end(text, pos)
        key = json.loads(text[pos:end])
        pos = end
        pos = _skip(text, pos)
        if text[pos] != ":":
            raise ValueError(f"':' expected at {pos}")
        start = _skip(text, pos + 1)
        pos = _value_end(text, start)
        members[key] = text[start:pos]
        if text[pos] == ",":
            pos = _skip(text, pos + 1)
    return members


def _value_end(text: str, pos: int) -> int:
    """Where the value starting at `pos` ends: at the ',' or '}' that follows it."""
    depth = 0
    while True:
        char = text[pos]
        if char == '"':
            pos = _string_end(text, pos)
            continue
        if char in ",}" and depth == 0:
            return pos
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        pos += 1


def _string_end(text: str, pos: int) -> int:
    """Just after the JSON string that opens at `pos` (IndexError if it never closes)."""
    pos += 1
    while text[pos] != '"':
        pos += 2 if text[pos] == "\\" else 1
    return pos + 1


def _skip(text: str, pos: int) -> int:
    while text[pos] in _WHITESPACE:
        pos += 1
    return pos
