"""The agent link carried as binary WebSocket messages (RFC 6455) over TLS,
for networks that let only HTTPS out.

``WsProtocol`` is a thin adapter around the sans-I/O WebSocket connection of
the core (relayd.core.wsframe.Connection, which answers pings, runs the
closing handshake and applies the limits): it feeds the real (TLS)
transport's bytes to the connection, hands binary message payload to an
inner byte-stream protocol (the preamble, then the MuxConnection) through
``WsTransport``, which sends every write as one binary message (masked when
we are the client), and writes what the connection queues. The inner
protocol cannot tell it is not on plain TLS: the TLS object, peer address and
flow control all pass through, so mTLS identity checks and back-pressure work
unchanged. The agent link carries binary messages only: a text message
closes it with 1003.

``HttpsPort`` is the relay's HTTPS front door (each request routed on its
own by the HTTP ingress); ``agent_link_service`` is the relay's own service
at ``GET /.relayd/agent`` with a WebSocket upgrade. ``ClientUpgrade`` is the
agent's side of the opening handshake.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from relayd import metrics
from relayd.core import wsframe as ws
from relayd.core.wshandshake import Refuse, client_handshake, server_handshake
from relayd.errors import InvalidHandshake
from relayd.log import RateLimitedLog
from relayd.net import abort_with_reset, peer_name
from relayd.core import http1

log = logging.getLogger("relayd.wslink")
_LOG = RateLimitedLog(log)

AGENT_PATH = "/.relayd/agent"

#: The agent link's WebSocket limits: a message is one write of the link
#: (the mux flushes up to its frame size per write).
AGENT_LINK = ws.AGENT_LINK

class WsTransport(asyncio.Transport):
    """A byte-stream transport made of binary WebSocket messages."""

    def __init__(self, real: asyncio.Transport, owner: "WsProtocol") -> None:
        super().__init__()
        self._real = real
        self._owner = owner
        self._closing = False

    def write(self, data) -> None:
        self.writelines((data,))

    def writelines(self, list_of_data) -> None:
        """One binary message. A server's frames are not masked, so the
        payload buffers go out by reference behind the header; a client must
        mask, which costs one copy. Once the WebSocket is closing (a close
        frame came in, perhaps in the same read as the data being handled
        now), nothing more may be sent: dropped, as after ``close()``."""
        if self._closing or self._owner.conn.state != ws.OPEN:
            return
        bufs = [d for d in list_of_data if len(d)]
        if not bufs:
            return
        self._owner.conn.send_binary(bufs)
        self._owner.flush()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise RuntimeError("a WebSocket link cannot half-close")

    def get_extra_info(self, name, default=None):
        return self._real.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._real.is_closing()

    def close(self) -> None:
        if not self._closing:
            conn = self._owner.conn
            if conn.state == ws.OPEN:
                conn.send_close(ws.CLOSE_NORMAL)
            self._owner.end()

    def abort(self) -> None:
        self._closing = True
        self._real.abort()

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def set_protocol(self, protocol) -> None:
        self._owner.inner = protocol

    def get_protocol(self):
        return self._owner.inner


class WsProtocol(asyncio.Protocol):
    """Bytes between the real transport and the WebSocket connection;
    binary message payload to the inner protocol."""

    def __init__(self, inner: asyncio.Protocol, client: bool, config: ws.WsConfig = AGENT_LINK) -> None:
        self.inner = inner
        self.client = client
        self.conn = ws.Connection(client, config, False)
        self.transport: WsTransport | None = None
        self._real = None
        self._paused = False

    def connection_made(self, real) -> None:
        self._real = real
        self.transport = WsTransport(real, self)
        self.inner.connection_made(self.transport)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        for ev in conn.receive_data(data):
            cls = type(ev)
            if cls is ws.DataFrame:
                if ev.opcode != ws.OP_BINARY:
                    conn.fail(ws.CLOSE_UNSUPPORTED, "the agent link carries binary messages only")
                    self.end()
                    return
                if ev.data:
                    self.inner.data_received(ev.data)
                    if self.transport._closing:
                        return
            elif cls is ws.Close:
                self.end()  # our answer is queued: the handshake is done
                return
            elif cls is ws.WsProtocolError:
                metrics.BAD_INPUT.labels("websocket", type(ev.error).__name__).inc()
                _LOG.warning("bad WebSocket frame: %s", ev.error)
                self.end()
                return
            # Ping: the pong is queued; Pong: nothing to do.
        if not self._paused:
            # Pongs wait while the peer does not read ours; the connection
            # fails the link (1008) before it holds more than max_buffered.
            self.flush()

    def flush(self) -> None:
        bufs = self.conn.data_to_send_list()
        if bufs:
            if len(bufs) == 1:
                self._real.write(bufs[0])
            else:
                self._real.writelines(bufs)

    def end(self) -> None:
        """Write what is queued (the close frame) and close the transport."""
        self.transport._closing = True
        self.flush()
        self._real.close()

    def eof_received(self):
        self.conn.receive_eof()
        return None

    def connection_lost(self, exc) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self._paused = False
        self.flush()
        self.inner.resume_writing()


class HttpsPort(asyncio.Protocol):
    """The relay's HTTPS front door, one per client connection.

    Every request, each request on a kept-alive connection included, is
    routed on its own by the HTTP ingress (relayd.net.http_ingress): to an
    HTTP endpoint's agents, or to one of the relay's own services (local
    routes; today the agent link at ``AGENT_PATH`` on any host name). This
    protocol only keeps the first head's timeout and the admission ticket,
    and steps aside when a local service takes the connection over.
    """

    def __init__(self, make_http, ticket=None, limits: http1.HttpLimits = http1.LIMITS) -> None:
        self._limits = limits
        # Admission ticket (relayd.net.admission): unauthenticated until the
        # first request head is whole.
        self._ticket = ticket
        self._make_http = make_http  # (port, transport) -> HttpConnection
        self._http = None
        self._transport = None
        self._timer = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._limits.head_timeout, self._head_timeout)
        # The ingress reads every head, the first included: it answers a bad
        # one at once and calls first_head() when the first is whole.
        self._http = self._make_http(self, transport)
        self.data_received = self._http.feed

    def _head_timeout(self) -> None:
        # A client that never finishes its first head (slowloris).
        metrics.BAD_INPUT.labels("https", "head_timeout").inc()
        _LOG.info("no whole request head within %gs", self._limits.head_timeout,
                  extra={"peer": peer_name(self._transport)})
        abort_with_reset(self._transport)

    def first_head(self) -> None:
        """The ingress has the connection's first whole request head."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._release()

    def detach(self) -> None:
        """A local service takes the connection over: nothing more comes here."""
        self._http = None
        self.data_received = self._detached

    def _detached(self, data: bytes) -> None:
        pass

    def eof_received(self):
        if self._http is not None:
            self._http.eof()
        return None  # TLS cannot half-close: the transport closes

    def pause_writing(self) -> None:
        if self._http is not None:
            self._http.pause_writing()

    def resume_writing(self) -> None:
        if self._http is not None:
            self._http.resume_writing()

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._release()
        if self._http is not None:
            self._http.lost()

    def _release(self) -> None:
        if self._ticket is not None:
            self._ticket.release()
            self._ticket = None


def agent_link_service(make_agent_protocol: Callable[[], asyncio.Protocol], config: ws.WsConfig = AGENT_LINK):
    """The relay's own service at ``AGENT_PATH``: a WebSocket upgrade that
    turns the connection into an agent link (``WsProtocol`` around
    ``make_agent_protocol()``, the preamble, with the limits of ``config``);
    anything else gets 400."""

    def serve(head: http1.RequestHead, transport, rest: bytes) -> None:
        res = server_handshake(head.method, head.target, head.headers)
        if isinstance(res, Refuse):
            metrics.BAD_INPUT.labels("https", "bad_upgrade").inc()
            metrics.HTTP_RESPONSES.labels(str(res.status)).inc()
            transport.write(http1.response(res.status, (res.reason + "\n").encode(), headers=list(res.headers)))
            transport.close()
            return
        transport.write(res.response)
        proto = WsProtocol(make_agent_protocol(), client=False, config=config)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if rest:
            proto.data_received(rest)

    return serve


class ClientUpgrade(asyncio.Protocol):
    """The agent's side of the opening handshake; then hands the link to
    ``WsProtocol(inner)``."""

    def __init__(self, inner: asyncio.Protocol, host: str, config: ws.WsConfig = AGENT_LINK,
                 path: str = AGENT_PATH) -> None:
        self.inner = inner
        self.host = host
        self.config = config
        self._handshake = client_handshake(host, path)
        self.key = self._handshake.key
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._buf = b""
        self._transport = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        transport.write(self._handshake.request)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self._buf += data
        end = http1.head_end(self._buf)
        if end < 0:
            if len(self._buf) > http1.LIMITS.max_head:
                self._fail("oversized handshake reply")
            return
        rest = self._buf[end:]
        try:
            head = http1.parse_response_head(self._buf[:end])
        except http1.HeadError as exc:
            self._fail(f"the relay sent a malformed handshake reply: {exc}")
            return
        try:
            self._handshake.check(head.status, head.headers)
        except InvalidHandshake as exc:
            self._fail(f"relay refused the WebSocket upgrade: {head.status} {head.reason[:60].decode('latin-1')!r} "
                       f"({exc})")
            return
        proto = WsProtocol(self.inner, client=True, config=self.config)
        self._transport.set_protocol(proto)
        proto.connection_made(self._transport)
        self.done.set_result(proto)
        if rest:
            proto.data_received(rest)

    def _fail(self, why: str) -> None:
        self.done.set_exception(ConnectionError(why))
        self._transport.abort()

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection closed during the WebSocket handshake ({exc})"))


