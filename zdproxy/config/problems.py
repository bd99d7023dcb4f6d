"""What is wrong with a config, in an operator's words: the field at fault, the rule it
breaks (never a regex), the option a misspelt key was meant to be, and, for a value
from the environment, the variable that set it.

`Settings` takes its values from the file and from `ZDPROXY_<SECTION>__<OPTION>`
variables (pydantic-settings: the prefix, "__" between the levels, names in any
case; a whole section, a list or a table is given as JSON). A value from a variable
is the variable's fault, not the file's: its problem is named after the variable.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from zdproxy.config.overrides import TOKEN
from zdproxy.config.settings import STICKY_KEY
from zdproxy.config.spelling import did_you_mean

Loc = tuple[int | str, ...]

ENV_PREFIX = "ZDPROXY_"
ENV_NESTING = "__"

# The rule each pattern of the settings states, for its error: a regex is no message.
_TOKEN_WORDS = "letters, digits and !#$%&'*+-.^_`|~, no spaces"
PATTERN_WORDS = {
    rf"^{TOKEN}$": f"must be an HTTP token ({_TOKEN_WORDS})",
    rf"^({TOKEN})?$": f"must be an HTTP token ({_TOKEN_WORDS}), or empty",
    STICKY_KEY: "must be bucket-cookie, client-ip, cookie:NAME or header:NAME (NAME an HTTP token)",
}

# A check that spans fields names the one at fault first: "listen: 0.0.0.0:9901 is ...".
_NAMED = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.+)$", re.DOTALL)
_PART = re.compile(r"[^.\[\]]+|\[(\d+)\]")


@dataclass(frozen=True)
class Problem:
    """One problem: where (pydantic's location, down to the field at fault) and why. An
    unknown key has `known`, the names allowed in its place, for "did you mean"."""

    loc: Loc
    message: str
    unknown_key: bool = False
    known: tuple[str, ...] = ()

    @property
    def field(self) -> str:
        return dotted(self.loc)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}{self._hint(self.known)}"

    def from_variable(self, variable: Override) -> str:
        """The problem as the variable's, not the file's: a misspelt variable is offered
        the variable it was meant to be."""
        known = self.known
        if self.unknown_key and self.loc == variable.path:
            level = variable.name[: variable.name.upper().rfind(ENV_NESTING) + len(ENV_NESTING)]
            known = tuple(f"{level}{name}".upper() for name in known)
            hint = self._hint(known, variable.name.upper())
        else:
            hint = self._hint(known)
        return f"{variable.name}: {self.message}{hint} (from the environment, for {self.field})"

    def _hint(self, known: tuple[str, ...], word: str = "") -> str:
        if not self.unknown_key:
            return ""
        return did_you_mean(word or str(self.loc[-1]), known) or " (check the spelling)"


def dotted(loc: Loc) -> str:
    """A location as the file spells it: pools.blue.upstreams[0].address."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(top level)"


def validation_problems(
    exc: ValidationError, model: type[BaseModel] | None = None
) -> list[Problem]:
    """Each error of a validation; with the `model` validated, unknown keys come with the
    names allowed in their place."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = _fields(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            table = isinstance(error.get("input"), dict)
            message = "unknown section" if table else "unknown option"
            known = options_at(model, loc) if model is not None else ()
            problems.append(Problem(loc, message, unknown_key=True, known=known))
            continue
        if error["type"] == "missing":
            message = "required, and not given"
        elif error["type"] == "string_pattern_mismatch":
            pattern = str((error.get("ctx") or {}).get("pattern", ""))
            message = PATTERN_WORDS.get(
                pattern, f"does not have the form this option takes ({pattern})"
            )
        elif named := _NAMED.match(message):
            loc, message = (*loc, *_parts(named[1])), named[2]
        problems.append(Problem(loc, message))
    return problems


def _fields(loc: tuple[int | str, ...]) -> Loc:
    # pydantic names union branches and validators in a location: they are no fields.
    return tuple(
        item
        for item in loc
        if isinstance(item, int)
        or not (item.startswith("function-") or item in ("str", "dict[str,any]"))
    )


def _parts(path: str) -> Loc:
    """ "pins[0].header" -> ("pins", 0, "header")."""
    return tuple(int(m[1]) if m[1] else m[0] for m in _PART.finditer(path))


# -- the model's own names ----------------------------------------------------------------


def options_at(model: type[BaseModel], loc: Loc) -> tuple[str, ...]:
    """The names a table may hold where the last key of `loc` stands."""
    types_here: list[Any] = [model]
    for key in loc[:-1]:
        types_here = [inner for kind in types_here for inner in _step(kind, key)]
    return tuple(
        sorted({name for kind in types_here for m in _models(kind) for name in m.model_fields})
    )


def _step(kind: Any, key: int | str) -> Iterator[Any]:
    """The types a value of `kind` holds under `key`."""
    for member in _members(kind):
        if isinstance(member, type) and issubclass(member, BaseModel):
            if isinstance(key, str) and key in member.model_fields:
                yield member.model_fields[key].annotation
        elif get_origin(member) in (list, tuple, set, frozenset) and isinstance(key, int):
            yield from (arg for arg in get_args(member) if arg is not Ellipsis)
        elif get_origin(member) is dict and isinstance(key, str):
            yield get_args(member)[1]


def _members(kind: Any) -> Iterator[Any]:
    """A type, with Annotated and unions (Optional too) taken apart."""
    origin = get_origin(kind)
    if origin is Annotated:
        yield from _members(get_args(kind)[0])
    elif origin in (Union, types.UnionType):
        for arg in get_args(kind):
            yield from _members(arg)
    else:
        yield kind


def _models(kind: Any) -> Iterator[type[BaseModel]]:
    for member in _members(kind):
        if isinstance(member, type) and issubclass(member, BaseModel):
            yield member


def json_kind(model: type[BaseModel], path: Loc) -> str | None:
    """What the option at `path` holds when it is given as JSON from the environment: a
    "section", a "list" or a "table"; None for a plain value."""
    kinds: list[Any] = [model]
    for key in path:
        kinds = [inner for kind in kinds for inner in _step(kind, key)]
    for member in (m for kind in kinds for m in _members(kind)):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return "section"
        if get_origin(member) in (list, tuple, set, frozenset):
            return "list"
        if get_origin(member) is dict:
            return "table"
    return None


# -- the environment ----------------------------------------------------------------------


@dataclass(frozen=True)
class Override:
    """A ZDPROXY_* variable and the option it sets."""

    name: str  # as it is spelt in the environment
    path: tuple[str, ...]  # ("proxy", "listen")
    value: str

    def holds(self, loc: Loc) -> bool:
        """Does this variable's value reach `loc`? Its own option, or a key inside a
        JSON value (ZDPROXY_PROXY='{"listen": ...}' reaches proxy.listen)."""
        if loc[: len(self.path)] != self.path:
            return False
        rest = loc[len(self.path) :]
        if not rest:
            return True
        try:
            value: Any = json.loads(self.value)
        except ValueError:
            return False
        for key in rest:
            in_table = isinstance(value, dict) and isinstance(key, str) and key in value
            in_list = isinstance(value, list) and isinstance(key, int) and key < len(value)
            if not (in_table or in_list):
                return False
            value = value[key]
        return True


def overrides(environ: Mapping[str, str]) -> list[Override]:
    """The variables that override options (pydantic-settings reads them case-blind)."""
    found = []
    for name, value in environ.items():
        if name.upper().startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            path = tuple(name[len(ENV_PREFIX) :].lower().split(ENV_NESTING))
            found.append(Override(name, path, value))
    return found


def variable_of(loc: Loc, variables: list[Override]) -> Override | None:
    """The variable whose value is at fault at `loc`, if any (the most precise one)."""
    holding = [v for v in variables if v.holds(loc)]
    return max(holding, key=lambda v: len(v.path), default=None)
