"""Data-plane workers: `proxy.workers = N` processes that serve the proxy listener,
behind the one main process that keeps the control plane.

The main process binds (or inherits) the listening socket and starts each worker as
a fresh interpreter (`python -m zdproxy.workers.worker`) that imports the data plane
only. They talk over a socket pair: routing snapshots, limits and commands go down,
reports (records, streaks, requests in flight, counters) come up every few
milliseconds. `WorkerSet` (supervisor.py) meets the same DataPlane Protocol as the
in-process ProxyServer, so the control plane cannot tell the two apart.
"""
