"""The CLI commands that read: `status` (whole, or one field for a script), `events`,
and `wait`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap
from typing import Any

from zdproxy.cli.client import AdminClient, Unreachable, UsageError
from zdproxy.cli.common import EXIT_CODES, Exit, Register, duration, print_json
from zdproxy.cli.views import event_line, status_table
from zdproxy.cli.wait import CONDITIONS, Conditions, wait_for
from zdproxy.config.spelling import did_you_mean
from zdproxy.config.units import format_duration
from zdproxy.control.event_kinds import KINDS

RECONNECT_SECONDS = 1.0  # `events -f` after its stream ended
MIN_INTERVAL = 0.05  # seconds between two polls of `wait`

FIELD_HELP = """--field PATH prints one value of `status --json`, for scripts: a string, number
or boolean bare (JSON's spelling: true, null), an object or a list as JSON. PATH
is dotted, a list index is a number:
  zdproxy status --field split.live                  blue
  zdproxy status --field split.candidate_weight      2500
  zdproxy status --field rollout.state               step
  zdproxy status --field pools.green.upstreams.0.health
A PATH the status does not have: exit 2, naming the keys there are."""


KINDS_HELP = "event kinds (--kind):\n" + textwrap.fill(
    ", ".join(sorted(KINDS)), width=88, initial_indent="  ", subsequent_indent="  "
)


def add_observe_commands(command: Register) -> None:
    status = command(
        "status",
        _status,
        "show pools, health, split, rules and traffic",
        epilog=FIELD_HELP + "\n\n" + EXIT_CODES,
    )
    form = status.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the raw JSON")
    form.add_argument("--field", metavar="PATH", help="print one value, e.g. split.live")

    events = command(
        "events", _events, "show the event log", epilog=KINDS_HELP + "\n\n" + EXIT_CODES
    )
    events.add_argument("-f", "--follow", action="store_true", help="then stream new events")
    events.add_argument("--since", type=int, default=0, help="only events after this id")
    events.add_argument("--kind", type=_event_kind, help="only events of this kind")
    events.add_argument("-n", "--limit", type=int, default=100, help="at most this many")
    events.add_argument("--json", action="store_true", help="one JSON object per line")

    wait = command(
        "wait",
        _wait,
        "wait until conditions hold, for deploy scripts",
        epilog=CONDITIONS + "\n\n" + EXIT_CODES,
    )
    wait.add_argument(
        "--until", action="append", required=True, metavar="CONDITION", help="see below"
    )
    wait.add_argument(
        "--timeout",
        type=duration,
        default="5m",
        metavar="DURATION",
        help="give up after this (default 5m)",
    )
    wait.add_argument(
        "--interval",
        type=duration,
        default="500ms",
        metavar="DURATION",
        help="poll this often (default 500ms)",
    )


def _event_kind(text: str) -> str:
    if text not in KINDS:
        raise argparse.ArgumentTypeError(
            f"unknown event kind {text!r}"
            + (did_you_mean(text, KINDS) or " (`zdproxy events --help` lists them)")
        )
    return text


async def _status(client: AdminClient, args: argparse.Namespace) -> int:
    status = await client.call("GET", "/v1/status")
    if args.field is not None:
        value = field(status, args.field)
        print(value if isinstance(value, str) else json.dumps(value, indent=2))
    elif args.json:
        print_json(status)
    else:
        print(status_table(status))
    return Exit.OK


def field(data: Any, path: str, root: str = "the status") -> Any:
    """The value at a dotted `path` of decoded JSON (`root` names the whole of it);
    UsageError naming what is there."""
    value, walked = data, list[str]()
    for key in path.split("."):
        where = ".".join(walked) or root
        if isinstance(value, dict):
            if key not in value:
                raise UsageError(
                    f"--field {path}: {where} has no {key!r} (it has: {', '.join(value)})"
                    + did_you_mean(key, value)
                )
            value = value[key]
        elif isinstance(value, list):
            if not key.isdigit() or int(key) >= len(value):
                raise UsageError(
                    f"--field {path}: {where} is a list of {len(value)}: {key!r} is no index "
                    f"(0 to {len(value) - 1})"
                )
            value = value[int(key)]
        else:
            raise UsageError(f"--field {path}: {where} is {json.dumps(value)}, it has no fields")
        walked.append(key)
    return value


async def _events(client: AdminClient, args: argparse.Namespace) -> int:
    query = f"?since={args.since}&limit={args.limit}" + (f"&kind={args.kind}" if args.kind else "")

    def show(event: dict[str, Any]) -> None:
        print(json.dumps(event) if args.json else event_line(event), flush=True)

    if not args.follow:
        for event in (await client.call("GET", "/v1/events" + query))["events"]:
            show(event)
        return Exit.OK
    # Like tail -F: through a restart of zdproxy the stream resumes where it stopped.
    last_id = 0
    while True:
        try:
            async for event in client.stream("/v1/events" + query + "&follow=1", last_id):
                show(event)
                last_id = event["id"]
        except Unreachable as exc:
            print(f"zdproxy events: {exc}; retrying", file=sys.stderr)
        await asyncio.sleep(RECONNECT_SECONDS)


async def _wait(client: AdminClient, args: argparse.Namespace) -> int:
    conditions = Conditions.parse(args.until)
    interval = max(MIN_INTERVAL, args.interval)
    why = await wait_for(client, conditions, args.timeout, interval)
    if why is not None:
        print(
            f"zdproxy wait: timed out after {format_duration(args.timeout)}: {why}",
            file=sys.stderr,
        )
        return Exit.TIMEOUT
    print("; ".join(args.until) + ": ok")
    return Exit.OK
