"""TCP over a hybrid connection, as Microsoft's azure-relay-bridge does it
(``relayd hc forward``): an existing TCP application (a database, SSH)
crosses a hybrid connection with no change.

* ``-R HOST:PORT`` (the listener side, next to the service): every sender
  that connects to the hybrid connection is joined to a new TCP connection
  to HOST:PORT.
* ``-L [HOST:]PORT`` (the sender side, next to the client): every TCP
  connection to the local port becomes a sender's WebSocket to the hybrid
  connection.

Bytes go as binary WebSocket messages, both ways, with back-pressure (a
side is read only as fast as the other takes it); a half that ends closes
the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from relayd.client import hybrid

log = logging.getLogger("relayd.client.forward")


async def splice(ws: hybrid.WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, int]:
    """TCP and WebSocket joined until either ends; (bytes to the WebSocket,
    bytes to TCP)."""
    sent = [0, 0]

    async def tcp_to_ws() -> None:
        while data := await reader.read(256 * 1024):
            await ws.send(data)
            sent[0] += len(data)

    async def ws_to_tcp() -> None:
        async for message in ws:
            data = message.encode() if isinstance(message, str) else message
            writer.write(data)
            await writer.drain()
            sent[1] += len(data)

    tasks = [asyncio.ensure_future(tcp_to_ws()), asyncio.ensure_future(ws_to_tcp())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await ws.close()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return sent[0], sent[1]


def remote_listener(cs, host: str, port: int, **kw) -> hybrid.Listener:
    """The listener side: senders' connections go to ``host:port``."""

    async def joined(ws: hybrid.WebSocket) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            log.warning("cannot reach %s:%d: %s", host, port, exc.strerror)
            return
        up, down = await splice(ws, reader, writer)
        log.info("forwarded connection ended", extra={"to_service": down, "from_service": up})

    return hybrid.Listener(cs, on_accept=joined, **kw)


async def local_port(cs, host: str, port: int, **kw) -> asyncio.AbstractServer:
    """The sender side: a TCP listener on ``host:port`` whose connections
    cross the hybrid connection."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ws = await hybrid.connect(cs, **kw)
        except (OSError, ConnectionError, hybrid.HandshakeRefused) as exc:
            log.warning("cannot reach the hybrid connection: %s", exc)
            writer.close()
            return
        await splice(ws, reader, writer)

    return await asyncio.start_server(client, host, port)
