"""How the CLI shows the admin API's answers to a person."""

from __future__ import annotations

import time
from typing import Any


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def status_table(status: dict[str, Any]) -> str:
    split = status["split"]
    lines = [
        f"zdproxy {status['version']}, up {_duration(status['uptime_seconds'])}; "
        f"live {split['live']}, candidate {split['candidate']} at "
        f"{split['shares'][split['candidate']]:g}% (sticky: {split['sticky_key']})",
        "",
    ]
    pools = [["COLOR", "SHARE", "VERSION", "UPSTREAMS", "REQ/S", "ERRORS", "P50 MS", "P99 MS"]]
    upstreams = [["UPSTREAM", "HEALTH", "ROUTABLE", "IN FLIGHT", "NOTE"]]
    for color, pool in status["pools"].items():
        window = pool["window"]
        routable = sum(u["routable"] for u in pool["upstreams"])
        pools.append(
            [
                color,
                f"{pool['share']:g}%",
                pool["version"] or "-",
                f"{routable}/{len(pool['upstreams'])} routable",
                f"{window['requests_per_second']:.1f}",
                f"{window['error_rate'] * 100:.2f}%",
                _ms(window["p50_ms"]),
                _ms(window["p99_ms"]),
            ]
        )
        for u in pool["upstreams"]:
            notes = []
            if u["drained"]:
                notes.append("drained")
            if u["ejected_for"]:
                notes.append(f"ejected for {u['ejected_for']:.0f}s")
            if u["health"] in ("down", "unknown"):
                notes.append(f"{u.get('health_check', 'check')}: {u['health_reason']}")
            if u["tunnels"]:
                notes.append(f"{u['tunnels']} tunnels")
            upstreams.append(
                [
                    u["id"],
                    u["health"],
                    "yes" if u["routable"] else "no",
                    str(u["in_flight"]),
                    "; ".join(notes),
                ]
            )
    lines += _table(pools)
    window = status["pools"]["blue"]["window"]["seconds"]
    lines.append(f"(traffic over the last {window:g}s)")
    lines.append("")
    lines += _table(upstreams) if len(upstreams) > 1 else ["no upstreams configured"]
    lines.append("")
    rules = status["rules"]
    lines.append(
        f"rules: {len(rules)}"
        + "".join(f"\n  {r.get('name') or f'pins[{i}]'} -> {r['to']}" for i, r in enumerate(rules))
    )
    lines.append(f"rollout: {status['rollout']['state']}")
    if status["journal"]:
        lines.append("runtime changes (journal): " + ", ".join(status["journal"]))
    return "\n".join(lines)


def event_line(event: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(event["time"]))
    return f"{when} #{event['id']} {event['kind']} [{event['actor']}] {event['reason']}"
