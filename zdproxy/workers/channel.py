"""Messages over a stream socket: a 4-byte big-endian length, then the pickled value.

One Channel per worker, on each end of a socket pair. `send` never waits (the
transport buffers), so the control plane can publish from synchronous code; the
messages of one end arrive in the order they were sent.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct

_LENGTH = struct.Struct(">I")
MAX_MESSAGE = 64 * 1024 * 1024  # far above any snapshot or report; a bigger length is a bug


class ChannelClosed(Exception):
    """The other end went away (exited, or closed its end)."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def send(self, message: object) -> None:
        if self._writer.is_closing():
            return  # the other end is gone: its supervisor finds out by the read side
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_LENGTH.pack(len(data)) + data)

    async def receive(self) -> object:
        try:
            head = await self._reader.readexactly(_LENGTH.size)
            (length,) = _LENGTH.unpack(head)
            if length > MAX_MESSAGE:
                raise ChannelClosed(f"a message of {length} bytes")
            data = await self._reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ChannelClosed(str(exc) or type(exc).__name__) from None
        return pickle.loads(data)

    async def drain(self) -> None:
        """Wait until what was sent has left this process (before an exit)."""
        if not self._writer.is_closing():
            await self._writer.drain()

    def close(self) -> None:
        self._writer.close()
