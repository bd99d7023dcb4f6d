"""Side by side in one run: throughput, latency, CPU and memory of zdproxy and nginx
(one and two worker processes each), against the upstream reached directly.

Absolute req/s on a shared box drift 5-25% between runs, so the numbers to compare
are same-round ratios and CPU per request (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import http.client
import json
import os
import platform
import pwd
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "latest.json"
# The service's glibc tuning: without it 1 MiB bodies flip at random into a 3x-CPU mode.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4194304", "MALLOC_TRIM_THRESHOLD_": "67108864"}
SMALL_BODY = ("zdproxy benchmark small body " * 4)[:100]
SIZES = {"/small": len(SMALL_BODY), "/16k": 16384, "/1m": 1048576}
# "baseline" is zdproxy from another source tree (--baseline), for A/B of a change.
# "routed" is zdproxy with a 50/50 sticky split, three pin rules and health checks.
# "scraped" is zdproxy with its /metrics fetched every SCRAPE_SECONDS, as Prometheus would.
# "-wN": N worker processes (zdproxy's proxy.workers, nginx's worker_processes); zdproxy-w1
# is one process. "routed", "scraped" and "baseline" are one process, like zdproxy-w1.
CONFIGS = (
    "direct",
    "zdproxy-w1",
    "nginx-w1",
    "zdproxy-w2",
    "nginx-w2",
    "routed",
    "scraped",
    "baseline",
)
ZDPROXY_CONFIGS = ("zdproxy-w1", "zdproxy-w2", "routed", "scraped", "baseline")
ALIASES = {"zdproxy": "zdproxy-w1", "nginx": "nginx-w1"}  # their names before workers
WORKER_COUNTS = (1, 2)
SCRAPE_SECONDS = 1.0  # 15x more often than Prometheus' default: the pessimistic case
ROUTED = """
[pools.green]
upstreams = ["127.0.0.1:{up}"]
[pools.blue.health]
path = "/small"
interval = "1s"
[pools.green.health]
path = "/small"
interval = "1s"
[split]
live = "blue"
candidate_weight = 5000
sticky_key = "client-ip"
[[pins]]
name = "tenant"
header = "X-Tenant"
values = ["acme", "globex"]
to = "candidate"
[[pins]]
name = "beta"
path_prefix = ["/beta/"]
to = "green"
[[pins]]
name = "office"
network = ["10.0.0.0/8"]
to = "live"
"""
OTHER_LOAD_LIMIT = 0.15  # cores used by processes we did not start before a row is flagged


@dataclass(frozen=True)
class Goal:
    """A bound on one per-round figure (a key of the ratio rows), judged on the median."""

    label: str
    scenario: str
    key: str
    bound: float
    ceiling: bool = False  # True: the figure must stay at or under the bound

    def met(self, value: float) -> bool:
        return value <= self.bound if self.ceiling else value >= self.bound

    @property
    def fmt(self) -> str:
        """3 places for ratios (0.698 must not print as 0.70), 1 for microseconds."""
        return ".1f" if self.key.endswith("_cpu_us") else ".3f"


SMALL, LARGE = "small-c64", "1m-c64"  # the scenarios the goals judge
GOALS = (  # issue 16: at equal worker counts
    Goal("zdproxy-w1 ÷ nginx-w1 req/s, 100 B c64 >= 0.75", SMALL, "zdproxy_w1_over_nginx_w1", 0.75),
    Goal("zdproxy-w2 ÷ nginx-w2 req/s, 100 B c64 >= 0.75", SMALL, "zdproxy_w2_over_nginx_w2", 0.75),
    Goal("zdproxy-w1 ÷ nginx-w1 req/s, 1 MiB c64 >= 0.9", LARGE, "zdproxy_w1_over_nginx_w1", 0.9),
    Goal("zdproxy-w2 ÷ nginx-w2 req/s, 1 MiB c64 >= 0.9", LARGE, "zdproxy_w2_over_nginx_w2", 0.9),
    Goal("zdproxy-w1 ÷ nginx-w1 CPU per request, 100 B c64 <= 1.3", SMALL,
         "cpu_zdproxy_w1_over_nginx_w1", 1.3, ceiling=True),
    Goal("zdproxy-w2 ÷ nginx-w2 CPU per request, 100 B c64 <= 1.3", SMALL,
         "cpu_zdproxy_w2_over_nginx_w2", 1.3, ceiling=True),
    Goal("zdproxy-w1 CPU per small request (c64) <= 30 us", SMALL, "zdproxy_w1_cpu_us", 30.0,
         ceiling=True),
    Goal("routed ÷ zdproxy-w1 req/s, 100 B c64 >= 0.9", SMALL, "routed_over_zdproxy", 0.9),
    Goal("scraped ÷ zdproxy-w1 req/s, 100 B c64 >= 0.95", SMALL, "scraped_over_zdproxy", 0.95),
)  # fmt: skip


Row = dict[str, Any]
# What a broken proxy or a failed start raises; the row is noted as failed, the run goes on.
ROW_ERRORS = (OSError, RuntimeError, subprocess.SubprocessError, http.client.HTTPException)
COLUMNS = (  # header, row key, format of the rows table
    ("round", "round", ""),
    ("config", "config", ""),
    ("scenario", "scenario", ""),
    ("req/s", "rps", ",.0f"),
    ("p50 ms", "p50_ms", ".2f"),
    ("p99 ms", "p99_ms", ".2f"),
    ("proxy CPU µs/req", "cpu_us_per_req", ".1f"),
    ("of which user / sys", "cpu_user_sys_us", ""),
    ("of which main process", "main_cpu_us_per_req", ".1f"),
    ("upstream CPU µs/req", "upstream_cpu_us_per_req", ".1f"),
    ("peak RSS MiB", "peak_rss_mib", ".1f"),
    ("errors", "errors", ""),
    ("other load (cores)", "other_cores", ".2f"),
)
RATIO_COLUMNS = (  # header, ratio row key, format of the ratios table
    ("scenario", "scenario", ""),
    ("round", "round", ""),
    ("zdproxy-w1 ÷ nginx-w1", "zdproxy_w1_over_nginx_w1", ".3f"),
    ("zdproxy-w2 ÷ nginx-w2", "zdproxy_w2_over_nginx_w2", ".3f"),
    ("CPU/req w1 ÷ nginx-w1", "cpu_zdproxy_w1_over_nginx_w1", ".2f"),
    ("CPU/req w2 ÷ nginx-w2", "cpu_zdproxy_w2_over_nginx_w2", ".2f"),
    ("zdproxy-w2 ÷ w1", "zdproxy_w2_over_w1", ".2f"),
    ("zdproxy-w1 ÷ direct", "zdproxy_over_direct", ".2f"),
    ("zdproxy-w1 ÷ baseline", "zdproxy_over_baseline", ".2f"),
    ("routed ÷ zdproxy-w1", "routed_over_zdproxy", ".2f"),
    ("scraped ÷ zdproxy-w1", "scraped_over_zdproxy", ".2f"),
)


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    conns: int


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("small-c64", "/small", 64),
        Scenario("16k-c64", "/16k", 64),
        Scenario("1m-c64", "/1m", 64),
        Scenario("small-c256", "/small", 256),
        Scenario("16k-c256", "/16k", 256),
        Scenario("1m-c256", "/1m", 256),
    )
}


@dataclass
class Child:
    """A process we started in its own session: Ctrl-C reaches only us, and we stop it."""

    name: str
    proc: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        """The process and its descendants (nginx: master + workers)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    parents[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
        found, frontier = [self.proc.pid], [self.proc.pid]
        while frontier:
            frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
            found += frontier
        return found


CHILDREN: list[Child] = []


@dataclass
class Env:
    tmp: Path
    wrk: str
    nginx: str | None
    raw_upstream: bool
    upstream_port: int = 0
    notes: list[str] = field(default_factory=list)
    baseline: Path | None = None
    admin_port: int = field(default_factory=lambda: free_port())


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name, which may itself contain spaces."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """utime and stime: user space (Python, parsers) apart from the kernel (syscalls, TCP)."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            user, system = user + int(fields[11]), system + int(fields[12])
    return user / os.sysconf("SC_CLK_TCK"), system / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """Busy CPU time of the whole machine; what we did not start is noise.

    Interrupt ticks count too: the kernel charges them to the task they interrupt,
    so our processes' stime includes them.
    """
    user, nice, system, _idle, _iowait, irq, softirq = map(
        int, Path("/proc/stat").read_text().split()[1:8]
    )
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def reaped_cpu() -> float:
    """CPU of our reaped children: taken around one wrk run, it is wrk's own cost."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib(pids: list[int]) -> float:
    """Sum of VmHWM; nginx master and worker share pages, counted twice as in the anchors."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


def ensure_tools(notes: list[str]) -> tuple[str, str | None]:
    """Install nginx and wrk from Debian when missing: every checkout measures the same way."""

    def find(name: str) -> str | None:
        paths = (f"/usr/sbin/{name}", f"/usr/bin/{name}")
        return shutil.which(name) or next((p for p in paths if os.access(p, os.X_OK)), None)

    def apt(*args: str) -> bool:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "-q", *args]
        return subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=False).returncode == 0

    if (find("nginx") is None or find("wrk") is None) and shutil.which("apt-get"):
        print("installing nginx and wrk with apt-get ...", file=sys.stderr, flush=True)
        apt("update")  # once; then the lightest package set that installs
        for pkgs in (["nginx-light", "wrk"], ["nginx", "wrk"], ["wrk"]):
            if apt("install", "-y", "--no-install-recommends", *pkgs):
                break
    wrk, nginx = find("wrk"), find("nginx")
    if wrk is None:
        sys.exit("wrk is missing and could not be installed (apt-get install wrk)")
    if nginx is None:
        notes.append("nginx could not be installed: raw uvloop upstream, no nginx config")
    return wrk, nginx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nginx_conf(
    tmp: Path, name: str, port: int, server: str, http_extra: str = "", workers: int = 1
) -> Path:
    """A self-contained nginx config: own pid, logs and temp paths, never the system ones."""
    user = ""
    if os.geteuid() == 0:  # workers drop to nobody: name its real group (Debian: nogroup)
        user = f"user nobody {grp.getgrgid(pwd.getpwnam('nobody').pw_gid).gr_name};"
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temps = "\n".join(f"  {kind}_temp_path {tmp}/{name}-{kind};" for kind in kinds)
    path = tmp / f"{name}.conf"
    path.write_text(f"""{user}
worker_processes {workers};
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
env MALLOC_MMAP_THRESHOLD_;
env MALLOC_TRIM_THRESHOLD_;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 75s;
{temps}
{http_extra}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
{server}
  }}
}}
""")
    return path


def nginx_argv(env: Env, conf: Path) -> list[str]:
    """-p and -e keep nginx off /etc/nginx and /var/log/nginx even before it reads conf."""
    assert env.nginx is not None
    error_log = conf.with_name(conf.stem + "-error.log")
    return [env.nginx, "-p", str(env.tmp), "-e", str(error_log), "-c", str(conf)]


def start_child(
    env: Env, name: str, argv: list[str], port: int, extra_env: dict[str, str] | None = None
) -> Child:
    """Start a server with the malloc env and wait until its port accepts."""
    log = env.tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=env.tmp,
            env={**os.environ, **MALLOC_ENV, **(extra_env or {})},
            start_new_session=True,
        )
    child = Child(name, proc)
    CHILDREN.append(child)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return child
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not accept on port {port} within 15 s")


def stop_child(child: Child) -> None:
    """SIGTERM, then SIGKILL of its whole session (nginx workers must not outlive it)."""
    if child in CHILDREN:
        CHILDREN.remove(child)
    if child.proc.poll() is None:
        child.proc.terminate()
        try:
            child.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(child.proc.pid, signal.SIGKILL)
            child.proc.wait(5)


def start_upstream(env: Env) -> Child:
    """One upstream for the whole run: nginx 1 worker, or the raw uvloop server."""
    port = env.upstream_port = free_port()
    www = env.tmp / "www"
    www.mkdir()
    (www / "16k").write_bytes(os.urandom(SIZES["/16k"]))
    (www / "1m").write_bytes(os.urandom(SIZES["/1m"]))
    if env.nginx is None or env.raw_upstream:
        argv = [sys.executable, __file__, "--serve-raw", str(port)]
    else:
        server = f"""    root {www};
    sendfile on;
    location = /small {{ default_type text/plain; return 200 "{SMALL_BODY}"; }}"""
        argv = nginx_argv(env, nginx_conf(env.tmp, "upstream", port, server))
    return start_child(env, "upstream", argv, port)


def workers_of(config: str) -> int:
    """The worker processes a config asks for: N for "-wN", else 1."""
    return int(config.rpartition("-w")[2]) if "-w" in config else 1


def start_proxy(env: Env, config: str) -> tuple[Child | None, int]:
    """A fresh proxy for every measured row, so no state carries over between rows."""
    if config == "direct":
        return None, env.upstream_port
    port = free_port()
    if config in ZDPROXY_CONFIGS:
        conf = env.tmp / "zdproxy.toml"
        routing = (
            ROUTED.format(up=env.upstream_port)
            if config == "routed"
            else '[split]\nlive = "blue"\ncandidate_weight = 0\n'
        )
        # The one-process configs write no `workers` line: a --baseline tree may predate it.
        workers = f"workers = {workers_of(config)}\n" if config.startswith("zdproxy-w") else ""
        conf.write_text(
            f'[proxy]\nlisten = "127.0.0.1:{port}"\n{workers}'
            '[upstream]\nmax_idle_per_upstream = 1024\nidle_timeout = "30s"\n'
            '[log]\nlevel = "warning"\n'
            f'[pools.blue]\nupstreams = ["127.0.0.1:{env.upstream_port}"]\n{routing}'
        )
        # The zdproxy installed next to this python: started exactly as users start it.
        argv = [str(Path(sys.executable).with_name("zdproxy")), "run", "--config", str(conf)]
        # Admin and state through the environment, which a baseline tree without them ignores.
        extra = {
            "ZDPROXY_ADMIN__LISTEN": f"127.0.0.1:{env.admin_port}",
            "ZDPROXY_STATE__DIR": str(env.tmp / "state"),
        }
        if config == "baseline":  # its tree comes first on the path, ahead of the installed one
            extra["PYTHONPATH"] = str(env.baseline)
        return start_child(env, config, argv, port, extra), port
    upstream = (  # idle keepalive >= the highest concurrency, like zdproxy's idle pool
        f"  upstream backend {{ server 127.0.0.1:{env.upstream_port}; keepalive 1024;\n"
        "    keepalive_requests 100000000; keepalive_timeout 60s; }"
    )
    server = """    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffers 16 16k;
      proxy_max_temp_file_size 0;
    }"""
    conf = nginx_conf(env.tmp, config, port, server, upstream, workers_of(config))
    return start_child(env, config, nginx_argv(env, conf), port), port


class Scraper(threading.Thread):
    """Fetches zdproxy's /metrics every SCRAPE_SECONDS until stopped, as Prometheus does."""

    def __init__(self, admin_port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{admin_port}/metrics"
        self.stopped = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while not self.stopped.wait(SCRAPE_SECONDS):
            with opener.open(self.url, timeout=5) as response:
                if response.status == 200 and response.read():
                    self.scrapes += 1

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return self.scrapes


def check_bodies(port: int) -> None:
    """A fast but wrong proxy must not look good: every body arrives whole, with a 200."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no http_proxy
    for path, size in SIZES.items():
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            body = resp.read()
            if resp.status != 200 or len(body) != size:
                raise RuntimeError(f"GET {path} via :{port}: {resp.status}, {len(body)} bytes")


def run_wrk(env: Env, port: int, scenario: Scenario, seconds: float) -> str:
    """One wrk run against loopback, bounded in time; returns its report."""
    url = f"http://127.0.0.1:{port}{scenario.path}"
    argv = [env.wrk, "-t2", f"-c{scenario.conns}", f"-d{seconds:g}s", "--timeout", "5s"]
    proc = subprocess.Popen(
        [*argv, "--latency", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    child = Child("wrk", proc)
    CHILDREN.append(child)
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    finally:
        stop_child(child)
    return out.decode(errors="replace")


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(text: str) -> Row:
    """req/s, percentiles and errors (socket errors + non-2xx/3xx) from wrk's report."""
    pcts = {p: _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", text, re.M)}
    requests = re.search(r"(\d+) requests in", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if requests is None or rps is None:
        raise RuntimeError(f"cannot parse wrk output:\n{text}")
    sock = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = sum(int(n) for n in sock.groups()) if sock else 0
    bad = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", text)) else 0
    return {
        "rps": float(rps.group(1)),
        "requests": int(requests.group(1)),
        "p50_ms": pcts.get("50"),
        "p99_ms": pcts.get("99"),
        "latency_ms": pcts,
        "socket_errors": socket_errors,
        "non_2xx": bad,
        "errors": socket_errors + bad,
    }


def wait_quiet(env: Env, limit_s: float) -> None:
    """Other sessions' tests on this box would skew a row: wait for them to pause first."""
    start = time.monotonic()
    while True:
        busy0 = busy_seconds()
        time.sleep(1.0)
        load = busy_seconds() - busy0
        waited = time.monotonic() - start
        if load <= OTHER_LOAD_LIMIT:
            if waited > 1.5:
                print(f"  waited {waited:.0f} s for other load to stop", file=sys.stderr)
            return
        if waited > limit_s:
            env.notes.append(f"the box was never quiet for {limit_s:g} s ({load:.2f} cores busy)")
            return


def measure(
    env: Env, upstream: Child, config: str, scen: Scenario, args: argparse.Namespace
) -> Row:
    """Fresh proxy, body check, warm-up, then the measured run with /proc deltas around it."""
    proxy, port = start_proxy(env, config)
    try:
        check_bodies(port)
        run_wrk(env, port, scen, args.warmup)
        pids, up_pids = (proxy.pids() if proxy else []), upstream.pids()
        scraper = Scraper(env.admin_port) if config == "scraped" else None
        # pids[:1]: the process the script started (zdproxy's main process, nginx's master)
        main = pids[:1]
        before = (*cpu_seconds(pids), sum(cpu_seconds(up_pids)), busy_seconds(), reaped_cpu())
        main_before = sum(cpu_seconds(main))
        start = time.monotonic()
        if scraper is not None:
            scraper.start()
        report = run_wrk(env, port, scen, args.duration)
        scrapes = scraper.stop() if scraper is not None else None
        wall = time.monotonic() - start
        after = (*cpu_seconds(pids), sum(cpu_seconds(up_pids)), busy_seconds(), reaped_cpu())
        main_cpu = sum(cpu_seconds(main)) - main_before
        rss = peak_rss_mib(pids) if proxy else None
    finally:
        if proxy is not None:
            stop_child(proxy)
    user, system, up_cpu, busy, wrk_cpu = (b - a for a, b in zip(before, after, strict=True))
    cpu = user + system
    row: Row = {"config": config, "scenario": scen.name, **parse_wrk(report)}
    n = max(row["requests"], 1)
    row |= {
        "processes": len(pids),
        "main_cpu_us_per_req": main_cpu / n * 1e6 if proxy and len(pids) > 1 else None,
        "cpu_us_per_req": cpu / n * 1e6 if proxy else None,
        "cpu_user_us_per_req": user / n * 1e6 if proxy else None,
        "cpu_sys_us_per_req": system / n * 1e6 if proxy else None,
        "cpu_user_sys_us": f"{user / n * 1e6:.1f} / {system / n * 1e6:.1f}" if proxy else None,
        "peak_rss_mib": rss,
        "upstream_cpu_us_per_req": up_cpu / n * 1e6,
        "wrk_cores": wrk_cpu / wall,
        "other_cores": max(busy - cpu - up_cpu - wrk_cpu, 0.0) / wall,
        "scrapes": scrapes,
        "wrk_output": report,
    }
    return row


def run_one(
    env: Env, upstream: Child, rnd: int, config: str, scen: Scenario, args: argparse.Namespace
) -> list[Row]:
    """One row, measured again (once) if other load disturbed it; a failure is noted."""
    tag = f"round {rnd} {config} {scen.name}"
    for attempt in (1, 2):
        if args.quiet_wait > 0:
            wait_quiet(env, args.quiet_wait)
        try:
            row = {"round": rnd, **measure(env, upstream, config, scen, args)}
        except ROW_ERRORS as exc:
            env.notes.append(f"{tag} FAILED: {exc}")
            print(f"  {env.notes[-1]}", file=sys.stderr)
            return []
        cpu = _cell(row["cpu_us_per_req"], ".1f")
        print(f"  {tag:30} {row['rps']:>10,.0f} req/s  cpu {cpu} µs/req", file=sys.stderr)
        disturbed = row["other_cores"] > OTHER_LOAD_LIMIT
        if not disturbed:
            if attempt == 2:
                env.notes.append(f"{tag}: measured twice, the first was disturbed by other load")
            return [row]
        print(f"  other load {row['other_cores']:.2f} cores: disturbed", file=sys.stderr)
    env.notes.append(f"{tag}: other processes used {row['other_cores']:.2f} cores: disturbed")
    return [row]


def ratios(rows: list[Row]) -> list[Row]:
    """The per-round figures the goals judge, numerator and denominator from one round:
    zdproxy-wN over nginx-wN (req/s and CPU per request), zdproxy-w2 over zdproxy-w1,
    zdproxy-w1 over direct and baseline, routed and scraped over zdproxy-w1."""
    by = {(r["round"], r["config"], r["scenario"]): r for r in rows}

    def over(rnd: int, scen: str, top: str, bottom: str, key: str = "rps") -> float | None:
        a, b = by.get((rnd, top, scen)), by.get((rnd, bottom, scen))
        if a is None or b is None or not a[key] or not b[key]:
            return None
        return float(a[key] / b[key])

    out = []
    for rnd, scen in sorted({(rnd, scen) for rnd, _, scen in by}):
        if not any((rnd, f"zdproxy-w{n}", scen) in by for n in WORKER_COUNTS):
            continue
        row: Row = {"scenario": scen, "round": rnd}
        for n in WORKER_COUNTS:
            zd, ng = f"zdproxy-w{n}", f"nginx-w{n}"
            row[f"zdproxy_w{n}_over_nginx_w{n}"] = over(rnd, scen, zd, ng)
            row[f"cpu_zdproxy_w{n}_over_nginx_w{n}"] = over(rnd, scen, zd, ng, "cpu_us_per_req")
        row["zdproxy_w2_over_w1"] = over(rnd, scen, "zdproxy-w2", "zdproxy-w1")
        w1 = by.get((rnd, "zdproxy-w1", scen))
        row["zdproxy_w1_cpu_us"] = w1["cpu_us_per_req"] if w1 else None
        for other in ("direct", "baseline"):
            row[f"zdproxy_over_{other}"] = over(rnd, scen, "zdproxy-w1", other)
        for variant in ("routed", "scraped"):
            row[f"{variant}_over_zdproxy"] = over(rnd, scen, variant, "zdproxy-w1")
        out.append(row)
    return out


def goals(rats: list[Row]) -> list[Row]:
    """Informational PASS/MISS on the median over rounds; a miss never fails the run."""
    out = []
    for goal in GOALS:
        vals = [r[goal.key] for r in rats if r["scenario"] == goal.scenario]
        vals = [v for v in vals if v is not None]
        median = statistics.median(vals) if vals else None
        ok = None if median is None else goal.met(median)
        verdict = {None: "n/a", True: "PASS", False: "MISS"}[ok]
        row = {"goal": goal.label, "values": vals, "median": median, "verdict": verdict}
        out.append(row | {"fmt": goal.fmt})
    return out


def _cell(value: object, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _line(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render(rows: list[Row], rats: list[Row], gls: list[Row]) -> str:
    """Markdown tables in the order a reader checks them: rows, ratios, goals."""
    order = {name: i for i, name in enumerate(SCENARIOS)}

    def key(r: Row) -> tuple[int, int, int]:  # scenario, round, then config
        return order[r["scenario"]], r["round"], CONFIGS.index(r.get("config", "zdproxy-w1"))

    lines = [_line(*(c[0] for c in COLUMNS)), "|" + "---|" * 3 + "--:|" * (len(COLUMNS) - 3)]
    lines += [
        _line(*(_cell(r[name], fmt) for _, name, fmt in COLUMNS)) for r in sorted(rows, key=key)
    ]
    lines += [
        "",
        _line(*(c[0] for c in RATIO_COLUMNS)),
        "|---|--:|" + "--:|" * (len(RATIO_COLUMNS) - 2),
    ]
    lines += [
        _line(*(_cell(r[name], fmt) for _, name, fmt in RATIO_COLUMNS))
        for r in sorted(rats, key=key)
    ]
    lines += ["", _line("goal (informational)", "per round", "median", "verdict")]
    lines += ["|---|---|--:|---|"]
    lines += [
        _line(
            g["goal"],
            " / ".join(_cell(v, g["fmt"]) for v in g["values"]) or "-",
            _cell(g["median"], g["fmt"]),
            g["verdict"],
        )
        for g in gls
    ]
    return "\n".join(lines)


def _version(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def machine_facts(env: Env) -> Row:
    """What the numbers depend on, printed and stored with them."""
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    raw = env.raw_upstream or env.nginx is None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu.group(1) if cpu else "?",
        "kernel": platform.release(),
        "libc": " ".join(platform.libc_ver()),
        "python": sys.version.split()[0],
        "nginx": _version([env.nginx, "-v"]) if env.nginx else "not installed",
        "wrk": _version([env.wrk, "-v"]),
        **{p: metadata.version(p) for p in ("zdproxy", "httptools", "uvloop", "aiohttp")},
        "zdproxy_rev": _version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "upstream": "raw uvloop server" if raw else "nginx 1 worker",
    }


def serve_raw(port: int) -> None:
    """Fallback upstream without nginx: fixed keep-alive responses, next to no CPU per request."""
    import uvloop

    bodies = {"/small": SMALL_BODY.encode(), "/16k": b"x" * 16384, "/1m": b"x" * 1048576}
    replies = {
        p.encode(): b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
        for p, b in bodies.items()
    }
    missing = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    class Raw(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while b"\r\n\r\n" in self.buf:  # GETs without bodies: a head is a whole request
                head, self.buf = self.buf.split(b"\r\n\r\n", 1)
                self.transport.write(replies.get((head.split(b" ") + [b""] * 2)[1], missing))

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Raw, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(serve())


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 s, 1 round, 1 s warm-up")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list (default all)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma list (default all)")
    p.add_argument("--upstream", choices=("auto", "raw"), default="auto", help="raw: no nginx")
    quiet = "before each row, wait up to S s for other processes' load to stop (0: never)"
    p.add_argument("--quiet-wait", type=float, default=120.0, metavar="S", help=quiet)
    p.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    base = "source tree of another zdproxy revision, measured as config 'baseline' (A/B)"
    p.add_argument("--baseline", type=Path, metavar="DIR", help=base)
    p.add_argument("--serve-raw", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.duration, args.rounds, args.warmup = 3.0, 1, 1.0
    args.configs = ",".join(ALIASES.get(name, name) for name in args.configs.split(","))
    for option, known in (("scenarios", SCENARIOS), ("configs", CONFIGS)):
        for name in getattr(args, option).split(","):
            if name not in known:
                p.error(f"unknown {option[:-1]} {name!r}; known: {', '.join(known)}")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through main's finally, which stops every child


def main() -> int:
    args = parse_args()
    if args.serve_raw:
        serve_raw(args.serve_raw)
        return 0
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # also when inherited ignored
        signal.signal(sig, _interrupt)
    notes: list[str] = []
    wrk, nginx = ensure_tools(notes)
    scenarios = [SCENARIOS[s] for s in args.scenarios.split(",")]
    configs = [
        c
        for c in args.configs.split(",")
        if (not c.startswith("nginx") or nginx) and (c != "baseline" or args.baseline)
    ]
    if args.rounds < 2:
        notes.append("1 round: a smoke test only; draw no conclusion from it")
    command = shlex.join([sys.executable, *sys.argv])
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="zdbench-") as tmp:
        os.chmod(tmp, 0o755)  # nginx workers (user nobody) read the static files
        env = Env(Path(tmp), wrk, nginx, args.upstream == "raw" or nginx is None, notes=notes)
        env.baseline = args.baseline.resolve() if args.baseline else None
        facts = machine_facts(env)
        print(f"command: {command}\nmachine: {json.dumps(facts)}", flush=True)
        try:
            upstream = start_upstream(env)
            for rnd in range(1, args.rounds + 1):  # configs back to back within a scenario
                for scen in scenarios:
                    for config in configs:
                        rows += run_one(env, upstream, rnd, config, scen, args)
        except KeyboardInterrupt:
            print("interrupted: stopped every process this run started", file=sys.stderr)
            return 130
        finally:
            for child in reversed(CHILDREN[:]):
                stop_child(child)
    rats = ratios(rows)
    gls = goals(rats)
    print("\n" + render(rows, rats, gls))
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {note}" for note in notes))
    result = {
        "command": command,
        "machine": facts,
        "notes": notes,
        "args": {k: str(v) for k, v in vars(args).items() if k != "serve_raw"},
        "scenarios": [asdict(s) for s in scenarios],
        "rows": rows,
        "ratios": rats,
        "goals": gls,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"\nresults: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
