"""Active health checks: one probe loop per upstream, rise/fall hysteresis, a reason per result.

Every pool is checked unless its config says `enabled = false`: a TCP connect by
default, an HTTP request when `path` is set. An upstream is "unknown" until its first
verdict and routable only once "up": a pool nobody configured a check for must not
take traffic on faith (users would get 502s from an app that is not even listening).

The checker only keeps state and reports transitions; the control plane decides
what a transition means for routing (it rebuilds the snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from zdproxy import __version__
from zdproxy.config.settings import COLORS, HealthSettings, Settings
from zdproxy.control.probe import connect_failure, failure_text
from zdproxy.routing.local import LocalErrors, LocalErrorSite, local_error_kind
from zdproxy.routing.snapshot import UpstreamTarget

log = logging.getLogger("zdproxy.health")

MAX_BODY = 64 * 1024  # a readiness body larger than this is not read further

# What the checks say about an upstream: "unknown" before its first verdict (not
# routable), "unchecked" when its pool turned checks off (routable, never "up").
Verdict = Literal["up", "down", "unknown", "unchecked"]


@dataclass
class UpstreamHealth:
    """What the checks say about one upstream. `up` starts False: nothing is routable
    before it has passed `rise` checks."""

    up: bool = False
    decided: bool = False  # a first verdict is in: up, or failed at least once
    passes: int = 0
    failures: int = 0
    reason: str = "not checked yet"
    checks: int = 0
    last_pass: float = 0.0  # loop time of the last passing check


def json_mismatch(body: Any, expected: dict[str, Any]) -> str | None:
    """Why `body` lacks an expected value (dotted keys reach into objects), or None."""
    for dotted, want in expected.items():
        value = body
        for key in dotted.split("."):
            if not isinstance(value, dict) or key not in value:
                return f"body has no {dotted!r}"
            value = value[key]
        if value != want:
            return f"body {dotted}={value!r} (expected {want!r})"
    return None


@dataclass
class _Probe:
    target: UpstreamTarget
    settings: HealthSettings
    task: asyncio.Task[None] | None = None
    session: aiohttp.ClientSession | None = None
    state: UpstreamHealth = field(default_factory=UpstreamHealth)


class HealthChecker:
    """Probes every upstream whose pool has checks enabled; calls `on_change` on every
    transition between routable and not (the control plane makes it an event)."""

    def __init__(self, on_change: Callable[[UpstreamTarget, UpstreamHealth], None]) -> None:
        self._on_change = on_change
        self._probes: dict[str, _Probe] = {}
        self._unchecked: set[str] = set()  # upstreams of pools with `enabled = false`
        self._settled: asyncio.Event | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled, still closing
        self.local_errors = LocalErrors()  # probes zdproxy could not even start

    def state(self, upstream_id: str) -> UpstreamHealth | None:
        probe = self._probes.get(upstream_id)
        return probe.state if probe else None

    def verdict(self, upstream_id: str) -> Verdict:
        """The one word the API, the CLI and the metrics show, and routing obeys."""
        if upstream_id in self._unchecked:
            return "unchecked"
        state = self.state(upstream_id)
        if state is None or not state.decided:
            return "unknown"  # also an id the checker was not told about: never routable
        return "up" if state.up else "down"

    def sync(self, wanted: dict[str, tuple[UpstreamTarget, HealthSettings]]) -> None:
        """Probe exactly the wanted upstreams whose pool checks them; state survives for
        those whose settings stay. The others are remembered as unchecked."""
        self._unchecked = {uid for uid, (_, settings) in wanted.items() if not settings.enabled}
        wanted = {uid: entry for uid, entry in wanted.items() if entry[1].enabled}
        for upstream_id in list(self._probes):
            entry = wanted.get(upstream_id)
            probe = self._probes[upstream_id]
            if entry is None or entry[0].address != probe.target.address:
                self._stop(self._probes.pop(upstream_id))
            elif entry[1] != probe.settings:
                # New settings, same upstream: its verdict stands (a live pool must not
                # drop out of rotation because its check interval was edited).
                self._stop(self._probes.pop(upstream_id))
                self._probes[upstream_id] = replacement = _Probe(*entry, state=probe.state)
                replacement.task = asyncio.ensure_future(self._loop(replacement))
            else:
                probe.target = entry[0]  # the weight may have changed
        for upstream_id, (target, settings) in wanted.items():
            if upstream_id not in self._probes:
                probe = _Probe(target, settings)
                self._probes[upstream_id] = probe
                probe.task = asyncio.ensure_future(self._loop(probe))

    def _settled_now(self) -> bool:
        """Every probed upstream has a verdict: up, or failed at least once."""
        return all(p.state.decided for p in self._probes.values())

    def longest_first_verdict(self) -> float:
        """How long the slowest first verdict may take: `rise` checks back to back, each
        up to its timeout (a TCP connect as well as an HTTP request)."""
        return max((p.settings.rise * p.settings.timeout for p in self._probes.values()), default=0)

    async def settle(self, deadline: float) -> None:
        """Wait (at most `deadline` seconds) until every probed upstream has a verdict."""
        if self._settled_now():
            return
        self._settled = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), deadline)
        self._settled = None

    async def close(self) -> None:
        probes = list(self._probes.values())
        self._probes.clear()
        for probe in probes:
            self._stop(probe)
        for probe in probes:
            if probe.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await probe.task

    def _stop(self, probe: _Probe) -> None:
        if probe.task is not None:
            probe.task.cancel()  # its loop closes its session on the way out
            self._stopping.add(probe.task)
            probe.task.add_done_callback(self._stopping.discard)

    async def _loop(self, probe: _Probe) -> None:
        settings = probe.settings
        try:
            while True:
                try:
                    ok, reason = await self._check(probe)
                except OSError as exc:
                    if self.local_errors.note(exc, LocalErrorSite.HEALTH_CHECK) is None:
                        raise
                    # zdproxy's own shortage (routing/local.py) says nothing of the
                    # upstream: no verdict, and no back-to-back retry while it lasts.
                    await asyncio.sleep(settings.interval)
                    continue
                self._record(probe, ok, reason)
                if self._settled is not None and self._settled_now():
                    self._settled.set()
                # Before the first verdict, probe back to back so that start-up is quick.
                if probe.state.decided:
                    await asyncio.sleep(settings.interval + random.uniform(0, settings.jitter))
        finally:
            if probe.session is not None:
                await probe.session.close()

    def _record(self, probe: _Probe, ok: bool, reason: str) -> None:
        state, settings = probe.state, probe.settings
        state.checks += 1
        state.reason = reason
        if ok:
            state.last_pass = asyncio.get_running_loop().time()
            state.passes += 1
            state.failures = 0
            if not state.up and state.passes >= settings.rise:
                state.up = state.decided = True
                self._on_change(probe.target, state)
        else:
            state.failures += 1
            state.passes = 0
            if state.up and state.failures >= settings.fall:
                state.up = False
                self._on_change(probe.target, state)
            elif not state.up and state.failures == 1:
                state.decided = True
                log.info("health: %s not ready: %s", probe.target.id, reason)

    def _session(self, probe: _Probe) -> aiohttp.ClientSession:
        if probe.session is None:
            address = probe.target.address
            connector: aiohttp.BaseConnector
            if address.path is not None:
                connector = aiohttp.UnixConnector(path=address.path, force_close=True)
            else:
                connector = aiohttp.TCPConnector(force_close=True)
            probe.session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": f"zdproxy-health/{__version__}"},
                auto_decompress=True,
            )
        return probe.session

    async def _check(self, probe: _Probe) -> tuple[bool, str]:
        """One probe: (passed, reason). A local resource error is raised, not a failure."""
        if not probe.settings.path:
            return await _connect(probe)
        settings = probe.settings
        address = probe.target.address
        host = "localhost" if address.path is not None else str(address)
        url = f"http://{host}{settings.path}"
        headers = {"Host": settings.host} if settings.host else {}
        try:
            async with (
                asyncio.timeout(settings.timeout),
                self._session(probe).request(
                    settings.method, url, headers=headers, allow_redirects=False
                ) as response,
            ):
                if response.status not in settings.expect_status:
                    return False, f"status {response.status} (expected {settings.expect_status})"
                if not settings.expect_json:
                    return True, f"status {response.status}"
                raw = await response.content.read(MAX_BODY)
        except TimeoutError:
            return False, f"no answer within {settings.timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:  # aiohttp's connect errors are both
            if local_error_kind(exc) is not None:
                raise
            return False, failure_text(exc)
        try:
            body = json.loads(raw)
        except ValueError:
            return False, "body is not JSON"
        mismatch = json_mismatch(body, settings.expect_json)
        return (False, mismatch) if mismatch else (True, f"status {response.status}, body ok")


async def _connect(probe: _Probe) -> tuple[bool, str]:
    """The default check: the upstream accepts a connection within the timeout. It
    proves the app listens, not that it is ready: set `path` for that."""
    failure = await connect_failure(probe.target.address, probe.settings.timeout)
    return (False, failure) if failure else (True, "accepts connections")


def differing_checks(settings: Settings) -> str | None:
    """Why the two pools are not checked alike, or None. A candidate judged ready by a
    weaker check than the live color's (a bare TCP connect against a readiness
    endpoint) takes traffic before it can serve it: `zdproxy check` warns."""
    blue, green = (settings.pool(color).health for color in COLORS)
    if blue == green:
        return None
    fields = [
        f"{name} {getattr(blue, name)!r} vs {getattr(green, name)!r}"
        for name in type(blue).model_fields
        if getattr(blue, name) != getattr(green, name)
    ]
    return (
        f"pools.blue.health ({blue.describe()}) and pools.green.health ({green.describe()}) "
        f"differ: {'; '.join(fields)}. Each color is judged ready by its own pool's check: "
        "configure both the same"
    )
