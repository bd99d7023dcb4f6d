"""The conditions a deploy script waits for, read from the admin API, and the loop that
waits for them: `zdproxy wait`, `deploy --wait`, `pool set --wait-healthy`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zdproxy.cli.client import AdminClient, Unreachable, UsageError

CONDITIONS = """conditions (repeat --until to require several):
  healthy:COLOR       the color has upstreams, every one up by its health checks and not
                      ejected ("unknown", before a first verdict, and "unchecked" do not
                      count)
  drained:COLOR       every upstream of the color is drained with nothing in flight
  drained:COLOR/ADDR  the same for one upstream, e.g. drained:blue/127.0.0.1:9001
  live:COLOR          the color takes all the traffic
  done                the rollout finished (exit 5 at once if it rolled back or was
                      aborted, frozen or failed)
  done:ID             the same for rollout ID (as `zdproxy deploy` prints it), even
                      when a later rollout has started since"""

Check = Callable[[dict[str, Any]], str | None]  # None when the condition holds, else why not


class RolloutFailed(Exception):
    """`wait --until done` can never hold: the rollout ended without success."""


def _rollout_done(rollout_id: int | None) -> Check:
    def check(status: dict[str, Any]) -> str | None:
        return why_not_done(
            status["rollout"] if rollout_id is None else status["by_id"][rollout_id]
        )

    return check


def why_not_done(rollout: dict[str, Any]) -> str | None:
    """None when the rollout is done, else why not yet; RolloutFailed when it ended
    without success (it never will be)."""
    state = rollout["state"]
    if state == "done":
        return None
    if state in ("rolled_back", "aborted", "frozen", "failed"):
        raise RolloutFailed(f"rollout {rollout['id']} {state}: {rollout['reason']}")
    if state == "idle":
        return "no rollout yet"
    step = f" (step {rollout['step']} of {rollout['steps']})" if rollout["step"] else ""
    return f"rollout {rollout['id']} is {state}{step}: {rollout['reason']}"


@dataclass(frozen=True)
class Conditions:
    """The checks of `--until` texts, and the rollout ids their done:ID conditions name."""

    checks: list[Check]
    ids: list[int]

    @classmethod
    def parse(cls, texts: list[str]) -> Conditions:
        """UsageError for a text that is no condition (before any call)."""
        ids = [int(t[5:]) for t in texts if t.startswith("done:") and t[5:].isdigit()]
        return cls([_condition(text) for text in texts], ids)

    async def unmet(self, client: AdminClient) -> list[str]:
        """Why each unmet condition does not hold yet; RolloutFailed when one never can."""
        status = await client.call("GET", "/v1/status")
        status["by_id"] = {n: await client.call("GET", f"/v1/rollouts/{n}") for n in self.ids}
        return [reason for check in self.checks if (reason := check(status))]


async def wait_for(
    client: AdminClient, conditions: Conditions, within: float, interval: float
) -> str | None:
    """Poll every `interval` until every condition holds: None; or why not, once
    `within` seconds have passed. RolloutFailed at once when one never can hold. An admin API
    that does not answer (zdproxy restarting) is asked again until the deadline."""
    deadline = time.monotonic() + within
    while True:
        try:
            unmet = await conditions.unmet(client)
        except Unreachable as exc:
            unmet = [str(exc)]
        if not unmet:
            return None
        if time.monotonic() + interval > deadline:
            return "; ".join(unmet)
        await asyncio.sleep(interval)


def _condition(text: str) -> Check:
    if text == "done":
        return _rollout_done(None)
    if text.startswith("done:"):
        if not text[5:].isdigit():
            raise UsageError(f"--until {text!r}: expected done:ID, ID a rollout number")
        return _rollout_done(int(text[5:]))
    kind, _, subject = text.partition(":")
    color = subject.partition("/")[0]
    if color not in ("blue", "green") or kind not in ("healthy", "drained", "live"):
        raise UsageError(f"--until {text!r}: unknown condition\n{CONDITIONS}")
    if kind == "live":
        return lambda s: None if s["pools"][color]["share"] == 100 else f"{color} is not live"

    def upstreams(status: dict[str, Any]) -> list[dict[str, Any]]:
        found = status["pools"][color]["upstreams"]
        return [u for u in found if u["id"] == subject] if "/" in subject else found

    if kind == "healthy":

        def healthy(status: dict[str, Any]) -> str | None:
            found = upstreams(status)
            sick = [
                f"{u['id']} ({'ejected' if u['ejected_for'] else u['health']})"
                for u in found
                if u["health"] != "up" or u["ejected_for"]
            ]
            if not found:
                return f"{subject} has no upstreams"
            return f"not healthy: {', '.join(sick)}" if sick else None

        return healthy

    def drained(status: dict[str, Any]) -> str | None:
        found = upstreams(status)
        if "/" in subject and not found:
            return f"{subject} is not configured"
        busy = [
            u["id"] + (" (not drained)" if not u["drained"] else f" ({u['in_flight']} in flight)")
            for u in found
            if not u["drained"] or u["in_flight"] or u["tunnels"]
        ]
        return f"not drained: {', '.join(busy)}" if busy else None

    return drained
