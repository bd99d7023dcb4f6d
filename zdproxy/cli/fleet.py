"""`zdproxy fleet status`: the fleet's members as this member reads them from etcd
(fleet mode, `GET /v1/fleet`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from zdproxy.cli.client import AdminClient
from zdproxy.cli.common import ENVIRONMENT, EXIT_CODES, Exit, Register, print_json
from zdproxy.cli.observe import field
from zdproxy.cli.views import age, membership_lines, table
from zdproxy.config.settings import COLORS

FLEET_HELP = """The first lines are this member's own view: its name, the leader, the revision
of the fleet's state it runs and the newest it has seen, whether etcd answers (or
why not), a change of its own not in etcd yet, and changes of its own dropped for
another member's. Then one row per member that holds its lease, as it last
published itself: LEADER marks the one that drives rollouts; APPLIED is the
revision it runs, LAG how many it is behind, AGE how old its report is; each
color's SHARE of its traffic and its POOL (version, routable/all upstreams); its
ROLLOUT (id: state, step).

--field PATH prints one value of `fleet status --json`, as `status --field` does:
  zdproxy fleet status --field membership.leader     m2
  zdproxy fleet status --field members.0.lag         0

Exit 1 when zdproxy has no [fleet] (404: fleet mode is off). While etcd cannot be
read, "members: unknown: REASON" stands for the table (exit 0)."""


def add_fleet_commands(command: Register, common: argparse.ArgumentParser) -> None:
    fleet = command("fleet", _status, "show the fleet's members (fleet mode)")
    actions = fleet.add_subparsers(dest="fleet_action", metavar="ACTION", required=True)
    status = actions.add_parser(
        "status",
        help="this member's membership and every member's state, from etcd",
        description="This member's membership and every member's state, as GET /v1/fleet "
        "answers them.",
        epilog=FLEET_HELP + "\n\n" + EXIT_CODES + "\n\n" + ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    form = status.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the raw JSON")
    form.add_argument("--field", metavar="PATH", help="print one value, e.g. membership.leader")
    status.set_defaults(admin_command=_status)


async def _status(client: AdminClient, args: argparse.Namespace) -> int:
    fleet = await client.call("GET", "/v1/fleet")  # 404 without [fleet]: exit 1
    if args.field is not None:
        value = field(fleet, args.field, "the fleet")
        print(value if isinstance(value, str) else json.dumps(value, indent=2))
    elif args.json:
        print_json(fleet)
    else:
        print(fleet_table(fleet))
    return Exit.OK


def fleet_table(fleet: dict[str, Any]) -> str:
    """The membership lines, then a row per member."""
    lines = membership_lines(fleet["membership"])
    lines.append("")
    if fleet["error"]:
        lines.append(f"members: unknown: {fleet['error']}")
        return "\n".join(lines)
    head = ["MEMBER", "LEADER", "APPLIED", "LAG", "AGE"]
    for color in COLORS:
        head += [f"{color.upper()} SHARE", f"{color.upper()} POOL"]
    rows = [[*head, "ROLLOUT"]]
    for member in fleet["members"]:
        row = [
            member["name"],
            "*" if member["leading"] else "",
            str(member["applied_revision"]),
            str(member["lag"]),
            age(member["age_seconds"]),
        ]
        for color in COLORS:
            pool = member["pools"].get(color)
            share = member["share"].get(color)
            row.append("-" if share is None else f"{share:g}%")
            row.append(
                "-"
                if pool is None
                else f"{pool['version'] or '-'} {pool['routable']}/{pool['upstreams']}"
            )
        rows.append([*row, _rollout(member["rollout"])])
    lines += table(rows) if fleet["members"] else ["no member holds a lease"]
    return "\n".join(lines)


def _rollout(rollout: dict[str, Any] | None) -> str:
    """`4: step 2`, `4: baking, step 3`, `4: preflight`; `-` before any rollout."""
    if rollout is None:
        return "-"
    where, step = rollout["state"], rollout["step"]
    if step:
        where = f"step {step}" if where == "step" else f"{where}, step {step}"
    return f"{rollout['id']}: {where}"
