"""The desired state: the config file overlaid with the journaled runtime changes.

This is what the operator wants, kept apart from how the control plane runs it
(health, outliers, snapshots). Every change is validated as the file would be,
then journaled, then made current, all or nothing; control/state.py says which
of the file and the journal wins.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from zdproxy.config.loader import format_validation_error
from zdproxy.config.settings import COLORS, Settings
from zdproxy.control import state
from zdproxy.control.events import Actor, EventLog
from zdproxy.control.journal import Journal, JournalCorrupt, JournalItem
from zdproxy.routing.snapshot import BASIS_POINTS, upstream_id


class Refused(Exception):
    """A change that will not be made. Nothing changed."""

    def __init__(self, field: str, reason: str, status: int = 409) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.status = status


class DesiredState:
    def __init__(self, config: Settings, journal: Journal, events: EventLog) -> None:
        self.config = config  # the file, as last loaded
        self.settings = config  # the file overlaid with the journaled runtime changes
        self.items: dict[str, JournalItem] = {}
        self.drained: set[str] = set()  # upstream ids the operator took out of rotation
        self.journal = journal
        self.events = events

    def read_journal(self) -> dict[str, JournalItem]:
        """The journaled items. A journal that cannot be read is moved aside, with an
        event, and counts as empty."""
        try:
            return self.journal.load()
        except JournalCorrupt as exc:
            aside = self.journal.quarantine()
            self.events.emit(
                "journal_corrupt",
                f"{exc}; moved to {aside.name}, starting from the config file",
                level=logging.ERROR,
                path=str(aside),
            )
            return {}

    def take_config(
        self, config: Settings, items: dict[str, JournalItem] | None = None, *, reload: bool = False
    ) -> None:
        """Take a (re)loaded config file with the current (or given) journal items; the
        items whose file value changed give way to the file.

        On a reload, a file that the remaining runtime changes do not fit is refused
        (Refused; nothing changes). At start, the items that do not fit are dropped, one
        by one, with an event each: zdproxy starts.
        """
        items = dict(self.items if items is None else items)
        taken_over = state.stale(config, items)
        for key in taken_over:
            del items[key]
        if "salt" not in items and (salt := state.generated_salt(config)) is not None:
            items["salt"] = salt
        try:
            settings = state.overlay(config, items)
        except (ValidationError, ValueError) as exc:
            if reload:
                raise self._refusal(exc, "the runtime changes in the journal") from None
            items, settings = self._fitting(config, items)
        items = self._prune_drained(items, settings)
        for key in taken_over:
            self.events.emit(
                "config_takes_over",
                f"the config file's {key} changed; its value replaces the runtime one",
                actor="config",
                item=key,
            )
        if items != self.items:
            try:
                self._save(items)
            except Refused as exc:  # run on what we have; API changes will be refused
                self.events.emit("journal_unwritable", str(exc), level=logging.ERROR)
        self.config = config
        self._current(items, settings)

    @staticmethod
    def _prune_drained(items: dict[str, JournalItem], settings: Settings) -> dict[str, JournalItem]:
        """Drain marks go with their upstreams: one removed from the file and added back
        later starts fresh, not silently drained."""
        entry = items.get("drained")
        if entry is None:
            return items
        configured = {
            upstream_id(color, e.address)
            for color in COLORS
            for e in settings.pool(color).upstreams
        }
        kept = [uid for uid in entry.value if uid in configured]
        if kept == list(entry.value):
            return items
        return {**items, "drained": replace(entry, value=kept)}

    def _fitting(
        self, config: Settings, items: dict[str, JournalItem]
    ) -> tuple[dict[str, JournalItem], Settings]:
        """The items that fit the file, each tried in turn; the others are dropped with
        an event (the journal as it was is kept aside)."""
        aside = self._set_aside()
        kept: dict[str, JournalItem] = {}
        for key, entry in items.items():
            try:
                state.overlay(config, {**kept, key: entry})
            except (ValidationError, ValueError) as exc:
                self.events.emit(
                    "journal_rejected",
                    f"the journaled {key} does not fit the config file ({exc}); the file's "
                    "value applies" + (f" (the journal was kept as {aside})" if aside else ""),
                    level=logging.ERROR,
                    actor="config",
                    item=key,
                )
                continue
            kept[key] = entry
        if "salt" not in kept and (salt := state.generated_salt(config)) is not None:
            kept["salt"] = salt
        return kept, state.overlay(config, kept)

    def _set_aside(self) -> str:
        try:
            return self.journal.quarantine("rejected").name
        except OSError:
            return ""

    @staticmethod
    def _refusal(exc: ValidationError | ValueError, what: str) -> Refused:
        if isinstance(exc, ValidationError):
            field, _, reason = format_validation_error(exc)[0].partition(": ")
        else:
            field, _, reason = str(exc).partition(": ")
        return Refused(field, f"{reason} (with {what})" if what else reason, 400)

    def change(self, changes: dict[str, Any], actor: Actor, *, durable: bool = True) -> Settings:
        """Validate, journal and make current a set of items, all or none.

        `durable=False` is for a rollback: it happens even when the journal cannot be
        written (an event says so), because protecting users beats remembering it.
        """
        items = dict(self.items)
        for key, value in changes.items():
            items[key] = state.item(self.config, key, value, actor)
        try:
            settings = state.overlay(self.config, items)
        except (ValidationError, ValueError) as exc:
            raise self._refusal(exc, "") from None
        try:
            self._save(items)
        except Refused as exc:
            if durable:
                raise
            self.events.emit("journal_unwritable", str(exc), level=logging.ERROR)
        self._current(items, settings)
        return settings

    def share(self, color: str) -> int:
        """The color's share of the split, in basis points."""
        split = self.settings.split
        return (
            BASIS_POINTS - split.candidate_weight if color == split.live else split.candidate_weight
        )

    def _current(self, items: dict[str, JournalItem], settings: Settings) -> None:
        self.items = items
        self.settings = settings
        self.drained = state.drained_of(items)

    def _save(self, items: dict[str, JournalItem]) -> None:
        try:
            self.journal.save(items)
        except OSError as exc:
            raise Refused(
                "state.dir", f"cannot write the journal {self.journal.path}: {exc.strerror}", 503
            ) from None
