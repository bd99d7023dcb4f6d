"""What metrics cost per proxied request, part by part (goal: at most 2 µs in all).

zdproxy's metrics have three parts, and only the first runs per request:

1. recording: the data plane bumps its per-upstream counters (UpstreamStats.observe)
   once per response, on the hot path;
2. the tick: every 100 ms the control plane takes the interval records of every
   upstream and folds them into totals and sliding windows;
3. the scrape: GET /metrics renders every family from those totals.

Parts 2 and 3 are paid per tick and per scrape, so their cost per request depends on
the request rate; this script measures each part in process (best of several timeit
repeats, so noise from other load only ever inflates a figure) and prints the cost per
request at the stated rate, scrape interval and number of upstreams. The end-to-end
view is benchmarks/run.py's "scraped" row: zdproxy with /metrics fetched every second,
side by side with plain zdproxy.

    .venv/bin/python benchmarks/metrics_cost.py [--rate 5000] [--upstreams 10]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import timeit

from zdproxy.admin.handlers import ServiceState
from zdproxy.admin.metrics import Exporter
from zdproxy.config.loader import settings_from_mapping
from zdproxy.control.plane import TICK_SECONDS
from zdproxy.dataplane.route import Via
from zdproxy.ops.daemon import Daemon
from zdproxy.routing.records import FailureKind, UpstreamStats

GOAL_US = 2.0


def best_us(statement: str, number: int, namespace: dict[str, object]) -> float:
    """Microseconds per run of `statement`, best of 5 repeats."""
    return min(timeit.repeat(statement, globals=namespace, number=number, repeat=5)) / number * 1e6


def record_us() -> float:
    stats = UpstreamStats("blue/127.0.0.1:9001")
    return best_us(
        "observe(200, 0.0031, SPLIT)", 200_000, {"observe": stats.observe, "SPLIT": Via.SPLIT}
    )


def tick_us(daemon: Daemon, upstreams: int, per_tick: int) -> float:
    """One tick's work: collect every upstream's record and fold it into the telemetry."""
    assert daemon.server is not None  # one process: proxy.workers = 1
    pools = list(daemon.server.pools.values())
    assert len(pools) == upstreams, len(pools)

    def traffic() -> None:  # a tick's worth of responses, spread over the upstreams
        for i in range(per_tick):
            stats = pools[i % upstreams].stats
            stats.observe(200 if i % 50 else 503, 0.002 + (i % 7) * 0.001, Via.SPLIT)
        pools[0].stats.fail(FailureKind.RESET)

    telemetry = daemon.control.telemetry
    clock = iter(range(10**9))

    def tick() -> None:
        telemetry.add(next(clock) * TICK_SECONDS, daemon.server.collect())

    spent = traffic_only = float("inf")
    for _ in range(5):  # the tick's cost is the difference: traffic + tick minus traffic
        spent = min(spent, min(timeit.repeat(lambda: (traffic(), tick()), number=50, repeat=3)))
        traffic_only = min(traffic_only, min(timeit.repeat(traffic, number=50, repeat=3)))
    return max(spent - traffic_only, 0.0) / 50 * 1e6


def scrape_us(daemon: Daemon, service: ServiceState) -> tuple[float, int]:
    exporter = Exporter(daemon.control, service)
    body, _ = exporter.render()
    return best_us("render()", 50, {"render": exporter.render}), len(body)


async def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        addresses = [f"127.0.0.1:{20000 + i}" for i in range(args.upstreams)]
        half = len(addresses) // 2
        settings = settings_from_mapping(
            {
                "proxy": {"listen": "127.0.0.1:0"},
                "admin": {"listen": "127.0.0.1:0"},
                "state": {"dir": tmp},
                "pools": {
                    "blue": {"upstreams": addresses[:half]},
                    "green": {"upstreams": addresses[half:]},
                },
                "split": {"candidate_weight": 1000, "salt": "bench"},
            }
        )
        daemon = Daemon(settings)  # not started: nothing listens, nothing connects
        daemon.control.restore()
        per_tick = max(1, round(args.rate * TICK_SECONDS))
        record = record_us()
        tick = tick_us(daemon, args.upstreams, per_tick)
        scrape, size = scrape_us(daemon, daemon.service)

    tick_share = tick / per_tick
    scrape_share = scrape / (args.rate * args.scrape_interval)
    total = record + tick_share + scrape_share
    interval = args.scrape_interval
    print(f"at {args.rate} req/s, {args.upstreams} upstreams, a scrape every {interval:g}s")
    print("| part | cost | per request (µs) |")
    print("|---|--:|--:|")
    print(f"| recording (hot path, per response) | {record:.3f} µs | {record:.3f} |")
    every = f"every {TICK_SECONDS * 1000:.0f} ms, {per_tick} responses"
    print(f"| tick ({every}) | {tick:.1f} µs | {tick_share:.3f} |")
    print(f"| scrape ({size} bytes) | {scrape / 1000:.2f} ms | {scrape_share:.3f} |")
    verdict = "PASS" if total <= GOAL_US else "MISS"
    print(f"| **total** | | **{total:.3f}** (goal <= {GOAL_US:g}: {verdict}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--rate", type=int, default=5000, help="requests per second (default 5000)")
    parser.add_argument("--upstreams", type=int, default=10, help="upstreams in all (default 10)")
    parser.add_argument(
        "--scrape-interval", type=float, default=15.0, help="seconds between scrapes (default 15)"
    )
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
