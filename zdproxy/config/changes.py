"""What a reload would change, what it may not change, and its outcome for the caller.

One reload, three triggers (SIGHUP, a change of the file, `POST /v1/reload`): each
gets the same `ReloadOutcome`, which the admin API and `zdproxy reload` hand back
to scripts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from zdproxy.config.settings import Settings

# A field path as ConfigError lines begin: pools.blue.upstreams[0].address, "(top level)".
_FIELD = re.compile(r"^([\w\[\]\".-]+|\(top level\)): (.*)$", re.DOTALL)


@dataclass(frozen=True)
class FieldProblem:
    field: str  # dotted, as the file spells it: "admin.token_file"
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"

    @classmethod
    def parse(cls, line: str) -> FieldProblem:
        """From a "field: reason" line of ConfigError; a line about the file as a whole
        ("not valid TOML: ...", "cannot read the file: ...") is the field "(file)"."""
        if named := _FIELD.match(line):
            return cls(named[1], named[2])
        return cls("(file)", line)


@dataclass(frozen=True)
class ReloadOutcome:
    source: str  # the file read
    applied: bool
    changed: list[str] = field(default_factory=list)  # fields whose value changed
    needs_restart: list[str] = field(default_factory=list)  # of those, read only at start
    problems: list[FieldProblem] = field(default_factory=list)  # why it was refused
    # For the admin API: 400 for a file that is invalid on its own, 409 for one that
    # conflicts with the running zdproxy (its token, the journal's runtime changes).
    status: int = 200

    @property
    def result(self) -> str:
        if not self.applied:
            return "refused"
        return "applied" if self.changed else "unchanged"


def changed_fields(old: Settings, new: Settings) -> list[str]:
    """The dotted names of the options whose values differ, in file order. Secrets are
    compared by value, but only their names are listed."""
    changed = _differences(old.model_dump(mode="json"), new.model_dump(mode="json"), "")
    # model_dump masks secrets and skips what files they came from hold: compare those.
    secrets = {
        "admin.token": (old.admin.bearer_token, new.admin.bearer_token),
        "preview.secret": (old.preview.signing_secret, new.preview.signing_secret),
    }
    changed += [name for name, (a, b) in secrets.items() if a != b and name not in changed]
    return changed


def _differences(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict) and path.count(".") < 2:
        # Down to section.option (or pools.COLOR.option); deeper, the option is one value.
        found: list[str] = []
        for key in [*old, *(k for k in new if k not in old)]:
            found += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return found
    return [] if old == new else [path]


def reload_conflicts(running: Settings, new: Settings) -> list[FieldProblem]:
    """What a reload may not do to a running zdproxy, though the file is valid alone."""
    problems = []
    if running.admin.bearer_token and not new.admin.bearer_token:
        # Without a token every /v1 call answers 401: the running daemon could no longer
        # be steered, not even to put the token back. A restart may still drop it.
        problems.append(
            FieldProblem(
                "admin.token_file",
                "the running zdproxy has an admin token and this file gives none; a reload "
                "cannot remove it (restore admin.token_file, or restart to run without one)",
            )
        )
    return problems
