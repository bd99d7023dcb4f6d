"""Watching files for changes: the config file (hot reload) and the TLS files it names.

The directory is watched, not the file: editors and deploy tools replace a file by
renaming a new one over it, which a watch on the old inode would miss.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import watchfiles

log = logging.getLogger("zdproxy.watch")


async def watch(
    paths: Iterable[Path], debounce: float, on_change: Callable[[set[Path]], None]
) -> None:
    """Call `on_change` with the changed files among `paths`, once per burst of changes."""
    wanted = {path.resolve() for path in paths}
    directories = {path.parent for path in wanted}

    def relevant(_: watchfiles.Change, name: str) -> bool:
        return Path(name).resolve() in wanted

    async for changes in watchfiles.awatch(
        *directories,
        watch_filter=relevant,
        debounce=round(debounce * 1000),
        step=50,
        recursive=False,
        ignore_permission_denied=True,
    ):
        changed = {Path(name) for _, name in changes}
        log.debug("changed: %s", ", ".join(sorted(map(str, changed))))
        on_change(changed)


def start_watch(
    paths: Iterable[Path], debounce: float, on_change: Callable[[set[Path]], None]
) -> asyncio.Task[None]:
    # As named (certbot swaps a symlink in the named directory) and as resolved (an
    # editor rewrites the target): a change of either counts.
    wanted = {p for path in paths for p in (path.absolute(), path.resolve())}
    task = asyncio.ensure_future(watch(wanted, debounce, on_change))
    task.add_done_callback(_report)
    return task


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("file watch stopped: %r; SIGHUP still reloads", exc)
