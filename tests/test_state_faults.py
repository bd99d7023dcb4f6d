"""State that never takes zdproxy down, with real processes: a journal of the wrong shape,
a bad line in the event file, a read-only state dir, a full disk.

The read-only and full state dirs are real: zdproxy runs in a mount namespace of its
own (unshare) where its state dir is a read-only bind mount, or a small tmpfs that the
test fills through /proc/PID/root. Nothing outside that process sees those mounts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Upstream, ZdProxy, admin_api, pools
from tests.test_rollout import FAST_JUDGE

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]
NESTING = 100_000


def base_config(tmp_path: Path, blue: Upstream, green: Upstream) -> dict[str, Any]:
    return {
        "pools": pools([blue.address], [green.address]),
        "split": {"salt": "file-salt"},
        "state": {"dir": str(tmp_path / "state")},
    }


async def names(proxy: ZdProxy, count: int = 20) -> dict[str, int]:
    """Which apps answered `count` GETs through the proxy (each must answer 200)."""
    seen: dict[str, int] = {}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for i in range(count):
            async with session.get(f"{proxy.url}/n/{i}") as response:
                assert response.status == 200, await response.text()
                name = str((await response.json())["name"])
                seen[name] = seen.get(name, 0) + 1
    return seen


async def events(proxy: ZdProxy, kind: str) -> list[dict[str, Any]]:
    answer = await admin_api(proxy, "GET", f"/v1/events?kind={kind}")
    found: list[dict[str, Any]] = answer["events"]
    return found


async def journaled_split(zdproxy: StartProxy, config: dict[str, Any], weight: int) -> None:
    """A first run that journals a split through the API, then stops."""
    proxy = zdproxy(config)
    await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": weight})
    assert proxy.stop() == 0


# -- a journal of the wrong shape -------------------------------------------------------


def item(value: Any) -> dict[str, Any]:
    return {"value": value, "basis": "", "at": 1.0, "actor": "api"}


@pytest.mark.parametrize(
    ("key", "entry"),
    [
        pytest.param("drained", item(5), id="drained-5"),
        pytest.param("rules", item(["blue", "green"]), id="rules-a-list-of-strings"),
        pytest.param("rollout", item({}), id="rollout-empty"),
        pytest.param("pools.green", {**item({"upstreams": []}), "why": "x"}, id="extra-field"),
        pytest.param("rules", item("<<deep>>"), id="deep-nesting"),
    ],
)
async def test_a_journal_item_of_the_wrong_shape_is_left_out_and_zdproxy_serves(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path, key: str, entry: Any
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = base_config(tmp_path, blue, green)
    await journaled_split(zdproxy, config, 5000)
    path = tmp_path / "state" / "state.json"
    document = json.loads(path.read_text())
    document["items"][key] = entry
    text = json.dumps(document).replace('"<<deep>>"', "[" * NESTING + "]" * NESTING)
    path.write_text(text)

    proxy = zdproxy(config)  # it starts
    status = await admin_api(proxy, "GET", "/v1/status")  # 200, not 500
    assert status["journal"] == ["split"]  # the rest of the journal applies
    assert status["split"]["candidate_weight"] == 5000
    [rejected] = await events(proxy, "journal_rejected")
    assert rejected["data"]["item"] == key
    [aside] = path.parent.glob("state.json.rejected-*")
    assert aside.read_text() == text  # kept for a post-mortem
    assert set(await names(proxy)) == {"blue", "green"}  # traffic flows, 50/50
    assert (await admin_api(proxy, "GET", "/v1/rollout"))["state"] == "idle"


@pytest.mark.parametrize(
    "split",
    [
        pytest.param([5000], id="a-list"),
        pytest.param([["live", "green"], ["candidate_weight", 0]], id="a-list-of-pairs"),
    ],
)
async def test_a_split_journaled_as_a_list_gives_way_to_the_file_and_zdproxy_serves(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path, split: list[Any]
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = base_config(tmp_path, blue, green)
    await journaled_split(zdproxy, config, 5000)
    path = tmp_path / "state" / "state.json"
    document = json.loads(path.read_text())
    document["items"]["split"]["value"] = split
    path.write_text(json.dumps(document))

    proxy = zdproxy(config)
    status = await admin_api(proxy, "GET", "/v1/status")
    assert status["split"]["candidate_weight"] == 0 and status["journal"] == []
    assert [e["data"]["item"] for e in await events(proxy, "journal_rejected")] == ["split"]
    assert await names(proxy) == {"blue": 20}


async def test_bad_lines_in_the_event_file_are_skipped_and_counted(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = base_config(tmp_path, blue, green)
    await journaled_split(zdproxy, config, 0)
    bad = [
        {"id": "seven", "time": 1, "kind": "k", "reason": "r", "actor": "api", "data": {}},
        {"id": 8, "time": 1, "kind": "k", "reason": "r", "actor": "robot", "data": {}},
        {"id": 9, "time": 1, "kind": "k", "reason": "r", "actor": "api", "data": [1]},
        ["not", "an", "event"],
    ]
    with (tmp_path / "state" / "events.jsonl").open("a") as file:
        file.writelines(json.dumps(line) + "\n" for line in bad)

    proxy = zdproxy(config)
    history = await admin_api(proxy, "GET", "/v1/events")  # 200, not 500
    kinds = [e["kind"] for e in history["events"]]
    assert kinds.index("stopped") < kinds.index("events_skipped")  # the first run's are kept
    [skipped] = await events(proxy, "events_skipped")
    assert skipped["data"] == {"count": len(bad)}
    assert await names(proxy, 5) == {"blue": 5}


# -- read-only and full state dirs ------------------------------------------------------


def unshare_works() -> bool:
    try:
        done = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


# CI runs as root, where unshare works: there a missing namespace is a failure, not a skip.
needs_unshare = pytest.mark.skipif(
    not os.environ.get("CI") and not unshare_works(),
    reason="needs unshare --mount (root, or user namespaces)",
)


def in_namespace(mount: str, state_dir: Path) -> tuple[str, ...]:
    """A wrap for the zdproxy fixture: run it in a mount namespace of its own, with
    `mount` (a shell command, $0 the state dir) done first."""
    script = f'{mount} && exec "$@"'
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(state_dir))


READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"'


@needs_unshare
async def test_a_restart_with_a_read_only_state_dir_starts_from_the_journal(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = base_config(tmp_path, blue, green)
    state_dir = tmp_path / "state"
    await journaled_split(zdproxy, config, 10000)  # all of it to green
    (state_dir / ".state.json.4242.tmp").write_text("{")  # a crashed save's leftover
    journal = (state_dir / "state.json").read_bytes()

    proxy = zdproxy(config, wrap=in_namespace(READ_ONLY, state_dir))
    assert await names(proxy) == {"green": 20}  # the journal's split, not the file's
    [unwritable] = await events(proxy, "journal_unwritable")
    assert "Read-only file system" in unwritable["reason"]
    refused = await admin_api(proxy, "PUT", "/v1/split", {"candidate_weight": 0}, status=503)
    assert refused["detail"] == (
        f"state.dir: cannot write the journal {state_dir / 'state.json'}: Read-only file system"
    )
    assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == 10000
    assert await names(proxy) == {"green": 20}
    assert (state_dir / "state.json").read_bytes() == journal


def fill(proxy: ZdProxy, state_dir: Path) -> Path:
    """Fill the proxy's state dir (its own tmpfs) to the last byte."""
    filler = Path(f"/proc/{proxy.pid}/root") / state_dir.relative_to("/") / "filler"
    block = bytes(64 * 1024)
    with filler.open("wb", buffering=0) as file:
        with contextlib.suppress(OSError):
            while True:
                file.write(block)
        with contextlib.suppress(OSError):  # the last partial block
            while True:
                file.write(b"\0" * 512)
    probe = filler.with_name("probe")
    with pytest.raises(OSError) as full, probe.open("wb", buffering=0) as file:
        file.write(block)
    assert full.value.errno == errno.ENOSPC
    probe.unlink()
    return filler


def rollout_config(tmp_path: Path, blue: Upstream, green: Upstream) -> dict[str, Any]:
    return {
        **base_config(tmp_path, blue, green),
        "plans": {
            "canary": {
                "steps": [{"weight": 10, "hold": "10m"}, {"weight": 100, "hold": "1s"}],
                # Errors only: latency noise on a loaded machine must not end it first.
                "judge": FAST_JUDGE,
            }
        },
    }


@needs_unshare
async def test_on_a_full_disk_changes_are_refused_and_an_abort_is_journaled_all_the_same(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    config = rollout_config(tmp_path, blue, green)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    tmpfs = 'mount -t tmpfs -o size=4m zdproxy-state "$0"'
    proxy = zdproxy(config, wrap=in_namespace(tmpfs, state_dir))
    await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"})
    async with asyncio.timeout(30):
        while (await admin_api(proxy, "GET", "/v1/rollout"))["step"] != 1:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # polls the API: there is no event to await
    fill(proxy, state_dir)

    # Full: a change is refused with 503 naming the fault; the running state stays.
    pool = {"upstreams": [blue.address], "version": "b2"}
    refused = await admin_api(proxy, "PUT", "/v1/pools/blue", pool, status=503)
    assert refused["detail"] == (
        f"state.dir: cannot write the journal {state_dir / 'state.json'}: No space left on device"
    )
    assert (await admin_api(proxy, "GET", "/v1/pools/blue"))["version"] == ""
    seen = await names(proxy, 40)
    assert set(seen) <= {"blue", "green"}  # traffic flows (10% to green)

    # The abort happens, and its record reaches the journal through the reserve.
    aborted = await admin_api(proxy, "POST", "/v1/rollout/abort")
    assert aborted["state"] == "aborted" and aborted["share"] == 0
    assert await names(proxy) == {"blue": 20}
    assert await events(proxy, "journal_reserve_spent")

    # A deploy on the full disk is refused and leaves no ghost rollout behind.
    ghost = await admin_api(proxy, "POST", "/v1/rollouts", {"color": "green"}, status=503)
    assert ghost["errors"][0]["field"] == "state.dir", ghost
    assert (await admin_api(proxy, "GET", "/v1/rollout"))["state"] == "aborted"

    # kill -9, with the state dir as the process leaves it.
    kept = tmp_path / "kept"
    proxy.process.send_signal(signal.SIGSTOP)
    shutil.copytree(Path(f"/proc/{proxy.pid}/root") / state_dir.relative_to("/"), kept)
    proxy.process.kill()
    proxy.process.wait(5)
    (kept / "filler").unlink()

    again = zdproxy({**config, "state": {"dir": str(kept)}})
    rollout = await admin_api(again, "GET", "/v1/rollout")
    assert (rollout["state"], rollout["share"]) == ("aborted", 0)
    assert await names(again, 40) == {"blue": 40}  # never back to the failed candidate
