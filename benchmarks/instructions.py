"""Instructions per proxied request, counted by callgrind: repeatable where CPU time is not.

On a shared 2-core VM the CPU microseconds per request of one build move by 30%
between rounds, more than most hot-path changes gain or lose. Callgrind counts
the instructions the proxy executes, which depend only on the code and the
input. The script runs zdproxy under callgrind twice, for N1 and N2 small
requests (keep-alive, a fixed number of connections, a raw upstream), and
reports (Ir(N2) - Ir(N1)) / (N2 - N1): start-up and shutdown cancel out.

    .venv/bin/python benchmarks/instructions.py [--baseline DIR|REV] [--requests 20000]

With --baseline, a second source tree is measured the same way, for an A/B of a
change: a directory, or a git revision of this repository (e.g. `HEAD~1`), which
is exported with `git archive` to a temporary directory. The two trees' runs
alternate, so that a change of the machine's load (which stretches valgrind's run,
and so the timer work counted in it) weighs on both alike. With --routed, the same tree
is measured a second time with run.py's "routed" config (a 50/50 sticky split,
three pin rules, health checks), for the cost of routing features. Work done on
a timer, like the health probes, is counted per second of valgrind's slowed-down
run, so it weighs about fifty times more here than it does in real time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import ROUTED  # noqa: E402 - the one definition of the routed config

CONNECTIONS = 8
REQUEST = b"GET /small HTTP/1.1\r\nHost: bench\r\nUser-Agent: zdproxy-instructions\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise RuntimeError(f"port {port} not accepting after {limit:.0f} s")


def drive(port: int, total: int) -> None:
    """`total` requests over CONNECTIONS keep-alive connections, one in flight on each."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTIONS)]
    try:
        for i in range(total):
            sock = socks[i % CONNECTIONS]
            sock.sendall(REQUEST)
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                buffer += sock.recv(65536)
            head, _, body = buffer.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            while len(body) < length:
                body += sock.recv(65536)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response: {head[:80]!r}")
    finally:
        for sock in socks:
            sock.close()


def count(
    tree: Path | None, upstream_port: int, requests: int, tmp: Path, routed: bool = False
) -> int:
    """Total instructions of one zdproxy process that served `requests` requests."""
    port = free_port()
    conf = tmp / "zdproxy.toml"
    conf.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\n[upstream]\nidle_timeout = "60s"\n'
        '[log]\nlevel = "warning"\n'
        f'[pools.blue]\nupstreams = ["127.0.0.1:{upstream_port}"]\n'
        + (ROUTED.format(up=upstream_port) if routed else "")
    )
    out = tmp / f"callgrind.{requests}.out"
    # Through the environment, which an older tree (a baseline) without these options ignores.
    env = {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "ZDPROXY_ADMIN__LISTEN": f"127.0.0.1:{free_port()}",
        "ZDPROXY_STATE__DIR": str(tmp / "state"),
    }
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    argv += [sys.executable, "-m", "zdproxy", "run", "--config", str(conf)]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL, cwd=tmp)
    try:
        wait_port(port, proc, 120)
        drive(port, requests)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    match = re.search(r"^totals: (\d+)", out.read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError(f"no totals in {out}")
    return int(match.group(1))


def per_request(
    trees: dict[str, tuple[Path | None, bool]], upstream_port: int, n: int, tmp: Path
) -> dict[str, float]:
    """Instructions per request of each (tree, routed), their runs interleaved."""
    small, large = n // 10, n
    counts = {name: [0, 0] for name in trees}
    for i, requests in enumerate((small, large)):
        for name, (tree, routed) in trees.items():
            counts[name][i] = count(tree, upstream_port, requests, tmp, routed)
    return {name: (high - low) / (large - small) for name, (low, high) in counts.items()}


def export(revision: str, into: Path) -> Path:
    """The source tree of a git revision of this repository, written under `into`."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", revision],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="N2; N1 is a tenth")
    parser.add_argument(
        "--baseline", metavar="DIR|REV", help="another source tree, or a git revision"
    )
    parser.add_argument("--routed", action="store_true", help="also measure run.py's routed")
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        print("valgrind is missing: apt-get install -y valgrind", file=sys.stderr)
        return 1
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "run.py"), "--serve-raw", str(upstream_port)],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(upstream_port, upstream, 15)
        with tempfile.TemporaryDirectory(prefix="zdinstr-") as tmp:
            trees: dict[str, tuple[Path | None, bool]] = {"zdproxy": (None, False)}
            if args.routed:
                trees["routed"] = (None, True)
            if args.baseline:
                base = Path(args.baseline)
                if not base.is_dir():
                    base = export(args.baseline, Path(tmp) / "baseline")
                trees["baseline"] = (base.resolve(), False)
            results = per_request(trees, upstream_port, args.requests, Path(tmp))
    finally:
        upstream.terminate()
        upstream.wait(10)
    for name, value in results.items():
        print(f"{name:9} {value:12,.0f} instructions per small request")
    if "routed" in results:
        print(f"routed / zdproxy = {results['routed'] / results['zdproxy']:.3f}")
    if "baseline" in results:
        print(f"zdproxy / baseline = {results['zdproxy'] / results['baseline']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
