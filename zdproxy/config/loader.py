"""Load a config file into Settings, turning every failure into one readable message
per problem (config/problems.py says how)."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError

from zdproxy.config.problems import (
    ENV_PREFIX,
    json_kind,
    overrides,
    validation_problems,
    variable_of,
)
from zdproxy.config.settings import COLORS, Settings

# Arrays and inline tables nested deeper than this are a mistake or an attack: no option
# needs more than a few levels, and tomllib recurses once per level (a RecursionError).
MAX_DEPTH = 32


class ConfigError(Exception):
    """The config cannot be used; `errors` holds one line per problem, each naming its field
    (or, for a value from the environment, its variable: `from_environment` of them)."""

    def __init__(self, source: str, errors: list[str], from_environment: int = 0) -> None:
        self.source = source
        self.errors = errors
        # Blame the file only for what it holds: the environment overrides it.
        if from_environment and from_environment == len(errors):
            self.origin = "the environment (ZDPROXY_* variables)"
        elif from_environment:
            self.origin = f"{source} and the environment (ZDPROXY_* variables)"
        else:
            self.origin = source
        super().__init__(
            f"{self.origin}: invalid configuration\n" + "\n".join(f"  {e}" for e in errors)
        )


def format_validation_error(
    exc: ValidationError, model: type[BaseModel] | None = None
) -> list[str]:
    """One "field: reason" line per error; with the `model` validated, an unknown key is
    offered the name it was probably meant to be."""
    return [str(problem) for problem in validation_problems(exc, model)]


def settings_from_mapping(data: dict[str, Any], source: str = "config") -> Settings:
    """Settings from a file's data, the environment's ZDPROXY_* overrides applied. A
    problem with a value from the environment names its variable."""
    try:
        return Settings(**data)
    except ValidationError as exc:
        variables = overrides(os.environ)
        lines, blamed = [], 0
        for problem in validation_problems(exc, Settings):
            variable = variable_of(problem.loc, variables)
            lines.append(str(problem) if variable is None else problem.from_variable(variable))
            blamed += variable is not None
        raise ConfigError(source, lines, blamed) from None
    except SettingsError as exc:  # a section, list or table from the environment, not JSON
        lines = [
            f"{v.name}: not valid JSON: it sets {'.'.join(v.path)}, a {kind}, which the "
            f"environment gives as JSON (e.g. {_EXAMPLES[kind]})"
            for v in overrides(os.environ)
            if (kind := json_kind(Settings, v.path)) is not None and not _is_json(v.value)
        ] or [f"{ENV_PREFIX}*: {exc}"]
        raise ConfigError(source, lines, len(lines)) from None


_EXAMPLES = {
    "section": """'{"option": "value"}'""",
    "list": """'["a", "b"]'""",
    "table": """'{"key": "value"}'""",
}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def load_settings(path: str | Path | None) -> Settings:
    """Settings from a TOML file (or defaults when path is None), env overrides applied.

    A file must name at least one upstream: an empty or truncated file is refused
    rather than run (or reloaded) as a proxy with nowhere to send anyone."""
    if path is None:
        return settings_from_mapping({}, "defaults")
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            source,
            [f"(top level): not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#x})"],
        ) from None
    if (deep := too_deep(text)) is not None:
        raise ConfigError(
            source, [f"{deep}: nested deeper than {MAX_DEPTH} levels of arrays or inline tables"]
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    except RecursionError:  # a backstop: too_deep should have seen it first
        raise ConfigError(source, ["(top level): nested too deeply to read"]) from None
    settings = settings_from_mapping(data, source)
    if not any(settings.pool(color).upstreams for color in COLORS):
        what = "the file is empty" if not data else "no pool has an upstream"
        raise ConfigError(
            source,
            [
                f"pools: {what}: give pools.blue.upstreams (and pools.green.upstreams) "
                "the app servers' addresses"
            ],
        )
    return settings


_BARE_OR_QUOTED = r"""(?:[\w-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY = re.compile(rf"[ \t]*({_BARE_OR_QUOTED}(?:[ \t]*\.[ \t]*{_BARE_OR_QUOTED})*)[ \t]*=")
_HEADER = re.compile(r"[ \t]*\[\[?[ \t]*([^\]\n]*?)[ \t]*\]\]?")
_SIGNIFICANT = re.compile(r"[\n#\"'\[\]{}]")  # all that can change the nesting or the key


def too_deep(text: str) -> str | None:
    """The key (dotted, under its table) of the first value whose arrays and inline tables
    nest deeper than MAX_DEPTH, or None. A linear scan that skips strings and comments, so
    the parser never meets such nesting."""
    depth, i, table, key = 0, 0, "", ""
    line_start = True
    while i < len(text):
        if line_start and depth == 0:
            line_start = False
            if header := _HEADER.match(text, i):
                table, key, i = header[1], "", header.end()
                continue
            if assignment := _KEY.match(text, i):
                key, i = assignment[1], assignment.end()
                continue
        found = _SIGNIFICANT.search(text, i)
        if found is None:
            break
        i, char = found.start(), found[0]
        if char == "\n":
            line_start = True
        elif char == "#":
            i = text.find("\n", i)  # the newline itself is handled next round
            if i < 0:
                break
            continue
        elif char in "\"'":
            i = _string_end(text, i)
            continue
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return ".".join(part for part in (table, key) if part) or "(top level)"
        else:
            depth = max(0, depth - 1)
        i += 1
    return None


def _string_end(text: str, i: int) -> int:
    """Where the string (basic or literal, one-line or multi-line) that starts at i ends:
    just past its closing quote, or at the newline of one left unterminated."""
    quote = text[i]
    if text.startswith(quote * 3, i):
        end = text.find(quote * 3, i + 3)
        while quote == '"' and end > 0 and _escaped(text, end):
            end = text.find(quote * 3, end + 1)
        return len(text) if end < 0 else end + 3
    j = i + 1
    while j < len(text) and text[j] not in (quote, "\n"):
        j += 2 if quote == '"' and text[j] == "\\" else 1
    return j + 1 if j < len(text) and text[j] == quote else j


def _escaped(text: str, i: int) -> bool:
    """Is the character at i escaped by an odd run of backslashes before it?"""
    backslashes = 0
    while i > 0 and text[i - 1] == "\\":
        backslashes += 1
        i -= 1
    return backslashes % 2 == 1
