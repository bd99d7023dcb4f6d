"""The desired state: the config file overlaid with the journaled runtime changes.

This is what the operator wants, kept apart from how the control plane runs it
(health, outliers, snapshots). Every change is validated as the file would be,
then journaled, then made current, all or nothing; control/state.py says which
of the file and the journal wins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from zdproxy.config.loader import format_validation_error
from zdproxy.config.settings import COLORS, Settings
from zdproxy.control import state
from zdproxy.control.events import Actor, EventLog
from zdproxy.control.journal import Journal, JournalCorrupt, JournalItem, JournalUnreadable
from zdproxy.routing.snapshot import BASIS_POINTS, upstream_id

log = logging.getLogger("zdproxy.control")


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
        # What the journal file holds (None: unknown, or not a journal): a save is due
        # whenever the items differ from it.
        self._on_disk: dict[str, JournalItem] | None = {}
        # Set when the journal could not be read at start: no write may replace it.
        self._fault = ""
        self._aside = ""  # where the journal was kept for a post-mortem at this start
        self._behind = False  # a change was made in memory that the journal lacks
        # Fleet mode (control/shared.py): told of every change; may refuse one (etcd away).
        self.on_change: Callable[[], None] = lambda: None
        self.refusal: Callable[[dict[str, Any], Actor], str | None] = lambda changes, actor: None

    @property
    def stale(self) -> bool:
        """The running state is ahead of the journal (a rollback's write failed): a
        restart now would come back to the journal's older state."""
        return self._behind

    def read_journal(self) -> dict[str, JournalItem]:
        """The journaled items that fit their models; each one left out is reported with
        an event (`journal_rejected`), the journal as it was is kept aside. A journal that
        is not one at all counts as empty (`journal_corrupt`); one that cannot be read
        counts as empty too, and is never overwritten (`journal_unreadable`)."""
        try:
            loaded = self.journal.load(state.checked)
        except JournalUnreadable as exc:
            self._fault = f"{exc}; changes are refused so that it is not overwritten"
            self._on_disk = None
            self.events.emit(
                "journal_unreadable",
                f"{exc}: starting from the config file; fix it and restart",
                level=logging.ERROR,
                path=str(self.journal.path),
            )
            return {}
        except JournalCorrupt as exc:
            self._on_disk = None  # garbage: the first save replaces it
            aside = self._keep_aside("corrupt")
            self.events.emit(
                "journal_corrupt",
                f"{exc}; {self._kept(aside)}, starting from the config file",
                level=logging.ERROR,
                path=str(aside or self.journal.path),
            )
            self._check_writable()
            return {}
        if loaded.rejected:
            self._on_disk = None
            aside = self._keep_aside("rejected")
            for rejected in loaded.rejected:
                self.events.emit(
                    "journal_rejected",
                    f"the journaled {rejected.key} is not valid ({rejected.reason}); it is "
                    f"left out, the rest of the journal applies; {self._kept(aside)}",
                    level=logging.ERROR,
                    actor="config",
                    item=rejected.key,
                )
        else:
            self._on_disk = dict(loaded.items)
        self._check_writable()
        return loaded.items

    def _check_writable(self) -> None:
        """Say at start, not at the first change, that the state dir takes no writes;
        and lay the reserve (journal.py) while there is room."""
        if (fault := self.journal.writable()) is not None:
            self.events.emit(
                "journal_unwritable",
                f"state.dir: {fault}: traffic is served, changes through the API are "
                "refused (503) until it is fixed",
                level=logging.ERROR,
            )
        elif not self.journal.make_reserve():
            self.events.emit(
                "journal_reserve_missing",
                f"state.dir: no room for the reserve file {self.journal.reserve.name}: a "
                "rollback on a full disk may not be journaled",
                level=logging.WARNING,
            )

    def _keep_aside(self, why: str) -> str:
        if not self._aside:
            try:
                self._aside = str(self.journal.keep_aside(why))
            except OSError as exc:
                log.error("cannot keep %s aside: %s", self.journal.path, exc.strerror)
        return self._aside

    def _kept(self, aside: str) -> str:
        return (
            f"the journal as it was is kept as {aside}"
            if aside
            else f"{self.journal.path} could not be copied aside"
        )

    def take_config(
        self,
        config: Settings,
        items: dict[str, JournalItem] | None = None,
        *,
        reload: bool = False,
        hold: tuple[str, ...] = (),
    ) -> None:
        """Take a (re)loaded config file with the current (or given) journal items; the
        items whose file value changed give way to the file.

        On a reload, a file that the remaining runtime changes do not fit is refused
        (Refused; nothing changes). At start, the items that do not fit are dropped, one
        by one, with an event each: zdproxy starts.

        Items in `hold` keep their journaled (else running) value even if the file changed
        it, at a reload as at start (a rollout holds the split); they are based on the new
        file, whose value thus gives way.
        """
        items = dict(self.items if items is None else items)
        held = []
        for key in hold:
            entry = items.get(key)
            basis = state.basis_of(config, key)
            if entry is not None and entry.basis != basis:
                items[key] = state.item(config, key, entry.value, "auto")
                held.append(key)
            elif entry is None and basis != state.basis_of(self.settings, key):
                items[key] = state.item(config, key, state.file_value(self.settings, key), "auto")
                held.append(key)
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
        for key in held:
            self.events.emit(
                "config_held",
                f"the config file's {key} changed, but a rollout holds it: everything else "
                "of the file applies; the rollout keeps the split",
                actor="config",
                item=key,
            )
        for key in taken_over:
            self.events.emit(
                "config_takes_over",
                f"the config file's {key} changed; its value replaces the runtime one",
                actor="config",
                item=key,
            )
        if items != self._on_disk:
            try:
                self._save(items, reserve=False)
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
        aside = self._keep_aside("rejected")
        kept: dict[str, JournalItem] = {}
        for key, entry in items.items():
            try:
                state.overlay(config, {**kept, key: entry})
            except (ValidationError, ValueError) as exc:
                self.events.emit(
                    "journal_rejected",
                    f"the journaled {key} does not fit the config file ({exc}); the file's "
                    f"value applies; {self._kept(aside)}",
                    level=logging.ERROR,
                    actor="config",
                    item=key,
                )
                continue
            kept[key] = entry
        if "salt" not in kept and (salt := state.generated_salt(config)) is not None:
            kept["salt"] = salt
        return kept, state.overlay(config, kept)

    @staticmethod
    def _refusal(exc: ValidationError | ValueError, what: str) -> Refused:
        if isinstance(exc, ValidationError):
            field, _, reason = format_validation_error(exc)[0].partition(": ")
        else:
            field, _, reason = str(exc).partition(": ")
        return Refused(field, f"{reason} (with {what})" if what else reason, 400)

    def change(self, changes: dict[str, Any], actor: Actor, *, durable: bool = True) -> Settings:
        """Validate, journal and make current a set of items, all or none.

        `durable=False` is for a rollback (an ended rollout's record): it happens even
        when the journal cannot be written, because protecting users beats remembering
        it. It may spend the reserve file on a full disk; if the write fails still, a
        `journal_stale` event says that a restart would come back to the older state.
        """
        if (why := self.refusal(changes, actor)) is not None:
            raise Refused("fleet", why, 503)
        items = dict(self.items)
        for key, value in changes.items():
            items[key] = state.item(self.config, key, value, actor)
        try:
            settings = state.overlay(self.config, items)
        except (ValidationError, ValueError) as exc:
            raise self._refusal(exc, "") from None
        try:
            self._save(items, reserve=not durable)
        except Refused as exc:
            if durable:
                raise
            self.events.emit(
                "journal_stale",
                f"{exc}: {', '.join(sorted(changes))} changed in memory only; a restart "
                "now would come back to the journal's older state",
                level=logging.ERROR,
                items=sorted(changes),
            )
            self._behind = True
        self._current(items, settings)
        return settings

    def flush(self) -> bool:
        """Write a stale journal again (the reserve may be spent); True when the journal
        holds the running state. For a caller that retries after a failed rollback write."""
        if not self.stale:
            return True
        try:
            self._save(self.items, reserve=True)
        except Refused:
            return False
        return True

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
        self.on_change()

    def _save(self, items: dict[str, JournalItem], *, reserve: bool) -> None:
        """Journal `items`; Refused (503, naming the fault) when the disk refuses."""
        if self._fault:
            raise Refused("state.dir", self._fault, 503)
        try:
            spent = self.journal.save(items, reserve=reserve)
        except OSError as exc:
            raise Refused(
                "state.dir", f"cannot write the journal {self.journal.path}: {exc.strerror}", 503
            ) from None
        self._on_disk = dict(items)
        if spent:
            self.events.emit(
                "journal_reserve_spent",
                f"state.dir: the disk is full; the reserve file was spent to journal "
                f"{', '.join(sorted(items))}: free some space (it is laid again then)",
                level=logging.ERROR,
            )
        if self._behind:
            self._behind = False
            self.events.emit("journal_caught_up", "the journal holds the running state again")
