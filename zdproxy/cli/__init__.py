"""The `zdproxy` command line: the daemon, config tools, and the admin API commands.

-c/--config and --admin are accepted before the command and after it. A closed
stdout (`zdproxy status | head -1`) ends the command with exit 141 and Ctrl-C with
exit 130, each without a traceback (common.Exit).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import setproctitle

from zdproxy import version_line
from zdproxy.cli.commands import add_commands, run_admin_command
from zdproxy.cli.common import Exit, Parser, global_options, options_parent
from zdproxy.cli.init import add_init_command, run_init
from zdproxy.config.loader import ConfigError, load_settings
from zdproxy.config.plans import is_builtin
from zdproxy.config.settings import Settings
from zdproxy.config.units import parse_duration
from zdproxy.logs import setup_logging

NEEDS_CONFIG = ("run", "check", "preview-token")


class PrintVersion(argparse.Action):
    """--version: the version line as is, found when asked for. argparse's own version
    action wraps it at the terminal's width, and scripts read it."""

    def __init__(self, option_strings: list[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; the man page and the shell completion are made from it
    (zdproxy/manual.py)."""
    parser = Parser(
        prog="zdproxy",
        description="Zero-downtime blue/green and canary deploys: a reverse proxy in front of "
        "two pools of app servers.",
    )
    parser.add_argument("--version", action=PrintVersion, help="show the version and exit")
    global_options(parser, admin=True, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_option = options_parent(admin=False)  # required by run, check, preview-token

    commands.add_parser(
        "run",
        help="run the proxy in the foreground (SIGTERM: graceful stop, SIGHUP: reload, "
        "SIGUSR2: restart in place)",
        description="Run zdproxy in the foreground. SIGTERM or SIGINT: stop accepting, "
        "finish requests in flight, exit. SIGHUP (or a change of the config file, or "
        "`zdproxy reload`): reload. "
        "SIGUSR2: restart in place, keeping the listening sockets (an upgrade without "
        "downtime). Under systemd: listeners from socket activation, READY/RELOADING/"
        "STOPPING/WATCHDOG notifications; see docs/operations.md. The process is titled "
        "`zdproxy run -c FILE` (`pidof zdproxy` finds it).",
        parents=[config_option],
    )

    check = commands.add_parser(
        "check",
        help="validate a config file; print every error and exit 2 if it is invalid",
        description="Validate a config file: exit 2 with every error if it is invalid. "
        "Warnings (e.g. the two pools' health checks differ) go to stderr; they do not "
        "change the exit code.",
        parents=[config_option],
    )
    check.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print the plans `zdproxy deploy` can use (built-in ones marked) and the "
        "default one",
    )

    token = commands.add_parser(
        "preview-token",
        help="print a signed preview token that sends its bearer to COLOR until it expires",
        description="Print a signed preview token: COLOR.EXPIRY.SIGNATURE, an HMAC-SHA256 "
        "made with the secret of preview.secret_file (or ZDPROXY_PREVIEW__SECRET). zdproxy "
        "honours it from any client, in the preview header or cookie, until it expires.",
        epilog='example:\n  curl -H "X-Zd-Color: $(zdproxy preview-token green --ttl 1h '
        '-c /etc/zdproxy/zdproxy.toml)" https://app.example.com/\n\n'
        "Exit 2 if the config is invalid or configures no secret.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[config_option],
    )
    token.add_argument("color", choices=["blue", "green"], help="the color the token sends to")
    token.add_argument(
        "--ttl", default="1h", help='how long it is valid: "30m", "1h30m", "7d" (default 1h)'
    )

    add_init_command(commands)
    add_commands(commands)

    demo = commands.add_parser(
        "demo", help="run blue and green sample apps behind zdproxy on 127.0.0.1:8080"
    )
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    demo.add_argument("--admin-port", type=int, default=9901, help="admin API port (default 9901)")
    demo.add_argument(
        "--dir", default=".demo", help="where the demo writes its runtime files (default .demo)"
    )
    demo.add_argument(
        "--keep-state",
        action="store_true",
        help="keep the last run's state (split, rollouts, events) instead of starting afresh "
        "with blue live",
    )
    demo.add_argument(
        "--fleet",
        type=int,
        choices=range(2, 6),
        metavar="N",
        help="run N members (2 to 5) sharing their state through a local etcd (`make etcd`): "
        "member I on port+I-1, its admin API on admin-port+I-1, config DIR/fleet-mI.toml",
    )
    return parser


def _load(path: str) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(build_parser().parse_args(argv))
        sys.stdout.flush()  # inside the try: a closed pipe fails here at the latest
    except BrokenPipeError:
        # As the Python docs advise (signal module, "Note on SIGPIPE"): point stdout at
        # devnull, so the interpreter's last flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.PIPE_CLOSED
    except KeyboardInterrupt:
        print("zdproxy: interrupted", file=sys.stderr)
        return Exit.INTERRUPTED
    return code


def _main(args: argparse.Namespace) -> int:
    if hasattr(args, "admin_command"):
        return run_admin_command(args)
    if args.admin is not None:
        return _usage(args.command, "--admin is for the commands that use the admin API")
    if args.command in NEEDS_CONFIG and args.config is None:
        return _usage(
            args.command,
            f"--config FILE is required, e.g. zdproxy {args.command} -c /etc/zdproxy/zdproxy.toml",
        )
    if args.command == "check":
        return _check(args.config, verbose=args.verbose)
    if args.command == "run":
        settings = _load(args.config)
        if settings is None:
            return Exit.USAGE
        _title(f"zdproxy run -c {args.config}")
        setup_logging(settings.log.level, settings.log.format)
        from zdproxy.ops.daemon import run

        return run(settings, Path(args.config))
    if args.command == "preview-token":
        return _preview_token(args.color, args.ttl, args.config)
    if args.command == "init":
        return run_init(args)
    if args.command == "demo":
        _title("zdproxy demo")
        setup_logging("info")
        if args.fleet is not None:
            from zdproxy.ops.demo_fleet import run_fleet_demo

            return run_fleet_demo(
                args.fleet, args.port, args.admin_port, args.dir, keep_state=args.keep_state
            )
        from zdproxy.ops.demo import run_demo

        return run_demo(args.port, args.admin_port, args.dir, keep_state=args.keep_state)
    raise AssertionError(args.command)


def _usage(command: str, message: str) -> int:
    print(f"zdproxy {command}: {message}", file=sys.stderr)
    return Exit.USAGE


def _title(title: str) -> None:
    """What ps and `systemctl status` show; the thread's name (comm, 15 characters at
    most) becomes "zdproxy", which `pidof zdproxy` and `top` read, instead of "python"."""
    setproctitle.setproctitle(title)
    setproctitle.setthreadtitle("zdproxy")


def _check(config: str, *, verbose: bool) -> int:
    settings = _load(config)
    if settings is None:
        return Exit.USAGE
    from zdproxy.control.health import differing_checks

    if warning := differing_checks(settings):
        print(f"{config}: warning: {warning}", file=sys.stderr)
    print(f"{config}: ok")
    if verbose:
        for name, plan in settings.plans.items():
            print(
                f"plan {name}{' (built-in)' if is_builtin(name, plan) else ''}: {plan.describe()}"
            )
        print(f"`zdproxy deploy` without --plan uses: {settings.rollout.plan_in(settings.plans)}")
    return Exit.OK


def _preview_token(color: str, ttl_text: str, config: str) -> int:
    from zdproxy.routing.preview import mint_token

    try:
        ttl = parse_duration(ttl_text)
    except ValueError as exc:
        print(f"zdproxy preview-token: --ttl: {exc}", file=sys.stderr)
        return Exit.USAGE
    if ttl <= 0:
        print("zdproxy preview-token: --ttl must be positive", file=sys.stderr)
        return Exit.USAGE
    settings = _load(config)
    if settings is None:
        return Exit.USAGE
    secret = settings.preview.signing_secret
    if not secret:
        print(
            f"zdproxy preview-token: {config} configures no preview secret: set "
            "preview.secret_file there, or ZDPROXY_PREVIEW__SECRET in the environment",
            file=sys.stderr,
        )
        return Exit.USAGE
    # Rounded up, so a token is never shorter-lived than asked.
    print(mint_token(secret, color, math.ceil(time.time() + ttl)))
    return Exit.OK
