"""Load a config file into Settings, turning every failure into one readable message."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from zdproxy.config.settings import Settings


class ConfigError(Exception):
    """The config cannot be used; `errors` holds one line per problem, each naming its field."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: invalid configuration\n" + "\n".join(f"  {e}" for e in errors))


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.startswith("function-") or item in ("str", "dict[str,any]"):
            continue  # pydantic's names for union branches and validators, not fields
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(top level)"


# A check that spans fields names the one at fault first: "listen: 0.0.0.0:9901 is ...".
_NAMED = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.+)$", re.DOTALL)


def format_validation_error(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False):
        path = _field_path(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown option (check the spelling)"
        elif named := _NAMED.match(message):
            path = named[1] if path == "(top level)" else f"{path}.{named[1]}"
            message = named[2]
        lines.append(f"{path}: {message}")
    return lines


def settings_from_mapping(data: dict[str, Any], source: str = "config") -> Settings:
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(exc)) from None
    except SettingsError as exc:  # an environment override that is not valid JSON where needed
        raise ConfigError(source, [f"environment: {exc}"]) from None


def load_settings(path: str | Path | None) -> Settings:
    """Settings from a TOML file (or defaults when path is None), env overrides applied."""
    if path is None:
        return settings_from_mapping({}, "defaults")
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    return settings_from_mapping(data, source)
