"""HTTP/1.1 ingress on the relay's HTTPS port: the uvloop adapter.

Each request on a client connection is routed by ``Host`` and the longest
matching path prefix to an endpoint (``--http NAME=HOSTNAME[/PREFIX]``) or
to one of the relay's own services (a local route), and carried on a yamux
stream of its own to an agent serving that endpoint; the agent dials the
service and splices, as for TCP endpoints.

The framing (where each request and response ends, keep-alive, pipelining,
chunked bodies, 1xx, HEAD, upgrades, the head rewrite) is
relayd.core.h1proxy's ``Framing``, a sans-I/O machine compiled and pure.
This adapter moves the bytes it says to move, routes each request that
becomes the one in flight, opens streams through the gateway's stream seam,
owns the deadlines (one sweep per event loop, nothing armed per request)
and applies back-pressure: reading from the client pauses while a stream's
window is full or more than ``max_queued_body`` bytes wait in the machine;
window credit goes back to a stream only as the client's transport drains,
so a slow client holds one window at most.

Errors answer with a short body: 400 bad request, 404 no route, 431 head
too large, 503 no agent, 502 service unreachable, 504 no response in time.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass

from relayd import metrics
from relayd.core import h1proxy, http1
from relayd.errors import ConfigError, RelaydError
from relayd.log import RateLimitedLog, caught
from relayd.net import abort_with_reset

log = logging.getLogger("relayd.http")
# Lines any client or service can cause at will: rate-limited (the metrics
# count every case).
_LOG = RateLimitedLog(log)

COMPILED = h1proxy.COMPILED


@dataclass(frozen=True)
class Route:
    """Where requests for ``host`` (``*``: any host) under ``prefix`` go: an
    HTTP endpoint's agents, or one of the relay's own services:

    * ``serve``: a service that answers on the kept-alive connection (the
      next request is routed on its own, as ever). ``serve(head, exchange)``
      gets the request head (a relayd.core.http1.RequestHead) and a
      LocalExchange, and returns a LocalService, which gets the body as it
      comes (de-chunked) and writes its response through the exchange as it
      goes. ``buffered(fn)`` makes one of ``await fn(head, body, exchange) -> Reply``.
    * ``local``: a service that takes the connection over (an upgrade):
      ``local(head, transport, rest)`` gets the head, the transport and the
      bytes after the head.
    * ``gate``: a way in that decides each request itself and then proxies
      it to an agent like an endpoint (the device proxy,
      relayd.gateway.deviceproxy). ``gate.claims(path)``: whether the route
      takes this path at all (the others under its prefix go to the next
      best route); ``gate.admit(req, client, answer)`` checks the request
      (at once or later; it returns an object with ``cancel()`` while it
      works, else None) and calls ``answer`` once with a refusal (a
      relayd.core.http1.Reply, written with Connection: close) or with
      ``(key, head, open)``: the stream key (a kept-alive stream is reused
      by the next request with the same key), the head the service gets
      instead of the framing's, and ``open(ready)``, the stream seam's open
      for this request. ``gate.error(status, text)`` is the Reply of the
      adapter's own errors (502, 503, 504) for its requests.
    """

    endpoint: str
    host: str
    prefix: str = "/"
    local: object = None
    serve: object = None
    gate: object = None


def parse_route(name: str, text: str) -> Route:
    """``HOSTNAME[/PREFIX]``; the prefix is kept without a trailing slash
    (``app/api/`` and ``app/api`` are the same route)."""
    host, slash, prefix = text.partition("/")
    prefix = prefix.strip("/")
    for own in (".relayd", "_relayd"):
        if prefix == own or prefix.startswith(own + "/"):
            raise ConfigError(f"HTTP endpoint {name}: the path /{own} is the relay's own (its agent link, "
                              "its zero-trust API)")
    return Route(name, host.lower(), "/" + prefix if prefix else "/")


class RouteTable:
    """The HTTPS port's routes, shared by its connections and replaced whole
    on reload; ``generation`` tells a connection that its cached routing
    decision is stale."""

    def __init__(self, routes) -> None:
        self.routes = list(routes)
        self.generation = 0

    def replace(self, routes) -> None:
        self.routes = list(routes)
        self.generation += 1


def pick_route(routes: list[Route], host: str, path: str) -> Route | None:
    """The route of ``host`` whose prefix is the longest run of whole path
    segments of ``path`` (``/api`` takes ``/api`` and ``/api/x``, never
    ``/apiX``). ``path`` must already be normalised (relayd.core.h1proxy
    does it)."""
    best = None
    for r in routes:
        p = r.prefix
        if (r.host == host or r.host == "*") and (p == "/" or path == p or path.startswith(p + "/")):
            if (best is None or len(p) > len(best.prefix)) and (r.gate is None or r.gate.claims(path)):
                best = r
    return best


_IDLE = "idle"
_GATEWAY = "gateway"
EV_START = h1proxy.EV_START
EV_UPSTREAM = h1proxy.EV_UPSTREAM
EV_COMPLETE = h1proxy.EV_COMPLETE
EV_CLIENT = h1proxy.EV_CLIENT
EV_DONE = h1proxy.EV_DONE
EV_DROP = h1proxy.EV_DROP
EV_CLOSE = h1proxy.EV_CLOSE
EV_ABORT = h1proxy.EV_ABORT
EV_FAIL = h1proxy.EV_FAIL
EV_NOTE = h1proxy.EV_NOTE
EV_RETRY = h1proxy.EV_RETRY


class HttpConnection:
    """The HTTP/1.1 side of one client connection on the HTTPS port.

    ``framing`` is the Framing class to use (the active build's by default;
    the differential tests pass each build's)."""

    def __init__(self, port, transport, routes, open_stream, gateway_timeout: float,
                 limits: http1.HttpLimits = http1.LIMITS, framing=None) -> None:
        self.port = port  # the HttpsPort protocol (owns the transport callbacks)
        self.transport = transport
        self.routes = routes if isinstance(routes, RouteTable) else RouteTable(routes)
        # open_stream(endpoint, client, ready) -> Opening | None: the gateway's
        # stream seam; it answers ready(stream, None) or ready(None, reason),
        # at once or (held for an agent) later.
        self.open_stream = open_stream
        self.opening = None  # the seam's Opening while a stream is held for an agent
        self.gateway_timeout = gateway_timeout
        self.idle_timeout = limits.idle_timeout
        self.max_queued_body = limits.max_queued_body
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else "?"
        self.framing = (framing or h1proxy.Framing)(self.client.encode(), limits)
        self.stream = None
        self.stream_endpoint = None
        self.pending: collections.deque = collections.deque()  # bytes waiting for stream window
        self.closed = False
        self.served_heads = False  # the port was told of the first whole head
        self.write_paused = False
        self.deferred = 0  # credit held back while the client's transport is full
        self.reading_paused = False
        self.local = None  # the LocalExchange of a streaming local service in flight
        self.gated = None  # (request, head, open) of a gate route's admitted request in flight
        self.last_host = self.last_path = self.last_route = None  # the last routing decision
        self.last_gen = -1
        # One deadline at a time (waiting for a response, or idle between
        # requests), checked by a per-loop sweep.
        self.deadline = 0.0
        self.deadline_kind = _IDLE
        loop = asyncio.get_running_loop()
        self.loop_time = loop.time
        self._sweep = None
        _Sweep.add(loop, self)

    # -- the client's bytes ------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.framing.receive_client(data)
        except Exception as exc:  # a bug: the error of this exchange only
            caught("http_request", exc, client=self.client)
            self.error(400, "bad request")
            return
        self._run(events)
        if self.local is not None:
            self._local_body()
        if self.framing.queued_bytes > self.max_queued_body:
            self._pause_reading()

    def eof(self) -> None:
        if self.framing.raw and self.stream is not None:
            self.stream.write_eof()

    # -- what the framing says -----------------------------------------------------------

    def _run(self, events: list) -> None:
        for code, value in events:
            if self.closed:
                return
            if code == EV_CLIENT:
                self.transport.write(value)
                if self.deadline_kind is _GATEWAY and self.framing.resp_started:
                    self.deadline = 0.0
            elif code == EV_UPSTREAM:
                if self.stream is not None:
                    self._send(value)
            elif code == EV_START:
                self._start(value)
            elif code == EV_DONE:
                self.local = None
                self.deadline = self.loop_time() + self.idle_timeout
                self.deadline_kind = _IDLE
            elif code == EV_COMPLETE:
                route = value.route
                if route is not None:
                    if route.serve is not None:
                        self._local_body()
                    elif route.local is not None:
                        self._hand_over(value)
            elif code == EV_DROP:
                self._drop_stream()
            elif code == EV_CLOSE:
                self.closed = True
                self.deadline = 0.0
                self._drop_stream()
                self.transport.close()
            elif code == EV_ABORT:
                self._drop_stream()
                self._abort()
            elif code == EV_FAIL:
                status, text, kind = value
                if kind == "bad_request":
                    metrics.BAD_INPUT.labels("https", kind).inc()
                elif not kind.startswith("service_"):
                    metrics.BAD_INPUT.labels("http_service", kind).inc()
                self.error(status, text)
            elif code == EV_NOTE:
                kind, text = value
                metrics.BAD_INPUT.labels("http_service", kind).inc()
                _LOG.info(text, extra={"client": self.client})
            elif code == EV_RETRY:
                self._retry(value)
        self._resume_reading()

    def _start(self, req) -> None:
        """``req`` is the request in flight now: route it, then send it."""
        if not self.served_heads:
            self.served_heads = True
            if self.port is not None:
                self.port.first_head()  # its timeout and admission ticket end here
        route = req.route = self._route(req)
        if route is None:
            return
        self.deadline = self.loop_time() + self.gateway_timeout
        self.deadline_kind = _GATEWAY
        if route.serve is not None:
            self._serve(req)
            return
        if route.local is not None:
            if req.complete:
                self._hand_over(req)
            return
        if route.gate is not None:
            self._gate(req)
            return
        if req.expect_continue and not req.complete:
            self.transport.write(h1proxy.CONTINUE)
        if self.stream is not None and self.stream_endpoint != route.endpoint:
            self._drop_stream()
        if self.stream is None:
            # One stream (and one service connection behind the agent) per
            # client connection and endpoint, kept alive across requests.
            # _stream_ready goes on: now, or once an agent arrives.
            self.opening = self.open_stream(route.endpoint, self.client, self._stream_ready)
            return
        self._send(self.framing.request_bytes(False))

    def _gate(self, req) -> None:
        """A gate route's request: admitted (then sent as an endpoint's
        would be, on a stream the gate opens) or refused."""
        self.gated = None
        state = [False]

        def answer(verdict) -> None:
            state[0] = True
            self.opening = None
            if self.closed or self.framing.active is not req:
                return
            if isinstance(verdict, http1.Reply):
                self.refuse(verdict)
                return
            key, head, opener = verdict
            self.gated = (req, head, opener, key)
            if req.expect_continue and not req.complete:
                self.transport.write(h1proxy.CONTINUE)
            if self.stream is not None and self.stream_endpoint != key:
                self._drop_stream()
            if self.stream is None:
                self.opening = opener(self._stream_ready)
                return
            self._send(self._request_bytes(False))

        try:
            handle = req.route.gate.admit(req, self.client, answer)
        except Exception as exc:  # a bug: the error of this exchange only
            caught("http_gate", exc, client=self.client)
            self.error(500, "the relay failed")
            return
        if not state[0]:
            self.opening = handle

    def _request_bytes(self, fresh: bool) -> bytes:
        """The request in flight for its stream: the framing's bytes, with
        a gate's head in place of the framing's."""
        data = self.framing.request_bytes(fresh)
        g = self.gated
        req = self.framing.active
        if g is not None and g[0] is req and data.startswith(req.upstream_head):
            data = g[1] + data[len(req.upstream_head):]
        return data

    def _stream_key(self, req) -> str:
        g = self.gated
        return g[3] if g is not None and g[0] is req else req.route.endpoint

    def _route(self, req):
        table = self.routes
        host, path = req.host, req.path
        if host == self.last_host and path == self.last_path and self.last_gen == table.generation:
            return self.last_route
        text = host.decode("latin-1").lower()
        hostname = text.split("]")[0] + "]" if text.startswith("[") else text.rsplit(":", 1)[0]
        route = pick_route(table.routes, hostname, path.decode("latin-1"))
        if route is None:
            self.error(404, f"no endpoint for host {hostname[:100]!r} and this path")
            return None
        self.last_route, self.last_gen, self.last_host, self.last_path = route, table.generation, host, path
        return route

    def _stream_ready(self, stream, reason) -> None:
        """The stream seam's answer for the request in flight."""
        self.opening = None
        req = self.framing.active
        if self.closed or req is None:
            if stream is not None:
                stream.reset()
            return
        if stream is None:
            self.error(503, f"no agent can take a stream for endpoint {req.route.endpoint!r} ({reason})")
            return
        self.stream = stream
        self.stream_endpoint = self._stream_key(req)
        stream.attach(self)  # the stream's events come straight here
        self._send(self._request_bytes(True))
        self._resume_reading()

    def _retry(self, req) -> None:
        """The framing sends a request again on a fresh stream (see
        relayd.core.h1proxy ``Framing._retry``)."""
        metrics.HTTP_RETRIES.inc()
        _LOG.info("service connection closed under a request; sending it again on a fresh one",
                  extra={"client": self.client, "endpoint": req.route.endpoint})
        st, self.stream = self.stream, None
        self.stream_endpoint = None
        self.pending.clear()
        if st is not None:
            st.reset()
        g = self.gated
        if g is not None and g[0] is req:
            self.opening = g[2](self._stream_ready)
            return
        self.opening = self.open_stream(req.route.endpoint, self.client, self._stream_ready)

    def _send(self, data: bytes) -> None:
        """Queue bytes on the stream; excess waits for window (reading paused)."""
        if self.pending:
            self.pending.append(data)
            return
        try:
            n = self.stream.send_nowait(data)
        except RelaydError:
            self._drop_stream()
            self._abort()
            return
        if n < len(data):
            self.pending.append(data[n:])
            self._pause_reading()

    def _serve(self, req) -> None:
        """A streaming local service takes ``req`` (see Route.serve)."""
        ex = self.local = LocalExchange(self, req)
        try:
            ex.service = req.route.serve(http1.RequestHead(req.method, req.url, req.version, req.headers), ex)
        except Exception as exc:  # a bug: the error of this exchange only
            caught("http_local", exc, client=self.client, endpoint=req.route.endpoint)
            self.local = None
            self.error(500, "the relay's service failed")
            return
        self._local_body()

    def _local_body(self) -> None:
        """The request body that came, to the local service, then its end."""
        ex = self.local
        fr = self.framing
        if ex is None or ex.service is None or fr.active is not ex.req or self.closed:
            return
        try:
            piece = fr.take_body()
            if piece:
                ex.service.body(piece)
            if ex.req.complete and not ex.ended and self.local is ex:
                ex.ended = True
                ex.service.end()
        except Exception as exc:  # a bug: the error of this exchange only
            caught("http_local", exc, client=self.client, endpoint=ex.req.route.endpoint)
            ex.fail()

    def _local_lost(self) -> None:
        ex, self.local = self.local, None
        if ex is not None and ex.service is not None:
            try:
                ex.service.lost()
            except Exception as exc:
                caught("http_local", exc, client=self.client)

    def _hand_over(self, req) -> None:
        """The connection goes to one of the relay's own services, with the
        bytes after the request's head; this object is done with it."""
        self.closed = True
        self.deadline = 0.0
        self._cancel_opening()
        _Sweep.discard(self)
        self._drop_stream()
        if self.port is not None:
            self.port.detach()
        rest = self.framing.take_held()
        self.framing.close()
        req.route.local(http1.RequestHead(req.method, req.url, req.version, req.headers), self.transport, rest)

    # -- stream sink: the response -------------------------------------------------------

    def stream_data(self, data: bytes) -> None:
        st = self.stream
        n = len(data)
        if self.closed:
            st.consumed(n)
            return
        try:
            events = self.framing.receive_service(data)
        except Exception as exc:  # a bug: the error of this exchange only
            caught("http_response", exc, client=self.client)
            if self.framing.resp_started:
                self._drop_stream()
                self._abort()
            else:
                self.error(502, "the service's response could not be handled")
            st.consumed(n)
            return
        self._run(events)
        if self.stream is st and self.write_paused and not self.closed:
            self.deferred += n
        else:
            st.consumed(n)

    def stream_window(self) -> None:
        while self.pending and not self.closed:
            data = self.pending.popleft()
            n = self.stream.send_nowait(data)
            if n < len(data):
                self.pending.appendleft(data[n:])
                return
        self._resume_reading()

    def stream_eof(self) -> None:
        """The service closed its connection."""
        st = self.stream
        self._run(self.framing.service_closed(False))
        if self.stream is st and st is not None and not self.closed:
            self._drop_stream()

    def stream_reset(self) -> None:
        st = self.stream
        self._run(self.framing.service_closed(True))
        if self.stream is st and st is not None and not self.closed:
            self.stream = None  # nothing more goes on it
            self.stream_endpoint = None
            self.pending.clear()

    # -- transport side --------------------------------------------------------------------

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.deferred and self.stream is not None:
            n, self.deferred = self.deferred, 0
            self.stream.consumed(n)

    def lost(self) -> None:
        self.closed = True
        self.deadline = 0.0
        self._cancel_opening()
        self._local_lost()
        _Sweep.discard(self)
        st = self.stream
        if st is not None and not (self.framing.resp_started and st.at_eof):
            st.reset()
        self.framing.close()

    # -- helpers -----------------------------------------------------------------------------

    def error(self, status: int, text: str) -> None:
        if self.closed:
            return
        metrics.HTTP_RESPONSES.labels(str(status)).inc()
        _LOG.info("http %d", status, extra={"client": self.client, "reason": text[:120]})
        if not self.framing.resp_started:
            active = self.framing.active
            gate = active.route.gate if active is not None and active.route is not None else None
            if gate is not None:
                r = gate.error(status, text)
                self.transport.write(http1.response(r.status, r.body, r.content_type, headers=list(r.headers)))
            else:
                self.transport.write(http1.response(status, (text + "\n").encode("utf-8", "replace")))
        self._shut()

    def refuse(self, r: http1.Reply) -> None:
        """A whole answer of the relay's own instead of the service's (a
        gate's refusal); the connection closes after it, since the request's
        body may still be coming."""
        if self.closed:
            return
        if not self.framing.resp_started:
            data = http1.response(r.status, r.body, r.content_type, headers=list(r.headers))
            if self.framing.active is not None and self.framing.active.head_only:
                data = data[:len(data) - len(r.body)]
            self.transport.write(data)
        self._shut()

    def _shut(self) -> None:
        if self.stream is not None:
            self.stream.reset()
            self.stream = None
        self.pending.clear()
        self.closed = True
        self.deadline = 0.0
        self._cancel_opening()
        self._local_lost()
        self.framing.close()
        self.transport.close()

    def _abort(self) -> None:
        """An abnormal end: the client gets a reset, never a clean close that
        could pass for a complete response."""
        self.closed = True
        self.deadline = 0.0
        self._cancel_opening()
        self.framing.close()
        abort_with_reset(self.transport)

    def _cancel_opening(self) -> None:
        op, self.opening = self.opening, None
        if op is not None:
            op.cancel()

    def _drop_stream(self) -> None:
        st, self.stream = self.stream, None
        self.stream_endpoint = None
        self.pending.clear()
        if st is not None:
            if self.deferred:
                # Credit held back for bytes this stream delivered goes back
                # to it, not to whichever stream comes next.
                n, self.deferred = self.deferred, 0
                st.consumed(n)
            st.attach(_Drain(st))  # whatever still comes on it is dropped
            st.write_eof()

    def expire(self) -> None:
        """The sweep found the deadline passed."""
        self.deadline = 0.0
        if self.closed:
            return
        fr = self.framing
        if self.deadline_kind is _GATEWAY:
            # (an agent's service, or the relay's own: its task is cancelled)
            if fr.active is not None and not fr.resp_started:
                self.error(504, f"no response from the service within {self.gateway_timeout:g}s")
        elif fr.active is None:
            self.closed = True
            self._drop_stream()
            fr.close()
            self.transport.close()

    def _pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if (self.reading_paused and not self.closed and not self.pending
                and self.framing.queued_bytes <= self.max_queued_body):
            self.reading_paused = False
            self.transport.resume_reading()


class LocalService:
    """What a streaming local service (Route.serve) does with its request;
    the defaults do nothing."""

    def body(self, piece: bytes) -> None:
        """A piece of the request body (de-chunked), as it came."""

    def end(self) -> None:
        """The request body is complete (at once for a request without one)."""

    def lost(self) -> None:
        """The client is gone or the exchange was cut (504, an error)."""


class LocalExchange:
    """A streaming local service's side of one request: it writes the
    response (HTTP/1.1 bytes, framed by Content-Length or chunked; the
    front door reads them as it reads an agent's service, so keep-alive,
    HEAD and the client's Connection: close hold), and may hold back the
    request body."""

    __slots__ = ("conn", "req", "service", "ended")

    def __init__(self, conn: HttpConnection, req) -> None:
        self.conn = conn
        self.req = req
        self.service = None
        self.ended = False

    @property
    def live(self) -> bool:
        """The client still waits for this response."""
        return not self.conn.closed and self.conn.framing.active is self.req

    @property
    def client(self) -> tuple[str, int]:
        peer = self.conn.transport.get_extra_info("peername")
        return (peer[0], peer[1]) if peer else ("?", 0)

    def respond(self, data: bytes) -> None:
        if self.live and data:
            self.conn._run(self.conn.framing.receive_service(data))

    def fail(self) -> None:
        """The service broke: 502 before its response began, a reset after."""
        if self.live:
            self.conn._run(self.conn.framing.service_closed(True))

    def finish(self) -> None:
        """The end of a response delimited by its end (no Content-Length,
        not chunked: for an HTTP/1.0 client); the connection closes."""
        if self.live:
            self.conn._run(self.conn.framing.service_closed(False))

    def set_deadline(self, seconds: float) -> None:
        """The answer may take this long (instead of gateway_timeout)."""
        if self.live:
            self.conn.deadline = self.conn.loop_time() + seconds

    def pause_body(self) -> None:
        self.conn._pause_reading()

    def resume_body(self) -> None:
        self.conn._resume_reading()

    @property
    def writable(self) -> bool:
        """The client's transport takes more without buffering."""
        return not self.conn.write_paused


def buffered(fn, max_body: int = http1.LIMITS.max_queued_body, too_large=None):
    """A Route.serve for a service that takes the whole body and answers
    once: ``await fn(head, body, exchange)`` returns a relayd.core.http1.Reply
    (the exchange tells who asks: its client, its TLS peer). A body
    over ``max_body`` gets 413 (``too_large(head, exchange)`` makes that
    Reply when given: an API's own error shape, counted its own way); a
    service that raises, 500 (counted, logged by code location only)."""

    def serve(head, ex):
        return _Buffered(fn, head, ex, max_body, too_large)

    return serve


class _Buffered(LocalService):
    def __init__(self, fn, head, ex: LocalExchange, max_body: int, too_large) -> None:
        self.fn, self.head, self.ex, self.max_body = fn, head, ex, max_body
        self.too_large = too_large
        self.parts: list | None = []
        self.size = 0
        self.task = None

    def body(self, piece: bytes) -> None:
        if self.parts is None:
            return
        self.size += len(piece)
        if self.size > self.max_body:
            self.parts = None
            self._reply(self.too_large(self.head, self.ex) if self.too_large is not None
                        else http1.Reply(413, b"request body too large for this service\n"))
        else:
            self.parts.append(piece)

    def end(self) -> None:
        if self.parts is not None:
            self.task = asyncio.ensure_future(self.fn(self.head, b"".join(self.parts), self.ex))
            self.task.add_done_callback(self._done)

    def lost(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def _done(self, task) -> None:
        if task.cancelled() or not self.ex.live:
            return
        exc = task.exception()
        if exc is not None:
            caught("http_local", exc, client=self.ex.conn.client)
            self._reply(http1.Reply(500, b"the relay's service failed\n"))
            return
        self._reply(task.result())

    def _reply(self, r) -> None:
        data = http1.response(r.status, r.body, r.content_type, close=False, headers=list(r.headers))
        if self.head.method == b"HEAD" and r.body:
            data = data[:len(data) - len(r.body)]
        self.ex.respond(data)


class _Sweep:
    """Checks the HTTP connections' deadlines of one event loop a few times a
    second, so that requests never arm or cancel timers of their own."""

    TICK = 0.25
    _by_loop: dict = {}

    def __init__(self, loop) -> None:
        self.loop = loop
        self.conns: set = set()
        self.handle = None

    @classmethod
    def add(cls, loop, conn) -> None:
        sw = cls._by_loop.get(loop)
        if sw is None:
            sw = cls._by_loop[loop] = cls(loop)
        conn._sweep = sw
        sw.conns.add(conn)
        if sw.handle is None:
            sw.handle = loop.call_later(cls.TICK, sw.run)

    @classmethod
    def discard(cls, conn) -> None:
        sw = conn._sweep
        if sw is not None:
            sw.conns.discard(conn)

    def run(self) -> None:
        self.handle = None
        if not self.conns:
            self._by_loop.pop(self.loop, None)
            return
        now = self.loop.time()
        for c in [c for c in self.conns if c.deadline and c.deadline <= now]:
            try:
                c.expire()
            except Exception:  # one connection's failure must not stop the sweep
                log.exception("http deadline handling failed")
        self.handle = self.loop.call_later(self.TICK, self.run)


class _Drain:
    """The sink of a stream the connection has let go of (endpoint change,
    service closed): what still arrives is consumed and dropped."""

    __slots__ = ("stream",)

    def __init__(self, stream) -> None:
        self.stream = stream

    def stream_data(self, data: bytes) -> None:
        self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        pass

    def stream_reset(self) -> None:
        pass

    def stream_window(self) -> None:
        pass
