"""Reloading the config: one reload behind SIGHUP, the file watch, `POST /v1/reload` and
`zdproxy reload`; what a reload must refuse (nothing applied); the watch that follows
symlink swaps and outlives every bad file. Real processes, files and sockets."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import (
    ADMIN_TOKEN,
    Upstream,
    ZdProxy,
    admin_api,
    pools,
    run_cli,
    to_toml,
    wait_until,
)
from zdproxy.ops.watch import watch

StartProxy = Callable[..., ZdProxy]
StartUpstream = Callable[..., Awaitable[Upstream]]
DEEP = "a = " + "[" * 10_000 + "]" * 10_000 + "\n"  # tomllib alone: a RecursionError


def file_of(running: ZdProxy, **changes: Any) -> str:
    """The running proxy's config file text with some sections replaced."""
    return to_toml({**running.config, **changes})


async def reload_api(proxy: ZdProxy, status: int = 200) -> Any:
    return await admin_api(proxy, "POST", "/v1/reload", status=status)


async def metrics_text(proxy: ZdProxy) -> str:
    async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/metrics") as r:
        return await r.text()


async def served_by(proxy: ZdProxy) -> str:
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/") as resp:
        assert resp.status == 200
        name: str = (await resp.json())["name"]
        return name


def swap_link(link: Path, target: Path) -> None:
    """`ln -sfn TARGET link.tmp && mv -T link.tmp link`: one atomic rename of a symlink."""
    temp = link.with_name(link.name + ".tmp")
    temp.unlink(missing_ok=True)
    temp.symlink_to(target)
    os.replace(temp, link)


# -- what a reload refuses, through the API ------------------------------------------------


async def test_a_reload_without_upstreams_is_refused_and_zdproxy_serves_on(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue = await upstream("blue")
    proxy = zdproxy({"pools": pools([blue.address]), "reload": {"watch": False}})
    for text, what in (("", "the file is empty"), ("[log]\n", "no pool has an upstream")):
        proxy.config_path.write_text(text)
        refused = await reload_api(proxy, status=400)
        assert refused["errors"][0]["field"] == "pools", refused
        assert what in refused["errors"][0]["reason"]
        assert await served_by(proxy) == "blue"  # the running configuration stays
    events = (await admin_api(proxy, "GET", "/v1/events?kind=reload_refused"))["events"]
    assert [e["actor"] for e in events] == ["api", "api"]
    assert events[-1]["data"]["errors"][0].startswith("pools: no pool has an upstream")
    assert 'zdproxy_config_reloads_total{result="refused"} 2.0' in await metrics_text(proxy)

    # The same file, fixed, applies: the refusals changed nothing in between.
    proxy.config_path.write_text(file_of(proxy, upstream={"timeout": "30s"}))
    assert await reload_api(proxy) == {
        "result": "applied",
        "source": str(proxy.config_path),
        "changed": ["upstream.timeout"],
        "needs_restart": [],
    }
    assert (await reload_api(proxy))["result"] == "unchanged"
    metrics = await metrics_text(proxy)
    assert 'zdproxy_config_reloads_total{result="applied"} 2.0' in metrics


async def test_a_reload_that_drops_the_admin_token_is_refused(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue = await upstream("blue")
    token = tmp_path / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    admin = {"listen": "127.0.0.1:0", "token_file": str(token)}
    config = {"pools": pools([blue.address]), "admin": admin, "reload": {"watch": False}}
    # The token comes from the file alone (the fixture's environment token is emptied).
    proxy = zdproxy(config, env={"ZDPROXY_ADMIN__TOKEN": ""})
    # The new build's label would apply with the rest, if anything did.
    labelled = {"blue": {"upstreams": [blue.address], "version": "v2"}}
    without = {**proxy.config, "admin": {"listen": proxy.admin_address}, "pools": labelled}
    proxy.config_path.write_text(to_toml(without))
    refused = await reload_api(proxy, status=409)
    assert refused["errors"][0]["field"] == "admin.token_file"
    assert "cannot remove it" in refused["errors"][0]["reason"]
    # Nothing applied: the token still opens the API, and the label is the old one.
    assert (await admin_api(proxy, "GET", "/v1/pools/blue"))["version"] == ""


async def test_a_reload_the_journal_does_not_fit_is_refused_naming_the_field(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy({"pools": pools([blue.address], [green.address]), "reload": {"watch": False}})
    rule = {"name": "tenant", "header": "X-Tenant", "values": ["acme"], "to": "green"}
    await admin_api(proxy, "PUT", "/v1/rules", {"rules": [rule]})
    # Valid alone, but its preview header is the header the API's rule reads; it also
    # labels green's build, which must not be applied either.
    green_pool = {"upstreams": [green.address], "version": "v2"}
    bad = file_of(
        proxy, preview={"header": "X-Tenant"}, pools={**proxy.config["pools"], "green": green_pool}
    )
    proxy.config_path.write_text(bad)
    refused = await reload_api(proxy, status=409)
    field = refused["errors"][0]["field"]
    assert field in ("pins[0].header", "rules[0].header"), refused
    assert (await admin_api(proxy, "GET", "/v1/pools/green"))["version"] == ""
    assert (await admin_api(proxy, "GET", "/v1/rules"))["rules"][0]["name"] == "tenant"


# -- zdproxy reload ---------------------------------------------------------------------------


async def test_the_reload_command_reports_the_outcome_for_scripts(
    zdproxy: StartProxy, upstream: StartUpstream
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy({"pools": pools([blue.address], [green.address]), "reload": {"watch": False}})
    env = {"ZDPROXY_ADMIN_URL": proxy.admin_address, "ZDPROXY_TOKEN": ADMIN_TOKEN}

    proxy.config_path.write_text(file_of(proxy, split={"live": "green"}))
    applied = await run_cli("reload", env=env)
    assert (applied.code, applied.out) == (0, f"{proxy.config_path}: applied: split.live\n")
    assert await served_by(proxy) == "green"

    unchanged = await run_cli("reload", env=env)
    assert (unchanged.code, unchanged.out) == (0, f"{proxy.config_path}: unchanged\n")

    proxy.config_path.write_text(file_of(proxy, proxy={"backlog": 1e12}))
    refused = await run_cli("reload", env=env)
    assert refused.code == 1
    assert "proxy.backlog: Input should be less than or equal to 65535" in refused.err
    assert refused.out == ""
    assert await served_by(proxy) == "green"


# -- the file watch ----------------------------------------------------------------------------


async def test_the_watch_follows_symlink_swaps_and_outlives_bad_files(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    blue, green = await upstream("blue"), await upstream("green")
    proxy = zdproxy(
        {"pools": pools([blue.address], [green.address]), "reload": {"debounce": "100ms"}}
    )
    link = proxy.config_path

    async def weight_becomes(weight: int) -> None:
        async with asyncio.timeout(10):
            while (  # noqa: ASYNC110 - polling another process: no event to await
                await admin_api(proxy, "GET", "/v1/split")
            )["candidate_weight"] != weight:
                await asyncio.sleep(0.05)

    # The file becomes a link, which releases are then swapped under (Capistrano style),
    # each release in a directory of its own; the last is then edited in place.
    for n, weight in enumerate((2500, 5000), start=1):
        release = tmp_path / f"release-{n}" / "zdproxy.toml"
        release.parent.mkdir()
        release.write_text(file_of(proxy, split={"candidate_weight": weight}))
        swap_link(link, release)
        await weight_becomes(weight)
    release.write_text(file_of(proxy, split={"candidate_weight": 7500}))
    await weight_becomes(7500)

    # Bad files of every kind are refused, and the watch still follows the next swap.
    bad = {"deep": DEEP, "empty": "", "binary": "\xff\xfe", "huge": "[proxy]\nbacklog = 1e12\n"}
    for name, text in bad.items():
        mark = sum('msg="reload_refused:' in line for line in proxy.log_lines)
        path = tmp_path / f"{name}.toml"
        path.write_bytes(text.encode("latin-1"))
        swap_link(link, path)
        await wait_until(
            lambda mark=mark: sum('msg="reload_refused:' in ln for ln in proxy.log_lines) > mark,
            within=10,
        )
    assert (await admin_api(proxy, "GET", "/v1/split"))["candidate_weight"] == 7500
    refusals = (await admin_api(proxy, "GET", "/v1/events?kind=reload_refused"))["events"]
    reasons = [e["data"]["errors"][0] for e in refusals[-4:]]
    assert reasons[0] == "a: nested deeper than 32 levels of arrays or inline tables"
    assert reasons[1].startswith("pools: the file is empty")
    assert reasons[2].startswith("(top level): not UTF-8 text")
    assert reasons[3] == "proxy.backlog: Input should be less than or equal to 65535"
    swap_link(link, release)
    await weight_becomes(7500)  # the release again: applied, not refused
    assert not any("Traceback" in line for line in proxy.log_lines)
    assert not any("file watch stopped" in line for line in proxy.log_lines)


async def test_the_watch_follows_a_kubernetes_configmap_swap(tmp_path: Path) -> None:
    """A ConfigMap volume: zdproxy.toml -> ..data/zdproxy.toml, ..data -> ..TIMESTAMP; an
    update writes a new ..TIMESTAMP directory and renames a new ..data link over the old."""
    volume = tmp_path / "config"
    volume.mkdir()

    def publish(stamp: str, text: str) -> None:
        (volume / stamp).mkdir()
        (volume / stamp / "zdproxy.toml").write_text(text)
        swap_link(volume / "..data", Path(stamp))

    publish("..2024_01", "one")
    (volume / "zdproxy.toml").symlink_to(Path("..data") / "zdproxy.toml")
    seen: list[set[Path]] = []
    calls = 0

    def on_change(changed: set[Path]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the first reload")  # must not end the watch
        seen.append(changed)

    task = asyncio.ensure_future(watch([volume / "zdproxy.toml"], 0.05, on_change))
    try:
        await asyncio.sleep(0)  # one loop turn: the watch takes the files' fingerprints
        publish("..2024_02", "two")  # seen by inotify, or by the rescan if not yet armed
        await wait_until(lambda: calls == 1)
        publish("..2024_03", "three")
        await wait_until(lambda: bool(seen))
        assert seen == [{volume / "zdproxy.toml"}]
        (volume / "..2024_03" / "zdproxy.toml").write_text("three, edited in place")
        await wait_until(lambda: len(seen) == 2)
        assert not task.done()
    finally:
        task.cancel()


async def test_a_reload_that_replaces_every_serving_upstream_is_refused(
    zdproxy: StartProxy, upstream: StartUpstream, tmp_path: Path
) -> None:
    """Like `pool set`: new upstreams serve only once healthy, so a file that swaps out
    everything that serves would leave every request a 503 until then."""
    old, new = await upstream("blue"), await upstream("blue-next")
    proxy = zdproxy({"pools": pools([old.address])})
    proxy.config_path.write_text(file_of(proxy, pools=pools([new.address])))
    refused = await reload_api(proxy, status=409)
    assert refused["errors"][0]["field"] == "pools", refused
    assert await served_by(proxy) == "blue"
    both = file_of(proxy, pools=pools([old.address, new.address]))
    proxy.config_path.write_text(both)
    assert (await reload_api(proxy))["result"] == "applied"
