"""The `zdproxy` command line: the daemon, config tools, and the admin API commands."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from zdproxy import __version__
from zdproxy.cli.commands import add_commands, run_admin_command
from zdproxy.config.loader import ConfigError, load_settings
from zdproxy.config.settings import Settings
from zdproxy.config.units import parse_duration
from zdproxy.ops.logs import setup_logging

EXIT_INVALID_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zdproxy",
        description="Zero-downtime blue/green and canary deploys: a reverse proxy in front of "
        "two pools of app servers.",
    )
    parser.add_argument("--version", action="version", version=f"zdproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the proxy in the foreground (SIGTERM: graceful stop, SIGHUP: reload, "
        "SIGUSR2: restart in place)",
        description="Run zdproxy in the foreground. SIGTERM or SIGINT: stop accepting, "
        "finish requests in flight, exit. SIGHUP (or a change of the config file, or "
        "`zdproxy reload`): reload. "
        "SIGUSR2: restart in place, keeping the listening sockets (an upgrade without "
        "downtime). Under systemd: listeners from socket activation, READY/RELOADING/"
        "STOPPING/WATCHDOG notifications; see docs/operations.md.",
    )
    run.add_argument("--config", "-c", required=True, help="path to the TOML config file")

    check = commands.add_parser(
        "check",
        help="validate a config file; print every error and exit 2 if it is invalid",
        description="Validate a config file: exit 2 with every error if it is invalid. "
        "Warnings (e.g. the two pools' health checks differ) go to stderr; they do not "
        "change the exit code.",
    )
    check.add_argument("--config", "-c", required=True, help="path to the TOML config file")

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
    )
    token.add_argument("color", choices=["blue", "green"], help="the color the token sends to")
    token.add_argument(
        "--ttl", default="1h", help='how long it is valid: "30m", "1h", "7d" (default 1h)'
    )
    token.add_argument("--config", "-c", required=True, help="path to the TOML config file")

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
    return parser


def _load(path: str) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if hasattr(args, "admin_command"):
        return run_admin_command(args)
    if args.command == "check":
        settings = _load(args.config)
        if settings is None:
            return EXIT_INVALID_CONFIG
        from zdproxy.control.health import differing_checks

        if warning := differing_checks(settings):
            print(f"{args.config}: warning: {warning}", file=sys.stderr)
        print(f"{args.config}: ok")
        return 0
    if args.command == "run":
        settings = _load(args.config)
        if settings is None:
            return EXIT_INVALID_CONFIG
        setup_logging(settings.log.level)
        from zdproxy.ops.daemon import run

        return run(settings, Path(args.config))
    if args.command == "preview-token":
        return _preview_token(args.color, args.ttl, args.config)
    if args.command == "demo":
        setup_logging("info")
        from zdproxy.ops.demo import run_demo

        return run_demo(args.port, args.admin_port, args.dir, keep_state=args.keep_state)
    raise AssertionError(args.command)


def _preview_token(color: str, ttl_text: str, config: str) -> int:
    from zdproxy.routing.preview import mint_token

    try:
        ttl = parse_duration(ttl_text)
    except ValueError as exc:
        print(f"zdproxy preview-token: --ttl: {exc}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    if ttl <= 0:
        print("zdproxy preview-token: --ttl must be positive", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    settings = _load(config)
    if settings is None:
        return EXIT_INVALID_CONFIG
    secret = settings.preview.signing_secret
    if not secret:
        print(
            f"zdproxy preview-token: {config} configures no preview secret: set "
            "preview.secret_file there, or ZDPROXY_PREVIEW__SECRET in the environment",
            file=sys.stderr,
        )
        return EXIT_INVALID_CONFIG
    # Rounded up, so a token is never shorter-lived than asked.
    print(mint_token(secret, color, math.ceil(time.time() + ttl)))
    return 0
