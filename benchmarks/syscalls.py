"""Syscalls per request of zdproxy and of nginx, by name, under the same wrk load.

Kernel time is about half of zdproxy's CPU per small request; this says which syscalls
it goes to, next to nginx's for the same requests. For each scenario and tracer,
zdproxy-wN and then nginx-wN (run.py's configs, upstream and wrk) start fresh and are
warmed up; then one tracer attaches to each process of the proxy (zdproxy: its one
process, or the main process and each worker; nginx: the master and each worker), wrk
runs for a fixed time, and the tracer detaches and counts. Calls divided by the
requests wrk got answered are the calls per request.

    .venv/bin/python benchmarks/syscalls.py [--scenarios small-c64,1m-c64] [--workers 1]

Two tracers, each with its own run (`--tracers`):

- `perf`: `perf stat -e 'syscalls:sys_enter_*' -p PID` counts in the kernel, at a
  far smaller cost per syscall than strace: the proxies keep most of their speed, so
  the epoll waits per request are close to those of a real load. No error counts.
- `strace`: `strace -c -f -p PID` stops the process at every syscall: several times
  fewer requests, so a slowed process finds more events ready per epoll wait (fewer
  waits per request); the calls that come once per request (reads, writes) do not
  change. It also counts the calls that failed (EAGAIN). Its stops are context
  switches: its runs show no sleeps.

Below the syscalls, from /proc: "sleeps" are the voluntary context switches of the
proxy's threads per request (how often it went to sleep waiting for events, each one
a wake-up later), "page faults" its minor faults per request (memory touched for the
first time, or again after it was given back to the kernel).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import (  # noqa: E402 - run.py is the one definition of the setups
    CHILDREN,
    SCENARIOS,
    Child,
    Env,
    _interrupt,
    _stat_fields,
    check_bodies,
    ensure_tools,
    parse_wrk,
    run_wrk,
    start_proxy,
    start_upstream,
    stop_child,
    wait_quiet,
)

RESULTS = HERE / "results" / "syscalls.json"
ATTACH_SECONDS = 10.0  # bound for a tracer to hold every thread of a process
# strace -c's table: % time, seconds, usecs/call, calls, errors (may be blank), syscall.
STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")
PERF_EVENTS = "syscalls:sys_enter_*"
TRACEPOINTS = Path("/sys/kernel/tracing/events/syscalls")
NEGLIGIBLE = 0.01  # calls per request below which a row, or a role's column, is left out
SLEEPS, FAULTS = "(sleeps)", "(page faults)"  # rows of what is not a syscall


class Tracer(StrEnum):
    PERF = "perf"
    STRACE = "strace"


@dataclass(frozen=True)
class Traced:
    """One tracer attached to one process of a proxy."""

    role: str  # "zdproxy" (one process), "main", "worker", "master"
    pid: int
    child: Child
    counts: Path  # the tracer's output file
    messages: Path  # its stderr


def install(tool: str, package: str) -> str | None:
    """The tool, installed from Debian when missing (as run.py installs wrk and nginx)."""
    if (found := shutil.which(tool)) is None and shutil.which("apt-get"):
        print(f"installing {package} with apt-get ...", file=sys.stderr, flush=True)
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        for args in (["update"], ["install", "-y", "--no-install-recommends", package]):
            subprocess.run(["apt-get", "-q", *args], env=env, stdout=subprocess.DEVNULL)
        found = shutil.which(tool)
    return found


def perf_usable(perf: str) -> bool:
    """perf can count syscall tracepoints here (root, or a low perf_event_paranoid)."""
    probe = [perf, "stat", "-e", "raw_syscalls:sys_enter", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def role_of(config: str, proxy: Child, pid: int) -> str:
    if pid != proxy.proc.pid:
        return "worker"
    if config.startswith("nginx"):
        return "master"
    return "zdproxy" if config == "zdproxy-w1" else "main"


def threads(pid: int) -> list[int]:
    return [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]


def events(pid: int) -> Counter[str]:
    """What the process did besides syscalls, so far: voluntary context switches of all
    its threads (sleeps) and minor page faults (first touches of memory)."""
    found = Counter({FAULTS: int(_stat_fields(pid)[7])})
    for tid in threads(pid):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    found[SLEEPS] += int(line.split()[1])
    return found


def attach(tracer: Tracer, tool: str, env: Env, config: str, proxy: Child) -> list[Traced]:
    """One tracer per process of the proxy; returns once each holds all its threads."""
    traced = []
    for pid in proxy.pids():
        counts = env.tmp / f"{tracer}-{config}-{pid}.txt"
        messages = counts.with_suffix(".log")
        if tracer is Tracer.STRACE:
            argv = [tool, "-c", "-f", "-p", str(pid), "-o", str(counts)]
        else:
            argv = [tool, "stat", "-x", ",", "-o", str(counts), "-e", PERF_EVENTS, "-p", str(pid)]
        with messages.open("wb") as err:
            proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
        child = Child(f"{tracer} {pid}", proc)
        CHILDREN.append(child)
        traced.append(Traced(role_of(config, proxy, pid), pid, child, counts, messages))
    deadline = time.monotonic() + ATTACH_SECONDS
    for t in traced:
        while not attached(tracer, t):
            if t.child.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{tracer} did not attach: {t.messages.read_text()[-500:]}")
            time.sleep(0.05)
    return traced


def attached(tracer: Tracer, t: Traced) -> bool:
    if tracer is Tracer.STRACE:  # "Process PID attached (with N threads)", once it holds all
        return f"Process {t.pid} attached" in t.messages.read_text()
    # perf opens one counter per tracepoint and thread before it counts
    events = len(list(TRACEPOINTS.glob("sys_enter_*")))
    fds = Path(f"/proc/{t.child.proc.pid}/fd").iterdir()
    opened = sum(1 for fd in fds if "perf_event" in _readlink(fd))
    return opened >= events * len(threads(t.pid))


def _readlink(path: Path) -> str:
    try:
        return str(path.readlink())
    except OSError:
        return ""


def detach(tracer: Tracer, traced: list[Traced]) -> dict[str, tuple[Counter[str], Counter[str]]]:
    """SIGINT makes the tracer detach and write its counts: (calls, errors) by role."""
    for t in traced:
        t.child.proc.send_signal(signal.SIGINT)
    by_role: dict[str, tuple[Counter[str], Counter[str]]] = {}
    for t in traced:
        t.child.proc.wait(15)
        stop_child(t.child)
        calls, errors = by_role.setdefault(t.role, (Counter(), Counter()))
        for line in t.counts.read_text().splitlines():
            if tracer is Tracer.STRACE:
                if (m := STRACE_LINE.match(line)) and m.group(3) != "total":
                    calls[m.group(3)] += int(m.group(1))
                    errors[m.group(3)] += int(m.group(2) or 0)
            elif (fields := line.split(","))[0].isdigit() and int(fields[0]):
                calls[fields[2].removeprefix("syscalls:sys_enter_")] += int(fields[0])
    return by_role


def measure(
    tracer: Tracer, tool: str, env: Env, config: str, scenario: str, args: Any
) -> dict[str, Any]:
    scen = SCENARIOS[scenario]
    if args.quiet_wait > 0:
        wait_quiet(env, args.quiet_wait)
    proxy, port = start_proxy(env, config)
    assert proxy is not None
    try:
        check_bodies(port)
        run_wrk(env, port, scen, args.warmup)
        traced = attach(tracer, tool, env, config, proxy)
        before = {t.pid: events(t.pid) for t in traced}
        report = parse_wrk(run_wrk(env, port, scen, args.duration))
        during = {pid: events(pid) - counts for pid, counts in before.items()}
        by_role = detach(tracer, traced)
    finally:
        stop_child(proxy)
    for t in traced:
        if tracer is Tracer.STRACE:  # its stops count as sleeps: they say nothing here
            del during[t.pid][SLEEPS]
        by_role[t.role][0].update(during[t.pid])
    n = max(report["requests"], 1)
    roles = {
        role: {
            "calls_per_request": {name: c / n for name, c in calls.most_common()},
            "errors_per_request": {name: e / n for name, e in errors.items() if e},
        }
        for role, (calls, errors) in by_role.items()
    }
    total = sum(
        c
        for r in roles.values()
        for k, c in r["calls_per_request"].items()
        if not k.startswith("(")
    )
    print(
        f"  {tracer:6} {config:10} {scenario:10} {report['rps']:>8,.0f} req/s, "
        f"{total:.2f} syscalls/req",
        file=sys.stderr,
    )
    return {
        "tracer": str(tracer),
        "config": config,
        "scenario": scenario,
        "requests": n,
        "rps": report["rps"],
        "errors": report["errors"],
        "roles": roles,
    }


def render(results: list[dict[str, Any]]) -> str:
    """Per scenario, one table: a row per syscall, a column per proxy and tracer (and per
    role where more than one role makes calls): calls per request, errors after a slash."""
    out = []
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        runs = [r for r in results if r["scenario"] == scenario]
        columns: list[tuple[str, list[dict[str, Any]]]] = []  # header, the roles it sums
        for r in runs:
            roles, head = r["roles"], f"{r['config']} ({r['tracer']})"
            columns.append((head, list(roles.values())))
            busy = [
                k for k, v in roles.items() if sum(v["calls_per_request"].values()) >= NEGLIGIBLE
            ]
            if len(busy) > 1:
                columns += [(f"{head} {role}", [roles[role]]) for role in busy]

        def per_request(parts: list[dict[str, Any]], key: str, name: str) -> float:
            return float(sum(part[key].get(name, 0.0) for part in parts))

        names = {name for r in runs for v in r["roles"].values() for name in v["calls_per_request"]}
        table = {  # syscall: (calls, errors) per column
            name: [
                (
                    per_request(parts, "calls_per_request", name),
                    per_request(parts, "errors_per_request", name),
                )
                for _, parts in columns
            ]
            for name in names
        }
        rates = ", ".join(f"{r['config']} ({r['tracer']}) {r['rps']:,.0f}" for r in runs)
        out += [f"\n{scenario}: calls (/ errors) per request; req/s traced: {rates}\n"]
        out += ["| syscall | " + " | ".join(head for head, _ in columns) + " |"]
        out += ["|---|" + "--:|" * len(columns)]
        others = {name: table.pop(name) for name in (SLEEPS, FAULTS) if name in table}
        for name, cells in sorted(table.items(), key=lambda item: -max(c for c, _ in item[1])):
            if max(c for c, _ in cells) >= NEGLIGIBLE:
                shown = [f"{c:.2f}" + (f" / {e:.2f}" if e >= NEGLIGIBLE else "") for c, e in cells]
                out.append(f"| {name} | {' | '.join(shown)} |")
        totals = [sum(c for c, _ in column) for column in zip(*table.values(), strict=True)]
        out.append("| **all syscalls** | " + " | ".join(f"**{t:.2f}**" for t in totals) + " |")
        for name, cells in others.items():
            shown = [
                f"{c:.2f}" if any(name in part["calls_per_request"] for part in parts) else "-"
                for (c, _), (_, parts) in zip(cells, columns, strict=True)
            ]
            out.append(f"| {name} | " + " | ".join(shown) + " |")
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    p.add_argument("--scenarios", default="small-c64,1m-c64", help="run.py scenarios (comma list)")
    p.add_argument(
        "--workers", type=int, choices=(1, 2), default=1, help="N of zdproxy-wN, nginx-wN"
    )
    p.add_argument("--tracers", default="perf,strace", help="comma list of perf, strace")
    p.add_argument("--duration", type=float, default=5.0, help="traced seconds of wrk (5)")
    p.add_argument("--warmup", type=float, default=2.0, help="untraced warm-up seconds (2)")
    quiet = "before each proxy, wait up to S s for other processes' load to stop (0: never)"
    p.add_argument("--quiet-wait", type=float, default=60.0, metavar="S", help=quiet)
    p.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = p.parse_args()
    for option, known in (("scenarios", SCENARIOS), ("tracers", list(Tracer))):
        for name in getattr(args, option).split(","):
            if name not in known:
                p.error(f"unknown {option[:-1]} {name!r}; known: {', '.join(map(str, known))}")
    return args


def tools(wanted: list[Tracer], notes: list[str]) -> dict[Tracer, str]:
    """The tracers' programs, in the order asked for (installed when missing)."""
    found: dict[Tracer, str] = {}
    for tracer in wanted:
        if tracer is Tracer.STRACE:
            if (strace := install("strace", "strace")) is None:
                sys.exit("strace is missing and could not be installed (apt-get install strace)")
            found[tracer] = strace
        elif (perf := install("perf", "linux-perf")) is not None and perf_usable(perf):
            found[tracer] = perf
        else:
            notes.append("perf cannot count syscall tracepoints here: left out")
    return found


def main() -> int:
    args = parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    notes: list[str] = []
    wrk, nginx = ensure_tools(notes)
    if nginx is None:
        sys.exit("nginx is missing and could not be installed: nothing to compare with")
    tracers = tools([Tracer(t) for t in args.tracers.split(",")], notes)
    configs = [f"zdproxy-w{args.workers}", f"nginx-w{args.workers}"]
    command = shlex.join([sys.executable, *sys.argv])
    results = []
    with tempfile.TemporaryDirectory(prefix="zdsyscalls-") as tmp:
        Path(tmp).chmod(0o755)  # nginx workers (user nobody) read the static files
        env = Env(Path(tmp), wrk, nginx, raw_upstream=False, notes=notes)
        print(f"command: {command}", flush=True)
        try:
            start_upstream(env)
            for scenario in args.scenarios.split(","):
                for tracer, tool in tracers.items():
                    results += [measure(tracer, tool, env, c, scenario, args) for c in configs]
        except KeyboardInterrupt:
            print("interrupted: stopped every process this run started", file=sys.stderr)
            return 130
        finally:
            for child in reversed(CHILDREN[:]):
                stop_child(child)
    print(render(results))
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {note}" for note in notes))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"command": command, "results": results}, indent=2))
    print(f"\nresults: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
