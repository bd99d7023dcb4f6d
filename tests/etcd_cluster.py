"""Real etcd clusters on loopback, for the fleet store's tests and benchmarks.

`EtcdCluster(root, size)` runs `size` etcd processes (Debian's etcd-server, which
`make etcd` installs) as one new cluster: each member on its own free loopback client
and peer ports, its data dir under `root`, a cluster token of its own (two clusters of
one test run can never join each other). `start()` returns when every member answers
/health, or fails within its bound with the members' logs. A member can be stopped
(SIGTERM), killed (SIGKILL) and started again on the same ports and data dir, which is
how the tests take quorum away and give it back. `close()` stops every process the
cluster started; a cluster is also a context manager. `tls` serves the client URLs as
https, `flags` adds etcd options (e.g. --client-cert-auth, --auth-token-ttl).

Nothing here touches a system etcd (a service the package may run on 2379/2380): the
clusters listen on ports the kernel gave out a moment before, never on those.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

ETCD = "etcd"
START_WITHIN = 30.0  # seconds for a new cluster to answer /health on every member
STOP_WITHIN = 10.0  # seconds a member has to exit on SIGTERM before it gets SIGKILL
START_ATTEMPTS = 3  # a free port taken by another process in the meantime: new ports


def free_port() -> int:
    """A loopback port that was free a moment ago (etcd must be told its ports)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TLS(NamedTuple):
    """https on the members' client URLs: etcd's certificate and key, and the CA that
    signed it. Mutual TLS is for `flags`: --client-cert-auth and --trusted-ca-file (etcd
    3.4 asks every client for a certificate once it has a trusted CA). The cluster's own
    health checks present `cert` as their client certificate, so it needs the
    clientAuth usage too."""

    cert: Path
    key: Path
    ca: Path

    def flags(self) -> list[str]:
        return [f"--cert-file={self.cert}", f"--key-file={self.key}"]

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(self.cert, self.key)
        return context


@dataclass
class EtcdMember:
    """One etcd process of a cluster: its name, ports, data dir and log; `tls`: the
    context its client URL is reached with (https), None for http."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    tls: ssl.SSLContext | None = None

    @property
    def client_url(self) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        """True when the member answers /health with health "true": it is part of a
        cluster that has a leader (a member without quorum answers "false")."""
        try:
            url = f"{self.client_url}/health"
            with urllib.request.urlopen(url, timeout=1, context=self.tls) as answer:
                return bool(json.load(answer).get("health") == "true")
        except (OSError, ValueError):
            return False

    def status(self) -> dict[str, str]:
        """Its own id ("member") and the id of the leader it follows ("leader")."""
        request = urllib.request.Request(f"{self.client_url}/v3/maintenance/status", b"{}")
        with urllib.request.urlopen(request, timeout=2, context=self.tls) as answer:
            status = json.load(answer)
        return {"member": status["header"]["member_id"], "leader": status.get("leader", "")}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class EtcdCluster:
    """`size` etcd members under `root`; see the module's docstring."""

    root: Path
    size: int = 3
    token: str = field(default_factory=lambda: f"zdproxy-test-{uuid.uuid4().hex[:12]}")
    members: list[EtcdMember] = field(default_factory=list)
    started_in: float = 0.0  # seconds the last start() took, for the benchmarks
    tls: TLS | None = None
    flags: tuple[str, ...] = ()  # more etcd options for every member

    @property
    def client_urls(self) -> list[str]:
        return [member.client_url for member in self.members]

    def start(self, within: float = START_WITHIN) -> EtcdCluster:
        """Start every member as a new cluster and wait until all are healthy. A member
        that exits while starting (its port was taken in between) makes the cluster
        start over on new ports, up to START_ATTEMPTS times."""
        if shutil.which(ETCD) is None:
            raise RuntimeError("no `etcd` on PATH: run `make etcd` (Debian's etcd-server)")
        began = time.monotonic()
        attempt = 1
        while True:
            self._lay_out(attempt)
            for index in range(self.size):
                self.start_member(index)
            if self._wait_healthy(began + within):
                self.started_in = time.monotonic() - began
                return self
            port_taken = any(not m.running for m in self.members)
            logs = "\n".join(f"--- {m.name}\n{m.log()[-3000:]}" for m in self.members)
            self.close()
            if not port_taken or attempt == START_ATTEMPTS:
                raise RuntimeError(f"etcd cluster {self.token} did not become healthy:\n{logs}")
            attempt += 1

    def _lay_out(self, attempt: int) -> None:
        """New ports and empty data dirs for every member."""
        base = self.root / f"etcd-{self.token}-{attempt}"
        self.members = [
            EtcdMember(
                name=f"m{index + 1}",
                client_port=free_port(),
                peer_port=free_port(),
                data_dir=base / f"m{index + 1}",
                log_path=base / f"m{index + 1}.log",
                tls=None if self.tls is None else self.tls.client_context(),
            )
            for index in range(self.size)
        ]
        base.mkdir(parents=True)

    def _command(self, member: EtcdMember) -> list[str]:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            ETCD,
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={initial}",
            f"--initial-cluster-token={self.token}",
            # Read only when the data dir is empty: a restarted member rejoins as itself.
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-level=warn",
            *(self.tls.flags() if self.tls else ()),
            *self.flags,
        ]

    def _wait_healthy(self, deadline: float) -> bool:
        """True once every member is healthy; False when one exited or time ran out."""
        while time.monotonic() < deadline:
            if any(not m.running for m in self.members):
                return False
            if all(m.healthy() for m in self.members):
                return True
            time.sleep(0.05)
        return False

    def leader(self) -> int:
        """The index of the member that leads now, as the running members see it."""
        statuses = [m.status() if m.running else None for m in self.members]
        leaders = {status["leader"] for status in statuses if status}
        if len(leaders) != 1:
            raise RuntimeError(f"the members disagree on their leader: {statuses}")
        (leader,) = leaders
        for index, status in enumerate(statuses):
            if status and status["member"] == leader:
                return index
        raise RuntimeError(f"leader {leader} is not a running member: {statuses}")

    def start_member(self, index: int) -> None:
        """Start member `index` (again): same name, ports and data dir. Returns at once;
        a test waits for what it needs (a store call that succeeds) with a bound."""
        member = self.members[index]
        if member.running:
            return
        member.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with member.log_path.open("ab") as log:
            member.process = subprocess.Popen(
                self._command(member),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C of the test run is for pytest, not etcd
            )

    def kill(self, index: int) -> None:
        """SIGKILL member `index` and reap it: a crash, nothing flushed or said."""
        self._end(self.members[index], signal.SIGKILL)

    def stop(self, index: int) -> None:
        """SIGTERM member `index` and reap it (SIGKILL after STOP_WITHIN)."""
        self._end(self.members[index], signal.SIGTERM)

    @staticmethod
    def _end(member: EtcdMember, sig: signal.Signals) -> None:
        process = member.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(STOP_WITHIN)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        """Stop every member this cluster started."""
        for member in self.members:
            with contextlib.suppress(ProcessLookupError):
                self._end(member, signal.SIGTERM)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
