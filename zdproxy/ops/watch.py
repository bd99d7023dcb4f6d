"""Watching files for changes: the config file (hot reload) and the TLS files it names.

Directories are watched, not files: editors and deploy tools replace a file by
renaming a new one over it, which a watch on the old inode would miss. A path may
be a symlink that a deploy re-points atomically (`ln -sfn v2.toml tmp && mv -T tmp
zdproxy.toml`, as Kubernetes ConfigMaps and Capistrano do): after every change each
path is resolved again, and the watch follows the directories of the link, of every
link it goes through, and of its current target.

Files are also compared once a second without an event, so a change made while
the watch is being armed is not lost. Nothing in a file can end the watch for the
life of the process: a failing callback is logged and the watch goes on, and a
failing watch (a directory gone for a moment) starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import watchfiles

log = logging.getLogger("zdproxy.watch")
# watchfiles logs every batch of changes at info: with a log file in the config's
# directory, each of those lines would be a change that makes the next line.
logging.getLogger("watchfiles").setLevel(logging.WARNING)

RETRY_SECONDS = 1.0  # before watching again after the watch itself failed
# With no event for this long the files are compared anyway: a change made while the
# watch was (re)arming, or one inotify never reports (a network filesystem), is seen.
RESCAN_MS = 1000
MAX_LINKS = 40  # symlink hops followed, as the kernel's own limit

# What identifies a file's content: its real path, device, inode, mtime and size.
Fingerprint = tuple[str, int, int, int, int] | None


def fingerprint(path: Path) -> Fingerprint:
    try:
        real = path.resolve()
        stat = real.stat()
    except (OSError, RuntimeError):  # missing for now, or a symlink loop
        return None
    return (str(real), stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


def names_of(path: Path) -> set[Path]:
    """The names a change of `path` can show up under: the path, each symlink it goes
    through and its target, each also with its directory resolved (inotify reports
    names under the directory it watches, which the kernel resolved)."""
    hops = [path]
    for _ in range(MAX_LINKS):
        try:
            hops.append(hops[-1].parent / os.readlink(hops[-1]))
        except OSError:  # not a link (any more), or gone
            break
    with contextlib.suppress(OSError, RuntimeError):  # a loop: the hops are all there is
        hops.append(path.resolve())
    names = set(hops)
    for hop in hops:
        try:
            names.add(hop.parent.resolve() / hop.name)
        except (OSError, RuntimeError):
            continue
    return names


def _directories(names: Iterable[Path]) -> set[Path]:
    found = set()
    for name in names:
        try:
            directory = name.parent.resolve()
        except (OSError, RuntimeError):
            continue
        if directory.is_dir():
            found.add(directory)
    return found


async def watch(
    paths: Iterable[Path], debounce: float, on_change: Callable[[set[Path]], None]
) -> None:
    """Call `on_change` with the changed files among `paths` (as given, made absolute),
    once per burst of changes, until cancelled."""
    wanted = [path.absolute() for path in paths]
    seen = {path: fingerprint(path) for path in wanted}
    while True:
        names = {path: names_of(path) for path in wanted}
        directories = _directories(n for found in names.values() for n in found)
        if not directories:
            await asyncio.sleep(RETRY_SECONDS)  # nothing to watch yet: look again soon
        else:
            try:
                async for changes in watchfiles.awatch(
                    *directories,
                    watch_filter=None,  # every name: a link's swap may be any name (..data)
                    debounce=round(debounce * 1000),
                    step=50,
                    recursive=False,
                    ignore_permission_denied=True,
                    rust_timeout=RESCAN_MS,
                    yield_on_timeout=True,  # an empty batch: compare the fingerprints
                ):
                    named = {Path(name) for _, name in changes}
                    now = {path: fingerprint(path) for path in wanted}
                    changed = {p for p in wanted if now[p] != seen[p] or names[p] & named}
                    seen = now
                    if changed:
                        _notify(on_change, changed)
                    if {path: names_of(path) for path in wanted} != names:
                        break  # a link points elsewhere now: watch where it points
            except Exception as exc:  # the watch outlives any one failure
                log.warning("file watch failed: %r; watching again in %gs", exc, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
        # Changes while the watch was re-armed were seen by no one: compare now.
        now = {path: fingerprint(path) for path in wanted}
        if changed := {path for path in wanted if now[path] != seen[path]}:
            _notify(on_change, changed)
        seen = now


def _notify(on_change: Callable[[set[Path]], None], changed: set[Path]) -> None:
    log.debug("changed: %s", ", ".join(sorted(map(str, changed))))
    try:
        on_change(changed)
    except Exception:
        # Whatever a file held, the next change must still be seen.
        log.exception("handling a change of %s failed; watching on", ", ".join(map(str, changed)))


def start_watch(
    paths: Iterable[Path], debounce: float, on_change: Callable[[set[Path]], None]
) -> asyncio.Task[None]:
    task = asyncio.ensure_future(watch(paths, debounce, on_change))
    task.add_done_callback(_report)
    return task


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("file watch stopped: %r; SIGHUP still reloads", exc)
