"""The state journal's file: one JSON document, replaced atomically on every change.

Write a temp file in the same directory, fsync it, rename it over the journal,
fsync the directory: after a crash at any moment the journal is either the old
document or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zdproxy.config.units import lone_surrogate

FORMAT = 1
TEMP_SUFFIX = ".tmp"


class JournalCorrupt(Exception):
    """The journal exists but cannot be used; the message says why."""


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


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, JournalItem]:
        """The journaled items; {} when there is no journal yet."""
        self._remove_leftovers()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise JournalCorrupt(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            document = json.loads(data.decode("utf-8"))
            if (where := lone_surrogate(document)) is not None:
                raise JournalCorrupt(f"{where} is not valid Unicode")
            if document.get("format") != FORMAT:
                raise JournalCorrupt(f"unknown format {document.get('format')!r}")
            return {
                key: JournalItem(
                    item["value"], str(item["basis"]), float(item["at"]), item["actor"]
                )
                for key, item in document["items"].items()
            }
        except JournalCorrupt:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise JournalCorrupt(f"not a journal: {exc!r}") from None

    def save(self, items: dict[str, JournalItem]) -> None:
        """Replace the journal with `items`, durably. OSError if the disk refuses."""
        document = {
            "format": FORMAT,
            "written": time.time(),
            "items": {key: item.to_dict() for key, item in sorted(items.items())},
        }
        data = json.dumps(document, indent=1).encode()
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}{TEMP_SUFFIX}")
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def quarantine(self, why: str = "corrupt") -> Path:
        """Move a journal aside (kept for a post-mortem) and return where it went."""
        stamp = time.strftime("%Y%m%dT%H%M%S") + f".{time.time_ns() % 10**9:09d}"
        aside = self.path.with_name(f"{self.path.name}.{why}-{stamp}")
        os.replace(self.path, aside)
        return aside

    def _remove_leftovers(self) -> None:
        """Temp files of a save that a crash interrupted: never the journal, only noise."""
        for leftover in self.path.parent.glob(f".{self.path.name}.*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)
