"""HTTP/1.1 ingress on the relay's HTTPS port.

Each request on a client connection is routed by ``Host`` and the longest
matching path prefix to an endpoint (``--http NAME=HOSTNAME[/PREFIX]``), and
carried on a yamux stream of its own to an agent serving that endpoint; the
agent dials the service and splices, as for TCP endpoints.

Theory of operation
-------------------
* Requests are parsed with httptools (llhttp, strict: obs-fold, CL together
  with TE, bad chunk sizes and the like are refused with 400). The head is
  rebuilt for the service: hop-by-hop headers dropped (RFC 9110 7.6.1,
  including those named in Connection), ``X-Forwarded-For``,
  ``X-Forwarded-Proto`` and ``Forwarded`` added.
* One stream per client connection and endpoint, kept alive across requests
  (and so one service connection behind the agent). A response parser runs
  over the passing bytes only to find where each response ends; nothing of
  the body is buffered or re-framed.
* Bodies stream: each piece the parser hands out goes on the stream at once
  (re-chunked when the client sent chunked), nothing is read whole into
  memory; when the stream's window is full, reading from the client pauses.
* Responses: the head is rewritten (hop-by-hop out; ``Connection: close`` to
  the client only when the response is delimited by the service closing),
  then every byte passes through. Window credit goes back only as the client's
  transport drains, so a slow client holds one window at most.
* Keep-alive and pipelining: one request is in flight at a time; requests
  that arrive meanwhile wait in a short queue (their bodies bounded; reading
  pauses beyond that).
* ``Upgrade: websocket`` is passed to the service; after its 101 the
  connection is spliced raw both ways.
* Errors answer with a short body: 400 bad request, 404 no route, 431 head
  too large, 503 no agent, 502 service unreachable, 504 no response in time.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field

import httptools

from relayd import metrics
from relayd.core.framing import encode_message
from relayd.errors import RelaydError

log = logging.getLogger("relayd.http")

MAX_HEAD = 32 * 1024
MAX_HEADERS = 100
MAX_QUEUED_BODY = 1024 * 1024
MAX_QUEUED_REQUESTS = 16
HEAD_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
              b"upgrade", b"proxy-authenticate", b"proxy-authorization"}
REASONS = {400: "Bad Request", 404: "Not Found", 431: "Request Header Fields Too Large",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass(frozen=True)
class Route:
    endpoint: str
    host: str
    prefix: str = "/"


def parse_route(name: str, text: str) -> Route:
    host, slash, prefix = text.partition("/")
    return Route(name, host.lower(), "/" + prefix if slash else "/")


def pick_route(routes: list[Route], host: str, path: str) -> Route | None:
    best = None
    for r in routes:
        if r.host == host and (path == r.prefix.rstrip("/") or path.startswith(r.prefix) or r.prefix == "/"):
            if best is None or len(r.prefix) > len(best.prefix):
                best = r
    return best


@dataclass
class Request:
    method: bytes = b""
    url: bytes = b""
    headers: list = field(default_factory=list)
    head_bytes: int = 0
    chunked: bool = False
    upgrade: bool = False
    head_only: bool = False  # HEAD: the response has no body whatever it says
    body: collections.deque = field(default_factory=collections.deque)
    body_bytes: int = 0
    complete: bool = False
    upstream_head: bytes = b""
    route: Route | None = None


class HttpConnection:
    """The HTTP/1.1 side of one client connection on the HTTPS port."""

    def __init__(self, port, transport, routes: list[Route], open_stream, gateway_timeout: float) -> None:
        self.port = port  # the HttpsPort protocol (owns the transport callbacks)
        self.transport = transport
        self.routes = routes
        self.open_stream = open_stream  # endpoint, meta -> MuxStream | None (no agent)
        self.gateway_timeout = gateway_timeout
        self.parser = httptools.HttpRequestParser(self)
        self.cur: Request | None = None  # being parsed
        self.queue: collections.deque[Request] = collections.deque()
        self.active: Request | None = None
        self.stream = None
        self.stream_endpoint = None
        self.resp_parser = None
        self.resp_done = _Done()
        self.resp_head = bytearray()
        self.resp_started = False
        self.resp_close = False
        self.raw = False  # after a 101: the response side is raw bytes
        self.raw_in = False  # after an upgrade request: client bytes go raw
        self.closed = False
        self.write_paused = False
        self.deferred = 0
        self.reading_paused = False
        self.pending_body: collections.deque = collections.deque()
        self.timer = None
        client = transport.get_extra_info("peername")
        self.client = client[0] if client else "?"

    # -- input from the client ----------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.raw_in:
            self._to_stream(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The upgrade request's head is done; what follows is the new
            # protocol's, for the service (which answers 101 or refuses).
            self.raw_in = True
            offset = exc.args[0] if exc.args else len(data)
            if self.stream is None:
                self.error(400, "an upgrade request cannot be pipelined")
                return
            rest = data[offset:]
            if rest:
                self._to_stream(rest)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refuse):
                self.error(cause.status, cause.text)
            else:
                log.exception("http ingress callback failed")
                self.error(400, "bad request")
        except httptools.HttpParserError as exc:
            metrics.BAD_INPUT.labels("https", "bad_request").inc()
            log.info("bad HTTP request: %s", exc, extra={"client": self.client})
            self.error(400, f"bad request: {exc}")

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.cur = Request()

    def on_url(self, url: bytes) -> None:
        self.cur.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.cur
        self._count(len(name) + len(value) + 4)
        req.headers.append((name, value))
        if len(req.headers) > MAX_HEADERS:
            raise _Refuse(431, f"more than {MAX_HEADERS} header fields")

    def _count(self, n: int) -> None:
        self.cur.head_bytes += n
        if self.cur.head_bytes > MAX_HEAD:
            raise _Refuse(431, "request head too large")

    def on_headers_complete(self) -> None:
        req = self.cur
        req.method = self.parser.get_method()
        req.upgrade = self.parser.should_upgrade()
        req.head_only = req.method == b"HEAD"
        host = b""
        te = []
        for name, value in req.headers:
            lname = name.lower()
            if lname == b"host":
                if host and value != host:
                    raise _Refuse(400, "several Host headers")
                host = value
            elif lname == b"transfer-encoding":
                te.append(value.strip().lower())
        if te:
            if te != [b"chunked"]:
                raise _Refuse(400, "only Transfer-Encoding: chunked is accepted")
            req.chunked = True
        if not host:
            raise _Refuse(400, "Host header required")
        hostname = host.decode("latin-1").rsplit(":", 1)[0].lower() if not host.startswith(b"[") else \
            host.decode("latin-1").split("]")[0] + "]"
        path = req.url.split(b"?", 1)[0].decode("latin-1")
        req.route = pick_route(self.routes, hostname, path)
        if req.route is None:
            raise _Refuse(404, f"no endpoint for {hostname}{path}")
        req.upstream_head = self._upstream_head(req, host)
        self._cancel_timer()
        if self.active is None:
            self._start(req)
        else:
            if len(self.queue) >= MAX_QUEUED_REQUESTS:
                raise _Refuse(400, "too many pipelined requests")
            self.queue.append(req)

    def on_body(self, body: bytes) -> None:
        req = self.cur
        if req is self.active and self.stream is not None and not req.body:
            self._send_body(req, body)
        else:
            req.body.append(body)
            req.body_bytes += len(body)
            if req.body_bytes > MAX_QUEUED_BODY:
                self._pause_reading()

    def on_message_complete(self) -> None:
        req = self.cur
        req.complete = True
        if req is self.active and self.stream is not None and not req.body:
            self._finish_body(req)

    # -- requests to the service --------------------------------------------------

    def _upstream_head(self, req: Request, host: bytes) -> bytes:
        named = set()
        for name, value in req.headers:
            if name.lower() == b"connection":
                named.update(t.strip().lower() for t in value.split(b","))
        lines = [req.method + b" " + req.url + b" HTTP/1.1"]
        xff = None
        for name, value in req.headers:
            lname = name.lower()
            if lname in HOP_BY_HOP or lname in named:
                continue
            if lname == b"x-forwarded-for":
                xff = value
                continue
            if lname in (b"x-forwarded-proto", b"forwarded", b"expect"):
                continue
            lines.append(name + b": " + value)
        client = self.client.encode()
        lines.append(b"X-Forwarded-For: " + (xff + b", " + client if xff else client))
        lines.append(b"X-Forwarded-Proto: https")
        fwd_for = b'"[' + client + b']"' if b":" in client else client
        lines.append(b"Forwarded: for=" + fwd_for + b";proto=https;host=" + host)
        if req.upgrade:
            lines.append(b"Connection: Upgrade")
            for name, value in req.headers:
                if name.lower() == b"upgrade":
                    lines.append(b"Upgrade: " + value)
        if req.chunked:
            lines.append(b"Transfer-Encoding: chunked")
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _start(self, req: Request) -> None:
        self.active = req
        self.resp_head = bytearray()
        self.resp_started = False
        self.resp_close = False
        for name, value in req.headers:
            if name.lower() == b"expect" and value.lower() == b"100-continue" and not req.complete:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.stream is not None and self.stream_endpoint != req.route.endpoint:
            self._drop_stream()
        if self.stream is None:
            # One stream (and one service connection behind the agent) per
            # client connection and endpoint, kept alive across requests.
            stream = self.open_stream(req.route.endpoint, self.client)
            if stream is None:
                self.error(503, f"no agent is connected for endpoint {req.route.endpoint!r}")
                return
            if stream is False:
                self.error(503, f"the agent for endpoint {req.route.endpoint!r} cannot take another stream now")
                return
            self.stream = stream
            self.stream_endpoint = req.route.endpoint
            stream.attach(_StreamSink(self, stream))
        if not self._send(req.upstream_head):
            return
        while req.body:
            piece = req.body.popleft()
            req.body_bytes -= len(piece)
            if not self._send_body(req, piece):
                return
        if req.complete:
            self._finish_body(req)
        self._resume_reading()
        self.timer = asyncio.get_running_loop().call_later(self.gateway_timeout, self._gateway_timeout)

    def _send_body(self, req: Request, body: bytes) -> bool:
        if req.chunked:
            return self._send(b"%x\r\n" % len(body) + body + b"\r\n")
        return self._send(body)

    def _finish_body(self, req: Request) -> None:
        if req.chunked:
            self._send(b"0\r\n\r\n")

    def _send(self, data: bytes) -> bool:
        """Queue bytes on the stream; excess waits for window (reading paused)."""
        if self.pending_body:
            self.pending_body.append(data)
            return True
        try:
            n = self.stream.send_nowait(data)
        except RelaydError:
            self._abort()
            return False
        if n < len(data):
            self.pending_body.append(data[n:])
            self._pause_reading()
        return True

    def _to_stream(self, data: bytes) -> None:
        if self.stream is not None:
            self._send(data)

    # -- stream sink: the response ------------------------------------------------

    def stream_data(self, data: bytes) -> None:
        if self.closed:
            self.stream.consumed(len(data))
            return
        if not self.resp_started and not self.raw:
            self.resp_head += data
            end = self.resp_head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.resp_head) > MAX_HEAD:
                    self.error(502, "the service sent an oversized response head")
                self.stream.consumed(len(data))
                return
            head, rest = bytes(self.resp_head[: end + 4]), bytes(self.resp_head[end + 4:])
            self.stream.consumed(len(data) - len(rest))
            self._cancel_timer()
            self.resp_started = True
            client_head, status = self._client_head(head)
            self.transport.write(client_head)
            if 100 <= status < 200 and status != 101:
                # Interim (100 Continue, 103): the final response follows.
                self.resp_started = False
                self.resp_head = bytearray()
                if rest:
                    self.stream_data(rest)
                return
            if not self.raw:
                # The parser only tracks where the response ends; bytes pass through.
                self.resp_done = _Done()
                self.resp_parser = httptools.HttpResponseParser(self.resp_done)
                try:
                    self.resp_parser.feed_data(head)
                except httptools.HttpParserError:
                    self.error(502, "the service sent a malformed response head")
                    return
                if self.active.head_only:
                    self.resp_done.done = True
            data = rest
            if data:
                self._pass_body(data)
            if self.resp_done.done and not self.raw:
                self._response_done()
            return
        self._pass_body(data)
        if self.resp_done.done and not self.raw:
            self._response_done()

    def _pass_body(self, data: bytes) -> None:
        if self.resp_parser is not None and not self.resp_done.done:
            try:
                self.resp_parser.feed_data(data)
            except httptools.HttpParserError:
                self.resp_close = True  # framing lost: finish this connection
        self.transport.write(data)
        if self.write_paused:
            self.deferred += len(data)
        else:
            self.stream.consumed(len(data))

    def _response_done(self) -> None:
        """The response ended by its own framing: the connection and the
        stream stay up for the next request."""
        self.active = None
        self.resp_parser = None
        self.resp_done = _Done()
        if self.resp_close:
            self._drop_stream()
            self.closed = True
            self.transport.close()
            return
        if self.queue:
            self._start(self.queue.popleft())
        else:
            self._arm_idle()

    def _drop_stream(self) -> None:
        st, self.stream = self.stream, None
        self.stream_endpoint = None
        if st is not None and not st.at_eof:
            st.write_eof()
        elif st is not None:
            st.write_eof()

    def _client_head(self, head: bytes) -> bytes:
        lines = head[:-4].split(b"\r\n")
        status_line = lines[0]
        parts = status_line.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        named = set()
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"connection":
                named.update(t.strip().lower() for t in value.split(b","))
        out = [b"HTTP/1.1 " + (parts[1] if len(parts) > 1 else b"502") + (b" " + parts[2] if len(parts) > 2 else b"")]
        framed = status in (204, 304) or 100 <= status < 200 or self.active.head_only
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                framed = True
            if lname == b"transfer-encoding" and value.strip().lower() == b"chunked":
                framed = True
                out.append(line)
                continue
            if status == 101 and lname in (b"upgrade", b"connection"):
                out.append(line)
                continue
            if lname in HOP_BY_HOP or lname in named:
                continue
            out.append(line)
        if status == 101:
            self.raw = True
        elif self.active.upgrade:
            self.resp_close = True  # upgrade refused: nothing more to parse here
            out.append(b"Connection: close")
        elif not framed:
            # Delimited by the close: the client must see it too.
            self.resp_close = True
            out.append(b"Connection: close")
        return b"\r\n".join(out) + b"\r\n\r\n", status

    def stream_window(self) -> None:
        while self.pending_body and not self.closed:
            data = self.pending_body.popleft()
            n = self.stream.send_nowait(data)
            if n < len(data):
                self.pending_body.appendleft(data[n:])
                return
        self._resume_reading()

    def stream_eof(self) -> None:
        # The service closed its connection.
        if self.active is None:
            self._drop_stream()  # idle keep-alive connection closed: fine
            return
        if not self.resp_started:
            self.error(502, "the service closed without a response")
            return
        raw = self.raw
        if not self.raw_in:
            self._drop_stream()
        else:
            self.stream = None
        if raw or self.resp_close:
            # Close-delimited response (or the end of an upgraded connection).
            self.closed = True
            self.transport.close()
            return
        # Framed but cut short: the client must not take it as complete.
        self._abort()

    def stream_reset(self) -> None:
        self.stream = None
        self.stream_endpoint = None
        if self.active is None:
            return
        if not self.resp_started:
            self.error(502, "the service behind the agent is unreachable")
        else:
            self._abort()

    # -- transport side --------------------------------------------------------------

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.deferred and self.stream is not None:
            n, self.deferred = self.deferred, 0
            self.stream.consumed(n)

    def eof(self) -> None:
        if self.raw and self.stream is not None:
            self.stream.write_eof()

    def lost(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self.stream is not None and not (self.resp_started and self.stream.at_eof):
            self.stream.reset()

    # -- helpers ---------------------------------------------------------------------

    def error(self, status: int, text: str) -> None:
        if self.closed:
            return
        metrics.HTTP_RESPONSES.labels(str(status)).inc()
        log.info("http %d", status, extra={"client": self.client, "reason": text[:120]})
        if not self.resp_started:
            body = (text + "\n").encode("utf-8", "replace")
            self.transport.write(
                f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        if self.stream is not None:
            self.stream.reset()
            self.stream = None
        self.closed = True
        self._cancel_timer()
        self.transport.close()

    def _abort(self) -> None:
        self.closed = True
        self._cancel_timer()
        self.transport.abort()

    def _gateway_timeout(self) -> None:
        self.timer = None
        if not self.resp_started:
            self.error(504, f"no response from the service within {self.gateway_timeout:g}s")

    def _arm_idle(self) -> None:
        self._cancel_timer()
        self.timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._idle)

    def _idle(self) -> None:
        self.timer = None
        if self.active is None and not self.closed:
            self.closed = True
            self._drop_stream()
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.closed and not self.pending_body:
            q = sum(r.body_bytes for r in self.queue)
            if q <= MAX_QUEUED_BODY:
                self.reading_paused = False
                self.transport.resume_reading()


class _Done:
    """Response-parser callbacks: only the end of the message matters."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


class _StreamSink:
    """Routes a stream's events to the connection while it is the current
    stream; a stream left behind (endpoint change) drains quietly."""

    __slots__ = ("conn", "stream")

    def __init__(self, conn: "HttpConnection", stream) -> None:
        self.conn = conn
        self.stream = stream

    def _current(self) -> bool:
        return self.conn.stream is self.stream

    def stream_data(self, data: bytes) -> None:
        if self._current():
            self.conn.stream_data(data)
        else:
            self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        if self._current():
            self.conn.stream_eof()

    def stream_reset(self) -> None:
        if self._current():
            self.conn.stream_reset()

    def stream_window(self) -> None:
        if self._current():
            self.conn.stream_window()


class _Refuse(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def open_stream_for(relay):
    """The relay's stream opener for HTTP endpoints (None: no agent)."""

    def open_stream(endpoint: str, client: str):
        sess = relay._pick(endpoint)
        if sess is None:
            metrics.STREAMS_FAILED.labels(endpoint, "no_agent").inc()
            return None
        try:
            st = sess.conn.open_stream_nowait()
        except RelaydError as exc:
            log.warning("cannot open a stream: %s", exc, extra={"endpoint": endpoint, "agent": sess.agent_id})
            metrics.STREAMS_FAILED.labels(endpoint, type(exc).__name__).inc()
            return False
        relay._trace_seq += 1
        st.send_nowait(encode_message({"e": endpoint, "t": f"{relay._trace_prefix}{relay._trace_seq:x}", "c": client}))
        metrics.STREAMS_OPENED.labels(endpoint, sess.agent_id).inc()
        return st

    return open_stream
