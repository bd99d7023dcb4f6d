"""Rolling update inside one pool, for hosts with no room for a second color.

Upstream by upstream (at most `max_unavailable` at a time): drain it, run the named
hook from the config with its address in the environment (the hook restarts the
app server with the new build), wait until it passes `rise` health checks that
began after the hook ended, put it back. The first failure stops the update: that
upstream stays drained, the rest untouched, and an event says why.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from zdproxy.config.settings import Color
from zdproxy.control.desired import Refused
from zdproxy.control.events import Actor
from zdproxy.control.hooks import run_hook
from zdproxy.control.ports import ControlHost

HEALTHY_DEADLINE_CHECKS = 20  # a restarted upstream gets this many check intervals to rise


@dataclass
class RollingState:
    id: int
    color: Color
    hook: str
    max_unavailable: int
    state: str = "running"  # running, done, failed
    updated: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RollingUpdates:
    def __init__(self, control: ControlHost) -> None:
        self.control = control
        self.current: RollingState | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, color: Color, hook: str, max_unavailable: int, actor: Actor) -> RollingState:
        control = self.control
        settings = control.settings
        if self.current is not None and self.current.state == "running":
            raise Refused("color", f"rolling update {self.current.id} is still running")
        if (rollout := control.active_rollout()) is not None:
            raise Refused("color", f"{rollout} is active: abort it or wait for its end")
        if hook not in settings.hooks:
            known = ", ".join(settings.hooks) or "none"
            raise Refused("hook", f"no [hooks.{hook}] in the config file (known: {known})", 400)
        if not settings.pool(color).health.http:
            # A TCP connect passes as soon as the app listens, before it is ready.
            reason = f"pools.{color}.health has no path: nothing could tell the update worked"
            raise Refused("color", reason, 400)
        targets = sorted(t.id for t in control.targets_of(color))
        serving = sum(control.routable(uid) for uid in targets)
        if control.share(color) and max_unavailable >= serving:
            raise Refused(
                "max_unavailable",
                f"{color} takes traffic and has {serving} serving upstreams: taking "
                f"{max_unavailable} out at once would leave none",
            )
        number = (self.current.id if self.current else 0) + 1
        self.current = RollingState(number, color, hook, max_unavailable, pending=targets)
        control.events.emit(
            "rolling_started",
            f"rolling update of {color} with hook {hook}, {max_unavailable} at a time",
            actor=actor,
            upstreams=targets,
        )
        self._task = asyncio.ensure_future(self._run(self.current))
        return self.current

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, rolling: RollingState) -> None:
        try:
            while rolling.pending:
                batch = rolling.pending[: rolling.max_unavailable]
                if self._would_empty(rolling.color, batch):
                    first = batch[0]
                    reason = "no other upstream of the color is serving now; stopped before it"
                    self._end(rolling, "failed", f"{first}: {reason}")
                    return
                results = await asyncio.gather(*(self._update(rolling, uid) for uid in batch))
                failed = []
                for uid, failure in zip(batch, results, strict=True):
                    if failure is None:
                        rolling.pending.remove(uid)
                        rolling.updated.append(uid)
                    else:
                        failed.append(f"{uid}: {failure}")
                if failed:  # the others of the batch finished and are counted above
                    self._end(rolling, "failed", "; ".join(failed) + "; it stays drained")
                    return
            self._end(rolling, "done", f"{len(rolling.updated)} upstreams updated")
        except Exception as exc:
            logging.getLogger("zdproxy.rolling").exception("rolling update failed")
            self._end(rolling, "failed", f"internal error: {exc!r}")

    def _would_empty(self, color: Color, batch: list[str]) -> bool:
        """Would taking `batch` out leave a color that takes traffic with nothing?"""
        control = self.control
        if not control.share(color):
            return False
        others = [t.id for t in control.targets_of(color) if t.id not in batch]
        return not any(control.routable(uid) for uid in others)

    async def _update(self, rolling: RollingState, uid: str) -> str | None:
        """One upstream through drain, hook, health, undrain; why it failed, or None."""
        control = self.control
        ids = control.start_drain(upstream=uid, actor="auto")
        await control.wait_drained(ids, cut_after=30.0, tunnel_grace=5.0, actor="auto")
        target, health_settings = control.configured()[uid]
        env = {
            "ZDPROXY_UPSTREAM": str(target.address),
            "ZDPROXY_UPSTREAM_ID": uid,
            "ZDPROXY_COLOR": rolling.color,
        }
        result = await run_hook(rolling.hook, control.settings.hooks[rolling.hook], env)
        level = logging.INFO if result.ok else logging.ERROR
        reason = f"{rolling.hook} for {uid}: {result.status}"
        control.events.emit("hook", reason, level=level, **result.to_dict())
        if not result.ok:
            return f"hook {rolling.hook} failed: {result.status}"
        # It is back when its last `rise` checks all passed, all of them after the hook.
        before = state.checks if (state := control.health.state(uid)) is not None else 0
        rise = health_settings.rise
        interval = health_settings.interval + health_settings.jitter + health_settings.timeout
        allowed = interval * (rise + HEALTHY_DEADLINE_CHECKS)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + allowed
        while True:
            state = control.health.state(uid)
            if state is not None and state.up and min(state.passes, state.checks - before) >= rise:
                break
            if loop.time() > deadline:
                reason = state.reason if state is not None else "not checked"
                return f"not healthy {allowed:.0f}s after the hook: {reason}"
            await asyncio.sleep(0.05)
        control.undrain(upstream=uid, actor="auto")
        return None

    def _end(self, rolling: RollingState, state: str, reason: str) -> None:
        rolling.state = state
        rolling.reason = reason
        self.control.events.emit(
            f"rolling_{state}",
            f"rolling update of {rolling.color}: {reason}",
            level=logging.INFO if state == "done" else logging.ERROR,
            rolling=rolling.id,
            updated=rolling.updated,
            pending=rolling.pending,
        )
