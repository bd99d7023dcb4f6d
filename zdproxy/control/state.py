"""Runtime state: what was changed through the API on top of the config file, and
which of the two wins.

The rule, per item (a pool's members, the split, the salt, the pin rules, the
drain marks): **a journaled runtime change wins over the config file until the
file's own value for that item changes.** Each item records a digest of the
file's value when the change was made (its basis); at start and on every reload
an item whose basis no longer matches the file is dropped, and the file's new
value takes over. So a restart or crash never undoes an operator's change, and
an edit of the file is never silently ignored.

Every item's value is checked on load with the models the API takes it with
(`checked`): the journal is a file, and a file can say anything.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from zdproxy.config.overrides import PinSettings
from zdproxy.config.settings import (
    COLORS,
    Color,
    PoolMembers,
    Pools,
    PoolSettings,
    Settings,
    SplitSettings,
)
from zdproxy.control.journal import JournalItem
from zdproxy.control.phases import RolloutRecord
from zdproxy.routing.snapshot import BASIS_POINTS

KEYS = ("pools.blue", "pools.green", "split", "salt", "rules", "drained", "rollout")
RUNTIME_ONLY = ("drained", "rollout")  # no value in the file: never taken over by it

_PINS = TypeAdapter(list[PinSettings])


class JournaledSplit(BaseModel):
    """The split as journaled: which color is live and the candidate's share."""

    model_config = ConfigDict(extra="forbid")
    live: Color
    candidate_weight: int = Field(ge=0, le=BASIS_POINTS)


# The shapes the API takes each item's value in (salt and upstream ids as in
# admin/models.py: SplitChange.salt, Target.upstream).
_SALT = TypeAdapter(Annotated[str, Field(min_length=1, max_length=200)])
_DRAINED = TypeAdapter(list[Annotated[str, Field(min_length=1, max_length=300)]])


def checked(key: str, value: Any) -> Any:
    """A journaled item's value in its canonical JSON form, validated as the API validates
    it; ValueError (a pydantic.ValidationError, or an unknown key) if it does not fit."""
    if key in ("pools.blue", "pools.green"):
        return PoolMembers.model_validate(value).members()
    if key == "split":
        return JournaledSplit.model_validate(value).model_dump()
    if key == "salt":
        return _SALT.validate_python(value)
    if key == "rules":
        pins = _PINS.validate_python(value)
        return [pin.model_dump(mode="json", exclude_defaults=True) for pin in pins]
    if key == "drained":
        return sorted(set(_DRAINED.validate_python(value)))
    if key == "rollout":
        return RolloutRecord.model_validate(value).model_dump(mode="json")
    raise ValueError(f"unknown item (known: {', '.join(KEYS)})")


def file_value(config: Settings, key: str) -> Any:
    """The config file's own value of a journal item, in the item's JSON form."""
    if key.startswith("pools."):
        return config.pool(key.removeprefix("pools.")).members()
    if key == "split":
        return {"live": config.split.live, "candidate_weight": config.split.candidate_weight}
    if key == "salt":
        return config.split.salt
    if key == "rules":
        return [pin.model_dump(mode="json", exclude_defaults=True) for pin in config.pins]
    if key in RUNTIME_ONLY:
        return None
    raise KeyError(key)


def basis_of(config: Settings, key: str) -> str:
    text = json.dumps(file_value(config, key), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def item(config: Settings, key: str, value: Any, actor: str) -> JournalItem:
    """A new runtime change of `key`, based on the file's current value."""
    return JournalItem(value, basis_of(config, key), time.time(), actor)


def stale(config: Settings, items: Mapping[str, JournalItem]) -> list[str]:
    """Items the config file has taken over (its value changed since), or unknown keys."""
    return [
        key
        for key, entry in items.items()
        if key not in KEYS or (key not in RUNTIME_ONLY and entry.basis != basis_of(config, key))
    ]


def generated_salt(config: Settings) -> JournalItem | None:
    """A random salt to journal when the file sets none, so buckets survive restarts."""
    return None if config.split.salt else item(config, "salt", secrets.token_hex(16), "auto")


def overlay(config: Settings, items: Mapping[str, JournalItem]) -> Settings:
    """The config with the items' values in place, validated as the file would be.

    pydantic.ValidationError or ValueError when an item's value is not acceptable.
    """
    pools: dict[str, PoolSettings] = {color: config.pool(color) for color in COLORS}
    split_update: dict[str, Any] = {}
    pins = config.pins
    for key, entry in items.items():
        if key.startswith("pools."):
            color = key.removeprefix("pools.")
            members = PoolMembers.model_validate(entry.value)
            pools[color] = pools[color].model_copy(
                update={"upstreams": members.upstreams, "version": members.version}
            )
        elif key == "split":
            split_update.update(entry.value)
        elif key == "salt":
            split_update["salt"] = entry.value
        elif key == "rules":
            pins = _PINS.validate_python(entry.value)
    current = {name: getattr(config.split, name) for name in SplitSettings.model_fields}
    split = SplitSettings.model_validate({**current, **split_update})
    settings = config.model_copy(update={"pools": Pools(**pools), "split": split, "pins": pins})
    settings.check_consistency()
    return settings


def drained_of(items: Mapping[str, JournalItem]) -> set[str]:
    entry = items.get("drained")
    return set(entry.value) if entry is not None else set()
