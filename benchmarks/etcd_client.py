"""Which etcd client fleet mode uses: the candidates measured side by side.

One 3-member etcd cluster (tests/etcd_cluster.py: Debian's etcd-server, `make etcd`) on
loopback serves every candidate in turn. Each candidate runs in a process of its own
(two gRPC clients that bundle etcd's protobuf files cannot share one: the second import
fails on duplicate symbols), which measures:

- put: `--puts` sequential puts of 100 bytes through member 1;
- txn: as many sequential compare-and-swap transactions (compare mod_revision, put);
- watch: a watcher connected to member 3, a writer to member 1: `--watches` puts one
  at a time, each timed from the put's start to the watcher seeing its event;
- lease grant and lease keepalive: `--leases` of each, one round trip each;
- its cost in the process: import time, and resident memory (and threads) added by the
  import and by the measurements, over a process that has already imported asyncio and
  aiohttp (as zdproxy has); and the size on disk of the distributions it installs that
  zdproxy does not already depend on.

Candidates: `gateway`, etcd's v3 JSON gateway over aiohttp through zdproxy.fleet
(what zdproxy ships: no new dependency); `aetcd` and `etcd3aio`, asyncio gRPC clients
from PyPI. Those two are measured only where `--python` has them: install them in a
scratch venv, never in the project's:

    python3 -m venv /tmp/f-venv && /tmp/f-venv/bin/pip install aiohttp aetcd etcd3aio
    .venv/bin/python benchmarks/etcd_client.py --python /tmp/f-venv/bin/python

Results: a table on stdout and everything in benchmarks/results/etcd_client.json. The
numbers that chose the client are in docs/fleet.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CANDIDATES = {"gateway": "zdproxy.fleet.etcd", "aetcd": "aetcd", "etcd3aio": "etcd3aio"}
DISTRIBUTIONS = {"gateway": None, "aetcd": "aetcd", "etcd3aio": "etcd3aio"}
VALUE = b"x" * 100
OPERATIONS = ("put", "txn", "watch", "lease_grant", "lease_keepalive")
LEASE_TTL = 60  # seconds: long enough that no lease expires during the measurement


def quantiles(samples: list[float]) -> dict[str, float]:
    """Median and 99th percentile (nearest rank), in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[max(0, -(-len(ordered) * 99 // 100) - 1)]
    return {"median_ms": statistics.median(ordered) * 1e3, "p99_ms": p99 * 1e3, "n": len(ordered)}


def proc_status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


async def timed(samples: list[float], call: Callable[[], Awaitable[Any]]) -> Any:
    start = time.perf_counter()
    result = await call()
    samples.append(time.perf_counter() - start)
    return result


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Each candidate: a class made with the cluster's client URLs, with the operations measured.


class GatewayClient:
    """zdproxy's own: the Gateway transport for single calls, EtcdStore for txn and watch."""

    def __init__(self, urls: list[str]) -> None:
        from zdproxy.fleet.etcd import EtcdStore
        from zdproxy.fleet.gateway import Gateway

        self.gateway = Gateway([urls[0]], timeout=5.0)
        self.store = EtcdStore([urls[0]], timeout=5.0)
        self.watcher = EtcdStore([urls[2]], timeout=5.0)

    async def connect(self) -> None:
        pass  # aiohttp connects on the first call

    async def put(self, key: bytes) -> int:
        answer = await self.gateway.call(
            "/v3/kv/put", {"key": b64(key), "value": b64(VALUE)}, idempotent=False
        )
        return int(answer["header"]["revision"])

    async def txn(self, key: bytes, revision: int) -> int:
        new = await self.store.put_if(key.decode(), VALUE, revision)
        assert new is not None
        return new

    async def watch(self, prefix: bytes, seen: asyncio.Queue[float]) -> None:
        async for _ in self.watcher.watch(prefix.decode(), 1):
            seen.put_nowait(time.perf_counter())

    async def grant(self) -> int:
        answer = await self.gateway.call("/v3/lease/grant", {"TTL": LEASE_TTL}, idempotent=True)
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> None:
        await self.gateway.call("/v3/lease/keepalive", {"ID": str(lease)}, idempotent=True)

    async def close(self) -> None:
        for closing in (self.gateway, self.store, self.watcher):
            await closing.close()


class AetcdClient:
    def __init__(self, urls: list[str]) -> None:
        import aetcd

        def client(url: str) -> Any:
            host, port = url.removeprefix("http://").rsplit(":", 1)
            return aetcd.Client(host, int(port), timeout=5)

        self.writer, self.watcher = client(urls[0]), client(urls[2])

    async def connect(self) -> None:
        await self.writer.connect()
        await self.watcher.connect()

    async def put(self, key: bytes) -> int:
        return int((await self.writer.put(key, VALUE)).header.revision)

    async def txn(self, key: bytes, revision: int) -> int:
        ops = self.writer.transactions
        succeeded, responses = await self.writer.transaction(
            compare=[ops.mod(key) == revision], success=[ops.put(key, VALUE)], failure=[]
        )
        assert succeeded
        return int(responses[0].response_put.header.revision)

    async def watch(self, prefix: bytes, seen: asyncio.Queue[float]) -> None:
        async for _ in await self.watcher.watch_prefix(prefix):
            seen.put_nowait(time.perf_counter())

    async def grant(self) -> int:
        return int((await self.writer.lease(LEASE_TTL)).id)

    async def keepalive(self, lease: int) -> None:
        await self.writer.refresh_lease(lease)

    async def close(self) -> None:
        await self.writer.close()
        await self.watcher.close()


class Etcd3aioClient:
    def __init__(self, urls: list[str]) -> None:
        from etcd3aio import Etcd3Client

        self.writer = Etcd3Client([urls[0].removeprefix("http://")])
        self.watcher = Etcd3Client([urls[2].removeprefix("http://")])

    async def connect(self) -> None:
        await self.writer.connect()
        await self.watcher.connect()

    async def put(self, key: bytes) -> int:
        assert self.writer.kv is not None
        return int((await self.writer.kv.put(key, VALUE)).header.revision)

    async def txn(self, key: bytes, revision: int) -> int:
        from etcd3aio._protobuf import Compare
        from etcd3aio.kv import KVService

        assert self.writer.kv is not None
        compare = Compare(key=key, target=Compare.MOD, result=Compare.EQUAL, mod_revision=revision)
        answer = await self.writer.kv.txn([compare], [KVService.txn_op_put(key, VALUE)])
        assert answer.succeeded
        return int(answer.header.revision)

    async def watch(self, prefix: bytes, seen: asyncio.Queue[float]) -> None:
        from etcd3aio.kv import prefix_range_end

        assert self.watcher.watch is not None
        async for response in self.watcher.watch.watch(prefix, range_end=prefix_range_end(prefix)):
            for _ in response.events:
                seen.put_nowait(time.perf_counter())

    async def grant(self) -> int:
        assert self.writer.lease is not None
        return int((await self.writer.lease.grant(LEASE_TTL)).ID)

    async def keepalive(self, lease: int) -> None:
        assert self.writer.lease is not None
        async for _ in self.writer.lease.keep_alive(lease):
            return

    async def close(self) -> None:
        await self.writer.close()
        await self.watcher.close()


CLIENTS: dict[str, Callable[[list[str]], Any]] = {
    "gateway": GatewayClient,
    "aetcd": AetcdClient,
    "etcd3aio": Etcd3aioClient,
}


async def watch_ready(client: Any, key: bytes, seen: asyncio.Queue[float]) -> None:
    """Until the watch (set up in its task, from the current revision for the gRPC
    clients) sees a put; then forget any late events of the puts before."""
    async with asyncio.timeout(10):
        while True:
            await client.put(key)
            try:
                await asyncio.wait_for(seen.get(), 0.2)
                break
            except TimeoutError:
                continue
        await asyncio.sleep(0.2)
        while not seen.empty():
            seen.get_nowait()


async def measure(name: str, urls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Each operation's latencies in seconds, in the order taken."""
    client = CLIENTS[name](urls)
    await client.connect()
    samples: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    prefix = f"/bench/{name}/{uuid.uuid4().hex[:8]}/".encode()  # a round's own keys
    try:
        for i in range(args.puts):
            await timed(samples["put"], lambda i=i: client.put(prefix + b"put/%d" % i))

        revision = await client.put(prefix + b"txn")
        for _ in range(args.puts):
            revision = await timed(
                samples["txn"], lambda r=revision: client.txn(prefix + b"txn", r)
            )

        seen: asyncio.Queue[float] = asyncio.Queue()
        watching = asyncio.create_task(client.watch(prefix + b"watch/", seen))
        await watch_ready(client, prefix + b"watch/ready", seen)
        for i in range(args.watches):
            start = time.perf_counter()
            await client.put(prefix + b"watch/%d" % i)
            samples["watch"].append(await asyncio.wait_for(seen.get(), 10) - start)
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)

        leases = [await timed(samples["lease_grant"], client.grant) for _ in range(args.leases)]
        for lease in leases:
            await timed(samples["lease_keepalive"], lambda lease=lease: client.keepalive(lease))
    finally:
        await client.close()
    return samples


def child(name: str, urls: list[str], args: argparse.Namespace) -> None:
    """Runs in the candidate's own process: prints its samples and costs as JSON."""
    import aiohttp  # noqa: F401 - zdproxy has it loaded already: the baseline

    rss_base, threads_base = proc_status("VmRSS"), proc_status("Threads")
    start = time.perf_counter()
    __import__(CANDIDATES[name])
    imported = time.perf_counter() - start
    rss_import = proc_status("VmRSS")
    samples = asyncio.run(measure(name, urls, args))
    cost = {
        "import_ms": imported * 1e3,
        "rss_import_kib": rss_import - rss_base,
        "rss_after_kib": proc_status("VmRSS") - rss_base,
        "threads_added": proc_status("Threads") - threads_base,
        "distributions": installed(DISTRIBUTIONS[name]),
    }
    print(json.dumps({"samples": samples, "cost": cost}))


def installed(root: str | None) -> dict[str, int]:
    """Bytes on disk of `root` and every installed distribution it requires, by name."""
    sizes: dict[str, int] = {}
    pending = [root] if root else []
    while pending:
        name = pending.pop()
        key = name.lower().replace("_", "-")
        if key in sizes:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # its marker left it out here (e.g. for an older Python)
        sizes[key] = sum(f.size or 0 for f in dist.files or ())
        pending.extend(
            re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]
            for requirement in dist.requires or ()
            if "extra ==" not in requirement
        )
    return sizes


def run_child(name: str, urls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    command = [args.python, __file__, "--child", name, "--urls", ",".join(urls)]
    command += ["--puts", str(args.puts), "--watches", str(args.watches)]
    command += ["--leases", str(args.leases)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # zdproxy.fleet for any interpreter
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed: {last}"}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def summary(runs: list[dict[str, Any]], ours: set[str]) -> dict[str, Any]:
    """A candidate's rounds as one: quantiles over every sample, the median cost."""
    if any("error" in run for run in runs):
        return next(run for run in runs if "error" in run)
    merged = {op: [x for run in runs for x in run["samples"][op]] for op in OPERATIONS}
    costs = [run["cost"] for run in runs]
    cost: dict[str, Any] = {
        field: statistics.median(c[field] for c in costs)
        for field in ("import_ms", "rss_import_kib", "rss_after_kib", "threads_added")
    }
    dists = costs[0]["distributions"]
    cost["new_distributions"] = {n: size for n, size in dists.items() if n not in ours}
    return {**{op: quantiles(merged[op]) for op in OPERATIONS}, "cost": cost}


def report(results: dict[str, Any]) -> None:
    print("latency in ms, median / p99")
    print(f"{'client':10}" + "".join(f"{op:>18}" for op in OPERATIONS))
    for name, result in results.items():
        if "error" in result:
            print(f"{name:10} {result['error']}")
            continue
        cells = (f"{result[op]['median_ms']:.2f} / {result[op]['p99_ms']:.2f}" for op in OPERATIONS)
        print(f"{name:10}" + "".join(f"{cell:>18}" for cell in cells))
    print()
    print(
        f"{'client':10}{'import ms':>10}{'RSS import':>12}{'RSS after':>11}{'threads':>9}  new deps"
    )
    for name, result in results.items():
        if "error" in result:
            continue
        cost = result["cost"]
        new = cost["new_distributions"]
        deps = ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in new.items()) or "none"
        total = f" = {sum(new.values()) / 1e6:.1f} MB" if new else ""
        print(
            f"{name:10}{cost['import_ms']:>10.0f}{cost['rss_import_kib'] / 1024:>9.1f} MB"
            f"{cost['rss_after_kib'] / 1024:>8.1f} MB{cost['threads_added']:>9.0f}  {deps}{total}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter of the candidates")
    parser.add_argument("--clients", default=",".join(CANDIDATES), help="comma list")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--puts", type=int, default=1000, help="puts, and transactions")
    parser.add_argument("--watches", type=int, default=500, help="watch notifications")
    parser.add_argument("--leases", type=int, default=200, help="grants, and keepalives")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/etcd_client.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--urls", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.urls.split(","), args)
        return

    sys.path.insert(0, str(REPO))
    from tests.etcd_cluster import EtcdCluster

    names = args.clients.split(",")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="etcd-bench-") as root:
        cluster = EtcdCluster(Path(root), size=3)
        with cluster:
            print(f"3-member etcd cluster started in {cluster.started_in:.2f} s")
            for round_ in range(args.rounds):
                # Each round starts with another candidate: none always runs first.
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    runs[name].append(run_child(name, cluster.client_urls, args))
    ours = set(installed("zdproxy"))  # what zdproxy installs already
    results = {name: summary(runs[name], ours) for name in names}
    report(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = {"cluster_started_in_s": cluster.started_in, "rounds": args.rounds, **results}
    args.output.write_text(json.dumps(document, indent=2))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
