"""The data plane: asyncio protocols with httptools parsers, forwarding bytes between
clients and upstreams. It reads routing snapshots and writes response records; it
never awaits the control plane."""

from zdproxy.dataplane.server import ProxyServer

__all__ = ["ProxyServer"]
