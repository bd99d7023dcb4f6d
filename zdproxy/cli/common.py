"""What every part of the CLI shares: the exit codes, the argument parser with
"did you mean", the global options, and the argument types."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any

from zdproxy.cli.client import AdminClient
from zdproxy.config.spelling import did_you_mean
from zdproxy.config.units import parse_duration


class Exit(IntEnum):
    """The CLI's exit codes: stable, deploy scripts rely on them (EXIT_CODES says each)."""

    OK = 0
    REFUSED = 1
    USAGE = 2
    UNREACHABLE = 3
    TIMEOUT = 4
    ROLLOUT_FAILED = 5
    INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
    PIPE_CLOSED = 141  # stdout's reader quit (`| head -1`), as a shell reports SIGPIPE


EXIT_CODES = """exit codes:
  0    done (wait: every condition holds)
  1    zdproxy refused the change or answered an error
  2    bad arguments or an unreadable config
  3    zdproxy's admin API cannot be reached
  4    timed out (wait, deploy --wait, pool set --wait-healthy)
  5    the rollout rolled back, was aborted, froze or failed (wait --until done,
       deploy --wait, rollout show --watch)
  130  interrupted (Ctrl-C)
  141  the reader of the output quit early (`zdproxy status | head -1`), as SIGPIPE"""

ENVIRONMENT = """environment:
  ZDPROXY_ADMIN_URL     the admin API: http://HOST:PORT, HOST:PORT or unix:/PATH
                        (--admin wins; default: the config's admin.listen)
  ZDPROXY_ADMIN__TOKEN  the admin token, the daemon's own variable (ZDPROXY_TOKEN,
                        its older name, is read too; default: admin.token_file)"""

Command = Callable[[AdminClient, argparse.Namespace], Awaitable[int]]
Register = Callable[..., argparse.ArgumentParser]  # (name, command, help, **add_parser)


class Parser(argparse.ArgumentParser):
    """argparse that suggests the closest choice to a mistyped command, color or action."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            known = [str(choice) for choice in action.choices]
            raise argparse.ArgumentError(
                action,
                f"invalid choice: {value!r} (choose from {', '.join(known)})"
                + did_you_mean(str(value), known),
            )


CONFIG_HELP = (
    "zdproxy's config file (the admin API commands read only its [admin] section; their "
    "default: /etc/zdproxy/zdproxy.toml when it exists)"
)
ADMIN_HELP = (
    "the admin API: http://HOST:PORT, HOST:PORT or unix:/PATH (default: ZDPROXY_ADMIN_URL, "
    "else the config's admin.listen)"
)


def global_options(parser: argparse.ArgumentParser, *, admin: bool, top: bool) -> None:
    """-c/--config (and --admin for the admin API commands), accepted before the command
    (`top`, default None) and after it: there the default is SUPPRESS, so a command that
    does not repeat the option keeps the value given before it."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--config", "-c", metavar="FILE", default=default, help=CONFIG_HELP)
    if admin:
        parser.add_argument("--admin", metavar="ADDRESS", default=default, help=ADMIN_HELP)


def options_parent(*, admin: bool) -> Parser:
    """The global options as a parent of a command's parser (`parents=[...]`)."""
    parent = Parser(add_help=False)
    global_options(parent, admin=admin, top=False)
    return parent


def duration(text: str) -> float:
    """An argparse type: seconds from "90s", "1h30m", "250ms"."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))
