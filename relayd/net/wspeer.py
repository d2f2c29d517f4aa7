"""A WebSocket connection after its opening handshake, message by message:
the uvloop adapter of relayd.core.wsframe's Connection for the relay's own
WebSocket services (the hybrid connections' control channels and
rendezvous), and the splice that joins two of them frame by frame.

``WsPeer`` hands each message (or, with ``assemble=False``, each part as it
arrives) to its handler's ``ws_message(peer, event)``, and the end to
``ws_closed(peer, code, reason)`` once; pings are answered by the core. The
handler sends with ``send_text``, ``send_binary`` and ``close``.
``WsSplice`` relays two peers' parts unchanged (the core unmasks what a
client sent; what the relay sends is not masked), with back-pressure: when
one side's transport is full, the other side's reading pauses.
"""

from __future__ import annotations

import asyncio
import logging

from relayd import metrics
from relayd.core import wsframe as ws
from relayd.errors import RelaydError
from relayd.log import RateLimitedLog

_LOG = RateLimitedLog(logging.getLogger("relayd.ws"))


class WsPeer(asyncio.Protocol):
    """One server-side WebSocket connection; see the module's docstring."""

    def __init__(self, handler, config: ws.WsConfig | None = None, assemble: bool = True, where: str = "ws") -> None:
        self.handler = handler
        self.conn = ws.Connection(False, config, assemble)
        self.transport = None
        self.where = where  # the metric label of bad input
        self.done = False
        self.peer = None  # (host, port) of the client
        self._write_paused = False

    # -- transport side -------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        for ev in self.conn.receive_data(data):
            cls = type(ev)
            if cls is ws.Close:
                self._end(ev.code, ev.reason)
                return
            if cls is ws.WsProtocolError:
                metrics.BAD_INPUT.labels(self.where, type(ev.error).__name__).inc()
                _LOG.info("bad WebSocket frame: %s", type(ev.error).__name__, extra={"where": self.where})
                self._end(ev.close_code, "")
                return
            if cls is not ws.Ping and cls is not ws.Pong:
                try:
                    self.handler.ws_message(self, ev)
                except Exception:  # a handler's bug ends this connection only
                    logging.getLogger("relayd.ws").exception("WebSocket handler failed")
                    self.close(ws.CLOSE_INTERNAL, "internal error")
                    return
                if self.done:
                    return
        self.flush()

    def eof_received(self):
        self.conn.receive_eof()
        return None

    def connection_lost(self, exc) -> None:
        if not self.done:
            self.done = True
            self.handler.ws_closed(self, ws.CLOSE_ABNORMAL, "")

    def pause_writing(self) -> None:
        self._write_paused = True
        self.handler.ws_writable(self, False)

    def resume_writing(self) -> None:
        self._write_paused = False
        self.flush()
        self.handler.ws_writable(self, True)

    # -- what the handler does --------------------------------------------------------------

    def send_text(self, text: str) -> None:
        if not self.done:
            self.conn.send_text(text)
            self.flush()

    def send_binary(self, data: bytes) -> None:
        if not self.done:
            self.conn.send_binary(data)
            self.flush()

    def send_part(self, opcode: int, data: bytes, fin: bool, first: bool) -> None:
        """One part of a message relayed as it came."""
        if self.done:
            return
        if not first:
            self.conn.send_continuation(data, fin)
        elif opcode == ws.OP_TEXT:
            self.conn.send_text(data, fin)
        else:
            self.conn.send_binary(data, fin)
        self.flush()

    def close(self, code: int = ws.CLOSE_NORMAL, reason: str = "") -> None:
        """Send a close frame and end the connection (the handler's
        ws_closed is not called for a close it asked for)."""
        if self.done:
            return
        self.done = True
        try:
            self.conn.send_close(code, reason[:120])
        except RelaydError:
            pass
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.done:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.done:
            self.transport.resume_reading()

    @property
    def writable(self) -> bool:
        return not self._write_paused

    def flush(self) -> None:
        bufs = self.conn.data_to_send_list()
        if bufs and self.transport is not None:
            self.transport.writelines(bufs)

    def _end(self, code: int, reason: str) -> None:
        """The peer closed (our answer is queued) or broke the protocol."""
        self.done = True
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self.handler.ws_closed(self, code, reason)


class WsSplice:
    """Two WebSocket peers joined: each part of each message goes to the
    other side as it came; a close from one side goes to the other with its
    code and reason; a side that vanishes gives the other 1001. ``on_end``
    is called once, with the bytes relayed each way and the closing code."""

    def __init__(self, a: WsPeer, b: WsPeer, on_end=None) -> None:
        self.a, self.b = a, b
        a.handler = b.handler = self
        self._mid = {a: False, b: False}  # a message from this side is half relayed
        self.bytes = {a: 0, b: 0}
        self.on_end = on_end
        self.ended = False

    def other(self, peer: WsPeer) -> WsPeer:
        return self.b if peer is self.a else self.a

    def ws_message(self, peer: WsPeer, ev) -> None:
        to = self.other(peer)
        data = ev.data.encode() if type(ev.data) is str else ev.data
        if type(ev) is ws.DataFrame:
            to.send_part(ev.opcode, data, ev.fin, not self._mid[peer])
            self._mid[peer] = not ev.fin
        else:
            to.send_part(ws.OP_TEXT if type(ev) is ws.TextMessage else ws.OP_BINARY, data, True, True)
        self.bytes[peer] += len(data)

    def ws_writable(self, peer: WsPeer, writable: bool) -> None:
        other = self.other(peer)
        if writable:
            other.resume_reading()
        else:
            other.pause_reading()

    def ws_closed(self, peer: WsPeer, code: int, reason: str) -> None:
        to = self.other(peer)
        if code in (ws.CLOSE_ABNORMAL, ws.CLOSE_NO_STATUS) or not ws.close_code_allowed(code):
            code, reason = ws.CLOSE_GOING_AWAY, "the other side went away"
        to.close(code, reason)
        if not self.ended:
            self.ended = True
            if self.on_end is not None:
                self.on_end(self.bytes[self.a], self.bytes[self.b], code)
