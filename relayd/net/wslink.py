"""The agent link carried as binary WebSocket messages (RFC 6455) over TLS,
for networks that let only HTTPS out.

``WsProtocol`` sits on the real (TLS) transport, decodes frames with the
sans-I/O codec (relayd.core.wsframe) and feeds the payload to an inner
byte-stream protocol (the preamble, then the MuxConnection) through
``WsTransport``, which wraps every write in one binary frame (masked when we
are the client). The inner protocol cannot tell it is not on plain TLS: the
TLS object, peer address and flow control all pass through, so mTLS identity
checks and back-pressure work unchanged.

``HttpsPort`` is the relay's HTTPS listener protocol: for now it knows one
resource, ``GET /.relayd/agent`` with a WebSocket upgrade, and answers
anything else with a short 404. ``upgrade_client`` is the agent's side of the
opening handshake.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
from typing import Callable

from relayd import metrics
from relayd.core import wsframe as ws
from relayd.log import RateLimitedLog
from relayd.net import abort_with_reset, peer_name
from relayd.core import http1

log = logging.getLogger("relayd.wslink")
_LOG = RateLimitedLog(log)

AGENT_PATH = "/.relayd/agent"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


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
        mask, which costs one copy."""
        if self._closing:
            return
        bufs = [d for d in list_of_data if len(d)]
        if not bufs:
            return
        if self._owner.client:
            payload = bufs[0] if len(bufs) == 1 and type(bufs[0]) is bytes else b"".join(bufs)
            self._real.write(ws.encode_frame(ws.OP_BINARY, payload, True, os.urandom(4)))
        else:
            n = 0
            for b in bufs:
                n += len(b)
            self._real.writelines([ws.encode_header(ws.OP_BINARY, n, True, None)] + bufs)

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
            self._closing = True
            key = os.urandom(4) if self._owner.client else None
            self._real.write(ws.encode_close(ws.CLOSE_NORMAL, "", key))
            self._real.close()

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
    """Decodes frames from the real transport for the inner protocol."""

    def __init__(self, inner: asyncio.Protocol, client: bool) -> None:
        self.inner = inner
        self.client = client
        self.parser = ws.FrameParser(server=not client)
        self.transport: WsTransport | None = None
        self._real = None

    def connection_made(self, real) -> None:
        self._real = real
        self.transport = WsTransport(real, self)
        self.inner.connection_made(self.transport)

    def data_received(self, data: bytes) -> None:
        for ev in self.parser.feed(data):
            kind = type(ev).__name__
            if kind == "DataFrame":
                if ev.opcode != ws.OP_BINARY:
                    self._fail(1003, "the agent link carries binary messages only")
                    return
                if ev.data:
                    self.inner.data_received(ev.data)
            elif kind == "Ping":
                key = os.urandom(4) if self.client else None
                self._real.write(ws.encode_frame(ws.OP_PONG, ev.data, True, key))
            elif kind == "Close":
                if not self.transport._closing:
                    self.transport.close()
                return
            elif kind == "WsProtocolError":
                metrics.BAD_INPUT.labels("websocket", type(ev.error).__name__).inc()
                _LOG.warning("bad WebSocket frame: %s", ev.error)
                self._fail(ev.close_code, "")
                return

    def _fail(self, code: int, reason: str) -> None:
        key = os.urandom(4) if self.client else None
        self._real.write(ws.encode_close(code, reason, key))
        self.transport._closing = True
        self._real.close()

    def eof_received(self):
        return None

    def connection_lost(self, exc) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class HttpsPort(asyncio.Protocol):
    """The relay's HTTPS listener: the agent link's WebSocket upgrade."""

    def __init__(self, make_agent_protocol: Callable[[], asyncio.Protocol], make_http=None, ticket=None) -> None:
        self._make = make_agent_protocol
        # Admission ticket (relayd.net.admission): unauthenticated until the
        # first request head is whole.
        self._ticket = ticket
        self._make_http = make_http  # (port, transport) -> HttpConnection, or None: 404
        self._http = None
        self._buf = b""
        self._transport = None
        self._timer = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(http1.LIMITS.timeout, self._head_timeout)

    def _head_timeout(self) -> None:
        # A client that never finishes its first head (slowloris).
        metrics.BAD_INPUT.labels("https", "head_timeout").inc()
        _LOG.info("no whole request head within %gs", http1.LIMITS.timeout, extra={"peer": peer_name(self._transport)})
        abort_with_reset(self._transport)

    def data_received(self, data: bytes) -> None:
        if self._http is not None:
            self._http.feed(data)
            return
        self._buf += data
        try:
            end = http1.find_request_head(self._buf)
            if end < 0:
                return
            head = http1.parse_request_head(self._buf[:end])
        except http1.HeadError as exc:
            # HTTP/0.9, a bare LF, garbage: answered at once, not held until
            # the head timeout.
            metrics.BAD_INPUT.labels("https", "head_too_large" if exc.status == 431 else "bad_request").inc()
            self._reply(exc.status, str(exc))
            return
        self._timer.cancel()
        self._release()
        rest = self._buf[end:]
        if head.path != AGENT_PATH.encode():
            if self._make_http is None:
                self._reply(404, "no HTTP endpoints are served here")
                return
            # Everything but the agent link is HTTP ingress.
            self._http = self._make_http(self, self._transport)
            self.data_received = self._http.feed  # from now on, straight to the parser
            buf, self._buf = self._buf, b""
            self._http.feed(buf)
            return
        key = (head.get(b"sec-websocket-key") or b"").decode("latin-1")
        try:
            key_ok = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            key_ok = False
        if (head.method != b"GET" or head.tokens(b"upgrade") != {b"websocket"}
                or b"upgrade" not in head.tokens(b"connection")
                or head.get(b"sec-websocket-version") != b"13" or not key_ok):
            metrics.BAD_INPUT.labels("https", "bad_upgrade").inc()
            self._reply(400, "expected a WebSocket upgrade (version 13)")
            return
        self._transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n")
        proto = WsProtocol(self._make(), client=False)
        self._transport.set_protocol(proto)
        proto.connection_made(self._transport)
        if rest:
            proto.data_received(rest)

    def _reply(self, status: int, text: str) -> None:
        metrics.HTTP_RESPONSES.labels(str(status)).inc()
        self._transport.write(http1.response(status, (text + "\n").encode()))
        self._transport.close()

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


class ClientUpgrade(asyncio.Protocol):
    """The agent's side of the opening handshake; then hands the link to
    ``WsProtocol(inner)``."""

    def __init__(self, inner: asyncio.Protocol, host: str) -> None:
        self.inner = inner
        self.host = host
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._buf = b""
        self._transport = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        transport.write(
            f"GET {AGENT_PATH} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())

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
        if head.status != 101 or head.get(b"sec-websocket-accept") != accept_key(self.key).encode():
            self._fail(f"relay refused the WebSocket upgrade: {head.status} {head.reason[:60].decode('latin-1')!r}")
            return
        proto = WsProtocol(self.inner, client=True)
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


