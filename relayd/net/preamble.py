"""One request and one reply before a link turns into a yamux session.

The relay's agent port serves several things on one TLS listener: fetching
the CA certificate (bootstrap), enrollment with a join token, certificate
renewal, and the tunnel itself. The client speaks first with one
length-prefixed msgpack request; the server answers with one reply; for a
tunnel both sides then hand the transport to a ``MuxConnection``, passing on
any bytes that already followed the reply.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from relayd import metrics
from relayd.log import RateLimitedLog
from relayd.net import peer_name
from relayd.core import wire
from relayd.core.framing import FramingError, MessageReader, encode_message

log = logging.getLogger("relayd.preamble")
_LOG = RateLimitedLog(log)  # anyone can cause these lines at will



class ServerPreamble(asyncio.Protocol):
    """Server side: ``handler(request, transport)`` returns
    ``(reply, protocol_or_None)``; a protocol takes the transport over."""

    def __init__(self, handler: Callable[[dict, asyncio.Transport], Awaitable[tuple[dict, asyncio.Protocol | None]]],
                 timeout: float = 10.0, ticket=None) -> None:
        self._handler = handler
        # Admission ticket (relayd.net.admission): the connection counts as
        # unauthenticated until its request is answered.
        self._ticket = ticket
        self._reader = MessageReader()
        self._transport = None
        self._timer = None
        self._timeout = timeout
        self._busy = False

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)

    def _expire(self) -> None:
        _LOG.info("preamble timed out", extra={"peer": peer_name(self._transport)})
        metrics.BAD_INPUT.labels("agent_port", "timeout").inc()
        self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._busy:
            metrics.BAD_INPUT.labels("agent_port", "spoke_early").inc()
            self._transport.abort()  # the client must wait for the reply
            return
        try:
            msg, rest = self._reader.feed(data)
        except FramingError as exc:
            _LOG.warning("bad preamble: %s", exc, extra={"peer": peer_name(self._transport)})
            metrics.BAD_INPUT.labels("agent_port", type(exc).__name__).inc()
            self._transport.abort()
            return
        if msg is None:
            return
        if rest:
            _LOG.warning("client spoke before the reply", extra={"peer": peer_name(self._transport)})
            metrics.BAD_INPUT.labels("agent_port", "spoke_early").inc()
            self._transport.abort()
            return
        self._busy = True
        self._transport.pause_reading()
        asyncio.get_running_loop().create_task(self._handle(msg))

    async def _handle(self, msg: dict) -> None:
        t = self._transport
        try:
            reply, proto = await self._handler(msg, t)
        except Exception:
            log.exception("preamble handler failed")
            t.abort()
            return
        if self._timer is not None:
            self._timer.cancel()
        if self._ticket is not None:
            if reply.get("ok") and msg.get("op") in wire.PROVING:
                self._ticket.proven()  # its source is an agent's: see admission's reserve
            self._release()
        if t.is_closing():
            return
        t.write(encode_message(reply))
        if proto is None:
            t.close()
            return
        t.set_protocol(proto)
        proto.connection_made(t)
        t.resume_reading()

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._release()

    def _release(self) -> None:
        if self._ticket is not None:
            self._ticket.release()
            self._ticket = None


class ClientPreamble(asyncio.Protocol):
    """Client side: sends ``request``; ``reply`` resolves with the answer.

    With ``make_protocol``, an ``ok`` reply hands the transport over at once
    to ``make_protocol(reply)`` (bytes after the reply go to it too).
    """

    def __init__(self, request: wire.Request, make_protocol: Callable[[dict], asyncio.Protocol] | None = None) -> None:
        self._request = request
        self._make = make_protocol
        self._reader = MessageReader()
        self.reply: asyncio.Future = asyncio.get_running_loop().create_future()
        self.protocol: asyncio.Protocol | None = None
        self._transport = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        transport.write(encode_message(wire.encode_request(self._request)))

    def data_received(self, data: bytes) -> None:
        if self.reply.done():
            return
        try:
            msg, rest = self._reader.feed(data)
        except FramingError as exc:
            self.reply.set_exception(exc)
            self._transport.abort()
            return
        if msg is None:
            return
        if self._make is not None and msg.get("ok") is True and msg.get("v") == wire.LINK_VERSION:
            proto = self._make(msg)
            self.protocol = proto
            self._transport.set_protocol(proto)
            proto.connection_made(self._transport)
            if rest:
                proto.data_received(rest)
        self.reply.set_result(msg)

    def connection_lost(self, exc) -> None:
        if not self.reply.done():
            self.reply.set_exception(ConnectionError(f"connection closed before the reply ({exc or 'EOF'})"))


