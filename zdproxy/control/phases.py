"""A rollout's phases, the moves between them, and the record that is journaled.

    preflight -> step (1..n) <-> paused -> baking -> finishing -> done

Every active phase may also end in rolled_back, aborted or failed, and a judged one
(step, paused, baking) in frozen. An ended rollout never moves again: `TRANSITIONS`
has no way out of an end.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from zdproxy.config.settings import Color

HISTORY = 100  # entries a record keeps (the events keep everything)


class Phase(StrEnum):
    PREFLIGHT = "preflight"
    STEP = "step"
    PAUSED = "paused"
    BAKING = "baking"
    FINISHING = "finishing"
    DONE = "done"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    FROZEN = "frozen"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        return self in ACTIVE

    @property
    def failed(self) -> bool:
        """Ended without the candidate going live for good."""
        return self in FAILED


ACTIVE = frozenset({Phase.PREFLIGHT, Phase.STEP, Phase.PAUSED, Phase.BAKING, Phase.FINISHING})
FAILED = frozenset({Phase.ROLLED_BACK, Phase.ABORTED, Phase.FROZEN, Phase.FAILED})
_ENDS = frozenset({Phase.ROLLED_BACK, Phase.ABORTED, Phase.FAILED})  # reachable from anywhere

TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PREFLIGHT: frozenset({Phase.STEP}) | _ENDS,
    Phase.STEP: frozenset({Phase.STEP, Phase.PAUSED, Phase.BAKING, Phase.FROZEN}) | _ENDS,
    Phase.PAUSED: frozenset({Phase.STEP, Phase.BAKING, Phase.FROZEN}) | _ENDS,
    Phase.BAKING: frozenset({Phase.FINISHING, Phase.FROZEN}) | _ENDS,
    Phase.FINISHING: frozenset({Phase.DONE}) | _ENDS,
    **{end: frozenset() for end in (Phase.DONE, *FAILED)},
}


class IllegalTransition(Exception):
    """A move the table does not allow: a bug, never an operator's mistake."""


def check_transition(before: Phase, after: Phase) -> None:
    if after not in TRANSITIONS[before]:
        raise IllegalTransition(f"{before} -> {after}")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HistoryEntry(_Record):
    time: float
    state: Phase
    step: int = Field(ge=0)
    reason: str = Field(max_length=4096)
    actor: Literal["api", "cli", "auto", "config", "fleet"]


class RolloutRecord(_Record):
    """What is journaled of a rollout: enough to resume an active one after a crash, and
    to answer for an ended one (`zdproxy wait --until done:ID`)."""

    id: int = Field(ge=1, description="Monotonic, never reused, kept across restarts.")
    candidate: Color
    previous: Color = Field(description="The live color it started from.")
    plan: str = Field(min_length=1, max_length=200)
    state: Phase = Phase.PREFLIGHT
    step: int = Field(default=0, ge=0, le=1000, description="1-based while stepping; 0 before.")
    reason: str = Field(default="", max_length=4096)
    hooks_done: list[str] = Field(default_factory=list, max_length=1000)
    history: list[HistoryEntry] = Field(default_factory=list, max_length=HISTORY)
