"""The operator's view of fleet mode: `zdproxy fleet status`, the fleet block of
`zdproxy status` and the zdproxy_fleet_* metrics, against three real members on a real
etcd, then with etcd stopped; `fleet status` against a zdproxy without [fleet]; and the
fleet table drawn from answers of the API's own models."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.conftest import Upstream, ZdProxy, admin_api, run_cli
from tests.etcd_cluster import EtcdCluster
from tests.test_cli import cli, two_colors
from tests.test_fleet import Member, start_fleet, until_all
from tests.test_metrics import Metrics, metrics_when, scrape
from zdproxy.admin.fleet_models import Fleet, Membership
from zdproxy.cli.fleet import fleet_table

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]

NAMES = ["m1", "m2", "m3"]
PREFIX = "/zdproxy/default"  # [fleet] prefix's default, which start_fleet keeps
UNAVAILABLE = re.compile(r"etcd unavailable for \w+: etcd:? \S[^;]*;")  # and why


def rows(out: str) -> list[dict[str, str]]:
    """The member table of `fleet status`: a dict per row, by heading. Cells are cut at
    the headings' columns, so an empty LEADER cell stays empty."""
    lines = out.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("MEMBER "))
    spans = [(m.start(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", lines[top])]
    ends = [*(start for start, _ in spans[1:]), None]
    cells = list(zip(spans, ends, strict=True))
    return [
        {name: line[start:end].strip() for (start, name), end in cells} for line in lines[top + 1 :]
    ]


async def settled(member: Member, revision: int) -> dict[str, Any]:
    """`GET /v1/fleet` on `member` once every member has published itself at `revision`."""
    async with asyncio.timeout(10):
        while True:
            fleet: dict[str, Any] = await admin_api(member.proxy, "GET", "/v1/fleet")
            published = fleet["members"]
            if [m["name"] for m in published] == NAMES and all(
                m["applied_revision"] == revision for m in published
            ):
                return fleet
            await asyncio.sleep(0.05)


def each(metrics: list[Metrics], name: str) -> dict[str, float | None]:
    return {member: m.get(name) for member, m in zip(NAMES, metrics, strict=True)}


async def test_fleet_status_status_and_metrics_show_the_fleet_then_etcd_gone(
    etcd_node: EtcdCluster, zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    members = await start_fleet(zdproxy, upstream, etcd_node, tmp_path, size=3)
    await until_all(members, lambda s: s["fleet"]["leader"] != "")
    await admin_api(members[1].proxy, "PUT", "/v1/split", {"candidate_weight": 2500})
    statuses = await until_all(members, lambda s: s["split"]["candidate_weight"] == 2500)
    [revision] = {s["fleet"]["applied_revision"] for s in statuses}
    [leader] = {s["fleet"]["leader"] for s in statuses}
    answer = await settled(members[0], revision)

    # The table: every member once, one leader, all at the revision, each its shares.
    shown = await cli(members[0].proxy, "fleet", "status")
    assert shown.code == 0, shown.err
    here = " (this member)" if leader == "m1" else ""
    assert shown.out.startswith(
        f"fleet {PREFIX}: member m1, leader {leader}{here}; revision {revision} applied, "
        f"{revision} the latest seen\n  etcd available for "
    ), shown.out
    assert "; nothing pending; 0 changes made here lost to another member's\n" in shown.out
    table = rows(shown.out)
    assert [row["MEMBER"] for row in table] == NAMES, shown.out
    assert [row["MEMBER"] for row in table if row["LEADER"] == "*"] == [leader], shown.out
    for row in table:
        assert (row["APPLIED"], row["LAG"], row["ROLLOUT"]) == (str(revision), "0", "-"), row
        assert (row["BLUE SHARE"], row["GREEN SHARE"]) == ("75%", "25%"), row
        assert (row["BLUE POOL"], row["GREEN POOL"]) == ("- 1/1", "- 1/1"), row
        assert re.fullmatch(r"\d+\.\ds", row["AGE"]), row

    as_json = json.loads((await cli(members[0].proxy, "fleet", "status", "--json")).out)
    assert as_json.keys() == answer.keys() and as_json["error"] == ""
    assert as_json["membership"]["member"] == "m1"
    assert [m["name"] for m in as_json["members"]] == NAMES
    assert [m["name"] for m in as_json["members"] if m["leading"]] == [leader]
    field = await cli(members[2].proxy, "fleet", "status", "--field", "membership.leader")
    assert (field.code, field.out) == (0, f"{leader}\n")
    typo = await cli(members[2].proxy, "fleet", "status", "--field", "membership.leder")
    assert typo.code == 2 and "did you mean 'leader'?" in typo.err

    # `status`: the fleet block, as this member sees it.
    status = await cli(members[2].proxy, "status")
    here = " (this member)" if leader == "m3" else ""
    assert (
        f"\nfleet {PREFIX}: member m3, leader {leader}{here}; revision {revision} applied, "
        f"{revision} the latest seen\n  etcd available for "
    ) in status.out, status.out

    # /metrics: one leader over the members, every member up and at the revision.
    scrapes = [await scrape(m.proxy) for m in members]
    assert each(scrapes, "zdproxy_fleet_leader") == {n: float(n == leader) for n in NAMES}
    assert set(each(scrapes, "zdproxy_fleet_store_up").values()) == {1.0}
    assert set(each(scrapes, "zdproxy_fleet_applied_revision").values()) == {revision}
    assert set(each(scrapes, "zdproxy_fleet_latest_revision").values()) == {revision}
    assert set(each(scrapes, "zdproxy_fleet_pending").values()) == {0.0}
    assert set(each(scrapes, "zdproxy_fleet_conflicts_total").values()) == {0.0}
    for metrics in scrapes:
        writes = metrics.get("zdproxy_fleet_writes_total")
        assert writes is not None and writes >= 1  # its own key, at least
        written = metrics.get("zdproxy_fleet_written_bytes_total")
        assert written is not None and written > writes
        assert metrics.types["zdproxy_fleet_store_errors"] == "counter"
    errors_before = scrapes[0].get("zdproxy_fleet_store_errors_total")
    assert errors_before is not None

    # etcd gone: store_up 0, no one leads, and both views say so and why.
    etcd_node.stop(0)
    gone = await metrics_when(
        members[0].proxy, lambda m: m.get("zdproxy_fleet_store_up") == 0, within=15
    )
    errors_after = gone.get("zdproxy_fleet_store_errors_total")
    assert errors_after is not None and errors_after > errors_before
    assert gone.get("zdproxy_fleet_leader") == 0
    assert gone.get("zdproxy_fleet_applied_revision") == revision  # it serves on with it
    status = await cli(members[0].proxy, "status")
    assert status.code == 0, status.err
    assert f"\nfleet {PREFIX}: member m1, leader {leader} (as last seen); " in status.out
    assert UNAVAILABLE.search(status.out) is not None, status.out
    shown = await cli(members[0].proxy, "fleet", "status")
    assert shown.code == 0, shown.err
    assert UNAVAILABLE.search(shown.out) is not None, shown.out
    assert "\nmembers: unknown: etcd" in shown.out and "MEMBER" not in shown.out


async def test_fleet_status_without_fleet_mode_exits_1_and_nothing_of_fleets_shows(
    zdproxy: StartProxy, upstream: StartUpstream, refused_address: Callable[[], str]
) -> None:
    proxy, _, _ = await two_colors(zdproxy, upstream)
    shown = await cli(proxy, "fleet", "status")
    assert (shown.code, shown.out) == (1, "")
    assert shown.err == (
        "zdproxy fleet: refused: fleet mode is off: this zdproxy has no [fleet] endpoints\n"
    )
    status = await cli(proxy, "status")
    assert status.code == 0 and "\nfleet " not in status.out
    assert "zdproxy_fleet_" not in (await scrape(proxy)).text
    unreachable = await run_cli(
        "fleet", "status", env={"ZDPROXY_ADMIN_URL": refused_address(), "ZDPROXY_TOKEN": "x"}
    )
    assert unreachable.code == 3 and "cannot reach zdproxy's admin API" in unreachable.err


def membership(**changes: Any) -> dict[str, Any]:
    base = {
        "member": "m1",
        "prefix": PREFIX,
        "leader": "m2",
        "leading": False,
        "applied_revision": 9,
        "latest_revision": 11,
        "available": True,
        "reason": "",
        "since_seconds": 75.0,
        "pending": False,
        "lease": True,
        "conflicts": 2,
        "store_errors": 0,
        "writes": 4,
        "bytes_written": 900,
    }
    return Membership.model_validate({**base, **changes}).model_dump()


def published(name: str, rollout: dict[str, Any] | None, **changes: Any) -> dict[str, Any]:
    pools = {
        "blue": {"version": "v1", "upstreams": 2, "routable": 2},
        "green": {"version": "", "upstreams": 1, "routable": 0},
    }
    return {
        "name": name,
        "proxy": "127.0.0.1:8080",
        "applied_revision": 9,
        "lag": 2,
        "leading": False,
        "age_seconds": 0.31,
        "pools": pools,
        "share": {"blue": 90.0, "green": 10.0},
        "rollout": rollout,
        **changes,
    }


def test_the_fleet_table_says_each_members_rollout_and_etcds_trouble() -> None:
    answer = Fleet.model_validate(
        {
            "membership": membership(),
            "members": [
                published("m1", {"id": 4, "state": "baking", "step": 3}),
                published("m2", {"id": 4, "state": "step", "step": 2}, leading=True),
                published("m3", {"id": 4, "state": "preflight", "step": 0}, age_seconds=90.0),
                published("m4", None),
            ],
        }
    ).model_dump()
    out = fleet_table(answer)
    assert out.splitlines()[:2] == [
        f"fleet {PREFIX}: member m1, leader m2; revision 9 applied, 11 the latest seen",
        "  etcd available for 1m15s; nothing pending; 2 changes made here lost to another member's",
    ]
    table = rows(out)
    assert [(r["MEMBER"], r["LEADER"], r["ROLLOUT"]) for r in table] == [
        ("m1", "", "4: baking, step 3"),
        ("m2", "*", "4: step 2"),
        ("m3", "", "4: preflight"),
        ("m4", "", "-"),
    ]
    assert [r["AGE"] for r in table] == ["0.3s", "0.3s", "1m30s", "0.3s"]
    assert table[0]["BLUE POOL"] == "v1 2/2" and table[0]["GREEN POOL"] == "- 0/1"
    assert (table[0]["BLUE SHARE"], table[0]["GREEN SHARE"]) == ("90%", "10%")

    away = membership(
        available=False, reason="etcd: no leader", since_seconds=3.0, pending=True, lease=False
    )
    unread = fleet_table({"membership": away, "members": [], "error": "etcd: no leader"})
    assert unread.splitlines() == [
        f"fleet {PREFIX}: member m1, leader m2 (as last seen); revision 9 applied, 11 the "
        "latest seen",
        "  etcd unavailable for 3s: etcd: no leader; a change made here is not in etcd yet; "
        "2 changes made here lost to another member's; no lease: not among the fleet's members",
        "",
        "members: unknown: etcd: no leader",
    ]
    empty = fleet_table({"membership": membership(), "members": [], "error": ""})
    assert empty.endswith("\n\nno member holds a lease")
