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
  (and so one service connection behind the agent). Where each response ends
  is found by counting its Content-Length, or by a response parser over a
  chunked body; nothing of the body is buffered or re-framed.
* Bodies stream: a request head is gathered whole and parsed alone; a
  Content-Length body after it is counted and goes on the stream as it
  arrives, never through the parser; only a chunked body is framed by the
  parser (and re-chunked). Nothing is read whole into memory; when the
  stream's window is full, reading from the client pauses.
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
import re
from dataclasses import dataclass

import cython
import httptools

from relayd import metrics
from relayd.core import http1
from relayd.core.http1 import find_request_head
from relayd.errors import ConfigError, RelaydError
from relayd.log import RateLimitedLog, caught
from relayd.net import abort_with_reset

log = logging.getLogger("relayd.http")
# Lines any client or service can cause at will: rate-limited (the metrics
# count every case).
_LOG = RateLimitedLog(log)


HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
              b"upgrade", b"proxy-authenticate", b"proxy-authorization"}
REASONS = http1.REASONS


@dataclass(frozen=True)
class Route:
    """Where requests for ``host`` (``*``: any host) under ``prefix`` go: an
    HTTP endpoint's agents, or with ``local`` one of the relay's own
    services. ``local(head, transport, rest)`` gets the whole request head
    (a relayd.core.http1.RequestHead), the transport, and the bytes after
    the head; it answers and closes, or takes the transport over (an
    upgrade)."""

    endpoint: str
    host: str
    prefix: str = "/"
    local: object = None


def parse_route(name: str, text: str) -> Route:
    """``HOSTNAME[/PREFIX]``; the prefix is kept without a trailing slash
    (``app/api/`` and ``app/api`` are the same route)."""
    host, slash, prefix = text.partition("/")
    prefix = prefix.strip("/")
    if prefix == ".relayd" or prefix.startswith(".relayd/"):
        raise ConfigError(f"HTTP endpoint {name}: the path /.relayd is the relay's own (its agent link)")
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
    ``/apiX``). ``path`` must already be normalised (see _clean_path)."""
    best = None
    for r in routes:
        p = r.prefix
        if (r.host == host or r.host == "*") and (p == "/" or path == p or path.startswith(p + "/")):
            if best is None or len(p) > len(best.prefix):
                best = r
    return best


class Request:
    __slots__ = ("method", "url", "headers", "head_bytes", "chunked", "upgrade", "head_only", "body",
                 "body_bytes", "complete", "upstream_head", "route", "retried", "has_body",
                 "expect_continue", "keep_alive", "last_upstream", "local_head")

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list = []
        self.head_bytes = 0
        self.chunked = False
        self.upgrade = False
        self.head_only = False  # HEAD: the response has no body whatever it says
        self.body: collections.deque = collections.deque()  # pieces waiting for the stream
        self.body_bytes = 0
        self.complete = False
        self.upstream_head = b""
        self.route: Route | None = None
        self.retried = False  # sent again once on a fresh stream (see _retry)
        self.has_body = False
        self.expect_continue = False
        self.keep_alive = True
        self.last_upstream = False  # the service connection closes after this exchange
        self.local_head = None  # for the relay's own services: the head (relayd.core.http1.RequestHead)


class HttpConnection:
    """The HTTP/1.1 side of one client connection on the HTTPS port."""

    def __init__(self, port, transport, routes, open_stream, gateway_timeout: float,
                 limits: http1.HttpLimits = http1.LIMITS) -> None:
        self.port = port  # the HttpsPort protocol (owns the transport callbacks)
        self.transport = transport
        self.routes = routes if isinstance(routes, RouteTable) else RouteTable(routes)
        self.last_gen = 0
        self.served_heads = False  # a whole request head has been seen on this connection
        # open_stream(endpoint, client, ready) -> Opening | None: the gateway's
        # stream seam; it answers ready(stream, None) or ready(None, reason),
        # at once or (held for an agent) later.
        self.open_stream = open_stream
        self.opening = None  # the seam's Opening while a stream is held for an agent
        self.gateway_timeout = gateway_timeout
        # The limits (relayd.core.http1.HttpLimits), read per request from
        # C fields, not from the config object.
        self.max_head = limits.max_head
        self.max_headers = limits.max_headers
        self.max_queued_body = limits.max_queued_body
        self.max_queued_requests = limits.max_queued_requests
        self.idle_timeout = limits.idle_timeout
        self.max_chunk_line = limits.max_chunk_line
        self.parser = httptools.HttpRequestParser(self)
        self.cur: Request | None = None  # being parsed
        self.inbuf = b""  # a request head not yet whole
        self.mid_message = False  # the parser is inside a message (its head or a chunked body)
        self.body_left = 0  # bytes of a Content-Length request body still to come
        self.head_alone = False  # the parser is being fed one whole head and nothing else
        self.queue: collections.deque[Request] = collections.deque()
        self.active: Request | None = None
        self.stream = None
        self.stream_endpoint = None
        self.served = 0  # responses the current stream has carried
        self.resp_chunked = None  # chunked responses: finds the end (a ChunkedEnd)
        self.resp_left = -1  # Content-Length responses: body bytes still to come
        self.resp_head = b""
        self.resp_started = False
        self.resp_close = False
        self.upstream_close = False  # the service closes its connection after this response
        self.raw = False  # after a 101: the response side is raw bytes
        self.raw_in = False  # after an upgrade request: client bytes go raw (once raw)
        self.held: collections.deque = collections.deque()  # ... and wait until then
        self.held_bytes = 0
        self.closed = False
        self.write_paused = False
        self.deferred = 0
        self.reading_paused = False
        self.pending_body: collections.deque = collections.deque()
        # One deadline at a time (waiting for a response, or idle between
        # requests), checked by a per-loop sweep: nothing to arm or cancel
        # per request.
        self.deadline = 0.0
        self.deadline_kind = _IDLE
        loop = asyncio.get_running_loop()
        self.loop_time = loop.time
        _Sweep.add(loop, self)
        client = transport.get_extra_info("peername")
        self.client = client[0] if client else "?"
        self.client_b = self.client.encode()
        fwd_for = b'"[' + self.client_b + b']"' if b":" in self.client_b else self.client_b
        self.fwd_head = b"X-Forwarded-Proto: https\r\nForwarded: for=" + fwd_for + b";proto=https;host="
        self.last_host = self.last_path = self.last_route = self.last_clean = None  # the last routing decision

    # -- input from the client ----------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.raw_in:
            self._upgraded_bytes(data)
            return
        fed = after = b""  # what the parser was given, and what came after it
        try:
            while data and not self.closed:
                if self.body_left:
                    # A Content-Length body: counted and spliced, not parsed.
                    n = self.body_left
                    if len(data) <= n:
                        self.body_left = n - len(data)
                        self.on_body(data)
                        if not self.body_left:
                            self._body_counted()
                        return
                    self.body_left = 0
                    self.on_body(data[:n])
                    self._body_counted()
                    data = data[n:]
                    continue
                if self.mid_message:
                    # A chunked body (or what follows it in the same read):
                    # the parser frames it.
                    fed, after = data, b""
                    self.parser.feed_data(data)
                    return
                # A request head: gather it whole, then parse it alone, so
                # that the body after it never goes through the parser.
                if self.inbuf:
                    data = self.inbuf + data
                    self.inbuf = b""
                try:
                    end = find_request_head(data, self.max_head)
                except http1.HeadError as exc:
                    raise _Refuse(exc.status, str(exc)) from None
                if end < 0:
                    self.inbuf = data
                    return
                fed, data = data[:end], data[end:]
                after = data
                self.head_alone = True
                try:
                    self.parser.feed_data(fed)
                finally:
                    self.head_alone = False
        except httptools.HttpParserUpgrade as exc:
            # The upgrade request is complete; what follows belongs to the
            # new protocol and is held until the service accepts (101).
            rest = fed[int(exc.args[0]):] + after if exc.args else after
            self._upgrade_requested(rest)
        except _Refuse as exc:
            self.error(exc.status, exc.text)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refuse):
                self.error(cause.status, cause.text)
            else:
                caught("http_request", cause or exc, client=self.client)
                self.error(400, "bad request")
        except httptools.HttpParserError as exc:
            metrics.BAD_INPUT.labels("https", "bad_request").inc()
            self.error(400, f"bad request: {exc}")
        except Exception as exc:  # a bug: the error of this exchange only
            caught("http_request", exc, client=self.client)
            self.error(400, "bad request")

    def _upgrade_requested(self, rest: bytes) -> None:
        req = self.cur
        self.raw_in = True
        if req is None or req is not self.active:
            self.error(400, "an upgrade request cannot be pipelined")
            return
        if req.local_head is not None:
            self._hand_over(req, rest)
            return
        if rest:
            self._upgraded_bytes(rest)

    def _upgraded_bytes(self, data: bytes) -> None:
        """Client bytes after an upgrade request: raw to the service once it
        has switched protocols (101), held until then (a bounded amount;
        reading pauses beyond), dropped if it refuses."""
        if self.raw:
            self._to_stream(data)
            return
        if self.closed:
            return
        self.held.append(data)
        self.held_bytes += len(data)
        if self.held_bytes > self.max_queued_body:
            self._pause_reading()

    def _body_counted(self) -> None:
        """The counted body is all in: the request is complete. The parser
        saw the head only and still waits for that body, so a fresh one takes
        the next request."""
        self.mid_message = False
        self.parser = httptools.HttpRequestParser(self)
        self.on_message_complete()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.cur = Request()
        self.mid_message = True

    def on_url(self, url: bytes) -> None:
        req = self.cur
        req.url += url
        req.head_bytes += len(url)
        if req.head_bytes > self.max_head:
            raise _Refuse(431, "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.cur
        headers = req.headers
        headers.append((name, value))
        req.head_bytes += len(name) + len(value) + 4
        if req.head_bytes > self.max_head:
            raise _Refuse(431, "request head too large")
        if len(headers) > self.max_headers:
            raise _Refuse(431, f"more than {self.max_headers} header fields")

    def on_headers_complete(self) -> None:
        if not self.served_heads:
            self.served_heads = True
            if self.port is not None:
                self.port.first_head()  # its timeout and admission ticket end here
        req = self.cur
        parser = self.parser
        method = req.method = parser.get_method()
        if method == b"CONNECT":
            # A reverse proxy has no business tunnelling to where a client
            # names: nothing after this head may reach an agent.
            raise _Refuse(405, "CONNECT is not served here")
        req.upgrade = parser.should_upgrade()
        req.head_only = method == b"HEAD"
        # One pass: what routing and framing need, and the lines that go on.
        host = b""
        te = None
        length = None
        named = None
        xff = None
        upgrade = None
        url = req.url
        lines = [b""]  # the request line, once the version is known
        for name, value in req.headers:
            special = _REQ_SPECIAL.get(name.lower())
            if special is None:
                lines.append(name + b": " + value)
            elif special == 1:  # host
                if host and value != host:
                    raise _Refuse(400, "several Host headers")
                host = value
                lines.append(name + b": " + value)
            elif special == 2:  # transfer-encoding
                if te is not None or value.strip().lower() != b"chunked":
                    raise _Refuse(400, "only Transfer-Encoding: chunked is accepted")
                te = value
            elif special == 3:  # connection
                named = (named or set()) | {t.strip().lower() for t in value.split(b",")}
            elif special == 4:
                xff = value
            elif special == 5:
                upgrade = value
            elif special == 6:  # expect
                req.expect_continue = value.lower() == b"100-continue"
            elif special == 7:  # content-length (llhttp has checked it: digits, one value)
                if len(value.lstrip(b"0")) > 18:
                    raise _Refuse(400, "Content-Length too large")
                length = value
                lines.append(name + b": " + value)
            # else: hop-by-hop, or a forwarding header the relay writes itself
        if not host:
            raise _Refuse(400, "Host header required")
        # The service is asked in the client's HTTP version, so that an
        # HTTP/1.0 client never gets a chunked body it cannot read. A 1.0
        # request is kept alive only with a keep-alive token, so the costly
        # version string is needed only then or when the client closes.
        keep_alive = req.keep_alive = parser.should_keep_alive()
        http10 = (not keep_alive or (named is not None and b"keep-alive" in named)) \
            and parser.get_http_version() == "1.0"
        req.chunked = te is not None
        if url[:1] != b"/":
            url = _origin_form(url, host, method)
        q = url.find(b"?")
        path = url if q < 0 else url[:q]
        table = self.routes
        if host == self.last_host and path == self.last_path and self.last_gen == table.generation:
            req.route = self.last_route
            clean = self.last_clean
        else:
            text = host.decode("latin-1").lower()
            hostname = text.split("]")[0] + "]" if text.startswith("[") else text.rsplit(":", 1)[0]
            clean = _clean_path(path)
            route = pick_route(table.routes, hostname, "/" if clean == b"*" else clean.decode("latin-1"))
            if route is None:
                raise _Refuse(404, f"no endpoint for host {hostname[:100]!r} and this path")
            req.route = self.last_route = route
            self.last_gen = table.generation
            self.last_host, self.last_path, self.last_clean = host, path, clean
        if clean != path:
            url = clean if q < 0 else clean + url[q:]
        if req.route.local is not None:
            # One of the relay's own services: it gets the head as parsed here.
            req.local_head = http1.RequestHead(method, url, parser.get_http_version().encode(), req.headers)
        lines[0] = method + b" " + url + (b" HTTP/1.0" if http10 else b" HTTP/1.1")
        # Asked in HTTP/1.0, a service closes after its answer: never send
        # another request after it on that connection.
        req.last_upstream = http10
        if named:
            # Connection names further fields to drop (rare), but never the
            # ones that frame the body or route the request: dropping
            # Content-Length while the body still flows would make the body
            # a second request at the service.
            named -= _NEVER_NAMED
            lines[1:] = [line for line in lines[1:] if line.partition(b":")[0].lower() not in named]
        client = self.client_b
        lines.append(b"X-Forwarded-For: " + (xff + b", " + client if xff else client))
        lines.append(self.fwd_head + host)
        if req.upgrade:
            lines.append(b"Connection: Upgrade")
            if upgrade is not None:
                lines.append(b"Upgrade: " + upgrade)
        if te is not None:
            lines.append(b"Transfer-Encoding: chunked")
        lines.append(b"\r\n")
        req.upstream_head = b"\r\n".join(lines)
        if length is not None and te is None and self.head_alone and not req.upgrade:
            self.body_left = int(length)  # feed() counts it
        if self.active is None:
            self.deadline = 0.0  # no longer idle (a request in flight keeps its gateway deadline)
            self._start(req)
        else:
            if len(self.queue) >= self.max_queued_requests:
                raise _Refuse(400, "too many pipelined requests")
            self.queue.append(req)

    def on_body(self, body: bytes) -> None:
        req = self.cur
        req.has_body = True
        if req is self.active and self.stream is not None and not req.body:
            self._send_body(req, body)
        else:
            req.body.append(body)
            req.body_bytes += len(body)
            if req.body_bytes > self.max_queued_body:
                self._pause_reading()

    def on_message_complete(self) -> None:
        self.mid_message = False
        req = self.cur
        req.complete = True
        if req is self.active:
            if req.local_head is not None:
                if not req.upgrade:
                    self._hand_over(req, b"")
            elif self.stream is not None and not req.body:
                self._finish_body(req)

    # -- requests to the service --------------------------------------------------

    def _start(self, req: Request) -> None:
        self.active = req
        self.resp_head = b""
        self.resp_started = False
        self.resp_close = False
        if req.expect_continue and not req.complete:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.stream is not None and self.stream_endpoint != req.route.endpoint:
            self._drop_stream()
        self.deadline = self.loop_time() + self.gateway_timeout
        self.deadline_kind = _GATEWAY
        if req.local_head is not None:
            if req.complete and not req.upgrade:
                self._hand_over(req, b"")  # it waited behind the exchanges before it
            return
        if self.stream is None:
            # One stream (and one service connection behind the agent) per
            # client connection and endpoint, kept alive across requests.
            # _stream_ready goes on: now, or once an agent arrives.
            self.opening = self.open_stream(req.route.endpoint, self.client, self._stream_ready)
            return
        self._send_request(req)

    def _stream_ready(self, stream, reason) -> None:
        """The stream seam's answer for the active request."""
        self.opening = None
        req = self.active
        if self.closed or req is None:
            if stream is not None:
                stream.reset()
            return
        if stream is None:
            self.error(503, f"no agent can take a stream for endpoint {req.route.endpoint!r} ({reason})")
            return
        self.stream = stream
        self.stream_endpoint = req.route.endpoint
        stream.attach(self)  # the stream's events come straight here
        self._send_request(req)

    def _send_request(self, req: Request) -> None:
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

    def _release_held(self) -> None:
        """The service switched protocols: the client's bytes held since the
        upgrade request go on, in order."""
        held, self.held = self.held, collections.deque()
        self.held_bytes = 0
        for piece in held:
            self._to_stream(piece)
        self._resume_reading()

    def _to_stream(self, data: bytes) -> None:
        if self.stream is not None:
            self._send(data)

    # -- stream sink: the response ------------------------------------------------

    def stream_data(self, data: bytes) -> None:
        try:
            self._response_bytes(data)
        except Exception as exc:  # a bug: the error of this exchange only
            caught("http_response", exc, client=self.client)
            if self.resp_started:
                self._drop_stream()
                self._abort()
            else:
                self.error(502, "the service's response could not be handled")

    def _response_bytes(self, data: bytes) -> None:
        if self.closed:
            self.stream.consumed(len(data))
            return
        if self.resp_started:
            self._pass_body(data)
            return
        if self.active is None:
            # Bytes with no request outstanding: this service connection's
            # framing cannot be trusted any more.
            self.stream.consumed(len(data))
            metrics.BAD_INPUT.labels("http_service", "unsolicited").inc()
            _LOG.info("service sent %d bytes with no request outstanding", len(data), extra={"client": self.client})
            self._drop_stream()
            return
        # The response head: usually whole in the first piece.
        if self.resp_head:
            self.resp_head += data
            buf = self.resp_head
        else:
            buf = data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if buf is data:
                self.resp_head = bytearray(data)
            if len(self.resp_head) > self.max_head:
                self.error(502, "the service sent an oversized response head")
                return
            self.stream.consumed(len(data))
            return
        head, rest = bytes(buf[: end + 4]), bytes(buf[end + 4:])
        self.resp_head = b""
        head_part = len(data) - len(rest)  # credit for it goes back with the body's
        active = self.active
        plain = active.keep_alive and not active.upgrade and not active.head_only
        hit = _HEAD_CACHE.get(head) if plain else None
        if hit is not None:
            # The same head as a recent response (services repeat theirs
            # byte for byte within a second): the rewrite is a pure function
            # of the bytes, so reuse it.
            status, client_head, self.resp_left, self.resp_close, self.upstream_close = hit
            self.resp_chunked = None
        else:
            try:
                status, client_head = self._client_head(head)
            except _Refuse as exc:
                metrics.BAD_INPUT.labels("http_service", "bad_response_head").inc()
                self.error(exc.status, exc.text)
                return
            if plain and status >= 200 and self.resp_chunked is None and len(head) <= 2048:
                if len(_HEAD_CACHE) >= 256:
                    _HEAD_CACHE.clear()
                _HEAD_CACHE[head] = (status, client_head, self.resp_left, self.resp_close, self.upstream_close)
        if 100 <= status < 200 and status != 101:
            # Interim (100 Continue, 103): the final response follows.
            self.stream.consumed(head_part)
            self.transport.write(client_head)
            if rest:
                self._response_bytes(rest)
            return
        if active.last_upstream:
            self.upstream_close = True
        if not active.complete and not self.resp_close and status != 101:
            # An early answer (401, 413...) while the request body still
            # comes: where that body ends on the service connection is
            # unknown, so neither that connection nor this one carries
            # another request (the rest of the body could be read as one).
            self.resp_close = True
            client_head = client_head[:len(client_head) - 2] + b"Connection: close\r\n\r\n"
        self.resp_started = True
        self.deadline = 0.0
        if self.raw and self.held:
            self._release_held()
        if rest:
            self._pass_body(rest, client_head, head_part)
            return
        self.stream.consumed(head_part)
        self.transport.write(client_head)
        if self.resp_left == 0:
            self._response_done()

    def _pass_body(self, data: bytes, head: bytes = b"", credit: int = 0) -> None:
        """Response bytes to the client as they come; ``head`` (the rewritten
        response head) goes out in the same write."""
        n = len(data)
        done = False
        left = self.resp_left
        if left >= 0:
            # Content-Length: count, do not parse.
            if n >= left:
                done = True
                if n > left:
                    # More than the service announced: framing is lost, the
                    # excess is dropped and this connection ends here.
                    metrics.BAD_INPUT.labels("http_service", "past_content_length").inc()
                    _LOG.info("service sent %d bytes past its Content-Length", n - left,
                             extra={"client": self.client})
                    self.resp_close = True
                    data = data[:left]
            self.resp_left = left - len(data)
        elif self.resp_chunked is not None:
            # Chunked: find the end by its framing; the bytes pass unchanged.
            end = self.resp_chunked.feed(data)
            if end == -2:
                metrics.BAD_INPUT.labels("http_service", "bad_chunked_response").inc()
                _LOG.info("service sent a malformed chunked body", extra={"client": self.client})
                self._drop_stream()
                self._abort()
                return
            if end >= 0:
                done = True
                if end < n:
                    # A forged "next response" (or anything) after the last
                    # chunk: it is not the client's, and the connection's
                    # framing cannot be trusted any more.
                    metrics.BAD_INPUT.labels("http_service", "past_chunked_end").inc()
                    _LOG.info("service sent %d bytes after its chunked body", n - end,
                              extra={"client": self.client})
                    self.resp_close = True
                    data = data[:end]
        self.transport.write(head + data if head else data)
        if self.write_paused:
            self.deferred += n + credit
        else:
            self.stream.consumed(n + credit)
        if done:
            self._response_done()

    def _response_done(self) -> None:
        """The response ended by its own framing: the connection and the
        stream stay up for the next request."""
        self.active = None
        self.resp_chunked = None
        self.resp_left = -1
        self.resp_started = False
        self.served += 1
        if self.resp_close:
            self._drop_stream()
            self.closed = True
            self.transport.close()
            return
        if self.upstream_close:
            self._drop_stream()  # the next request goes on a fresh one
        if self.queue:
            self._start(self.queue.popleft())
        else:
            self.deadline = self.loop_time() + self.idle_timeout
            self.deadline_kind = _IDLE

    def _drop_stream(self) -> None:
        st, self.stream = self.stream, None
        self.stream_endpoint = None
        self.served = 0
        self.upstream_close = False
        if st is not None:
            if self.deferred:
                # Credit held back for bytes this stream delivered goes back
                # to it, not to whichever stream comes next.
                n, self.deferred = self.deferred, 0
                st.consumed(n)
            st.attach(_Drain(st))  # whatever still comes on it is dropped
            st.write_eof()

    def _hand_over(self, req: Request, rest: bytes) -> None:
        """The connection goes to one of the relay's own services, with the
        bytes after the request's head; this object is done with it."""
        self.closed = True
        self.deadline = 0.0
        self._cancel_opening()
        _Sweep.discard(self)
        self._drop_stream()
        if self.port is not None:
            self.port.detach()
        req.route.local(req.local_head, self.transport, rest)

    def _client_head(self, head: bytes) -> tuple[int, bytes]:
        """The response head for the client, and how the body is delimited
        (``resp_left``, ``resp_chunked``, ``raw``, ``resp_close``)."""
        # One C-speed check of the whole head's syntax (RFC 9112: status
        # line, token ":" value, CRLF only, no obs-fold, no NUL or bare CR/LF).
        if _RESP_HEAD.match(head) is None:
            raise _Refuse(502, "the service sent a malformed response head")
        status = int(head[9:12])
        lines = head[:len(head) - 4].split(b"\r\n")
        out = [b"HTTP/1.1" + lines[0][8:]]
        named = None
        chunked = False
        length = None
        upgrade_lines = []
        for line in lines[1:]:
            if line[0] | 0x20 not in _RESP_FIRST:  # cannot be a field the relay handles
                out.append(line)
                continue
            name, _, value = line.partition(b":")
            lname = name.lower()
            if lname == b"content-length":
                value = value.strip()
                if length is not None and value != length:
                    raise _Refuse(502, "the service sent conflicting Content-Length fields")
                length = value
                out.append(line)
            elif lname not in HOP_BY_HOP:
                out.append(line)
            elif lname == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                named = tokens if named is None else named | tokens
                if status == 101:
                    upgrade_lines.append(line)
            elif lname == b"transfer-encoding":
                if value.strip().lower() != b"chunked" or chunked:
                    raise _Refuse(502, "the service sent a Transfer-Encoding other than chunked")
                chunked = True
                out.append(line)
            elif lname == b"upgrade" and status == 101:
                upgrade_lines.append(line)
        # The service says it closes after this response: Connection: close,
        # or an HTTP/1.0 response without keep-alive (RFC 9112 9.3).
        tokens = named or _NO_TOKENS
        self.upstream_close = b"close" in tokens or (lines[0][5:8] == b"1.0" and b"keep-alive" not in tokens)
        if named and not named <= _PLAIN_CONNECTION:
            # Connection names further fields to drop (rare): filter by name.
            named.discard(b"content-length")
            named.discard(b"transfer-encoding")
            out = out[:1] + [line for line in out[1:] if line.partition(b":")[0].lower() not in named]
        out += upgrade_lines
        self.resp_left = -1
        self.resp_chunked = None
        active = self.active
        if 100 <= status < 200 and status != 101:
            out.append(b"\r\n")
            return status, b"\r\n".join(out)
        if status == 101:
            self.raw = True
        elif active.upgrade:
            self.resp_close = True  # upgrade refused: nothing more to parse here
            out.append(b"Connection: close")
        if status == 101:
            pass
        elif status == 204 or status == 304 or active.head_only:
            self.resp_left = 0
        elif chunked:
            # Chunked with a Content-Length as well is how responses get
            # smuggled (RFC 9112 6.3 says treat it as an error).
            if length is not None:
                raise _Refuse(502, "the service sent both Content-Length and Transfer-Encoding")
            self.resp_chunked = ChunkedEnd(self.max_chunk_line, self.max_head)
        elif length is not None:
            if not length.isdigit() or len(length) > 18:
                raise _Refuse(502, "the service sent a bad Content-Length")
            self.resp_left = int(length)
        else:
            # Delimited by the close: the client must see it too.
            self.resp_close = True
            if not active.upgrade:
                out.append(b"Connection: close")
        if not active.keep_alive and not self.resp_close and status != 101:
            # The client asked to close after this response (Connection:
            # close, or HTTP/1.0 without keep-alive): say so, then do it.
            self.resp_close = True
            out.append(b"Connection: close")
        out.append(b"\r\n")
        return status, b"\r\n".join(out)

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
            if self._retry():
                return
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

    def _retry(self) -> bool:
        """A kept-alive service connection closed just as a request went out
        on it (the service's idle timeout racing the request): send a request
        that is safe to repeat once more on a fresh stream, as browsers and
        reverse proxies do (RFC 9110 9.2.2). Not after a first response
        byte, not for a body already streamed, not twice."""
        req = self.active
        if (self.served == 0 or req.retried or self.resp_head or req.upgrade or req.chunked
                or req.method not in _IDEMPOTENT or not req.complete or req.has_body):
            return False
        req.retried = True
        metrics.HTTP_RETRIES.inc()
        _LOG.info("service connection closed under a request; sending it again on a fresh one",
                 extra={"client": self.client, "endpoint": req.route.endpoint})
        st, self.stream = self.stream, None
        self.stream_endpoint = None
        self.served = 0
        self.pending_body.clear()
        if st is not None:
            st.reset()
        self.active = None
        self._start(req)
        return True

    def stream_reset(self) -> None:
        if self.active is None:
            return
        if not self.resp_started:
            if self._retry():
                return
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
        self.deadline = 0.0
        self._cancel_opening()
        _Sweep.discard(self)
        if self.stream is not None and not (self.resp_started and self.stream.at_eof):
            self.stream.reset()

    # -- helpers ---------------------------------------------------------------------

    def error(self, status: int, text: str) -> None:
        if self.closed:
            return
        metrics.HTTP_RESPONSES.labels(str(status)).inc()
        _LOG.info("http %d", status, extra={"client": self.client, "reason": text[:120]})
        if not self.resp_started:
            body = (text + "\n").encode("utf-8", "replace")
            self.transport.write(
                f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        if self.stream is not None:
            self.stream.reset()
            self.stream = None
        self.closed = True
        self.deadline = 0.0
        self._cancel_opening()
        self.transport.close()

    def _abort(self) -> None:
        """An abnormal end: the client gets a reset, never a clean close that
        could pass for a complete response."""
        self.closed = True
        self.deadline = 0.0
        self._cancel_opening()
        abort_with_reset(self.transport)

    def _cancel_opening(self) -> None:
        op, self.opening = self.opening, None
        if op is not None:
            op.cancel()

    def expire(self) -> None:
        """The sweep found the deadline passed."""
        self.deadline = 0.0
        if self.closed:
            return
        if self.deadline_kind is _GATEWAY:
            if self.active is not None and not self.resp_started:
                self.error(504, f"no response from the service within {self.gateway_timeout:g}s")
        elif self.active is None:
            self.closed = True
            self._drop_stream()
            self.transport.close()

    def _pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.closed and not self.pending_body:
            q = sum(r.body_bytes for r in self.queue)
            if q <= self.max_queued_body:
                self.reading_paused = False
                self.transport.resume_reading()


# Request header fields the relay looks at (or drops) rather than passing on.
_REQ_SPECIAL = {b"host": 1, b"transfer-encoding": 2, b"connection": 3, b"x-forwarded-for": 4, b"upgrade": 5,
                b"expect": 6, b"content-length": 7, b"x-forwarded-proto": 0, b"forwarded": 0, **{h: 0 for h in HOP_BY_HOP
                if h not in (b"transfer-encoding", b"connection", b"upgrade")}}
# Response head -> (status, rewritten head, Content-Length, close-delimited),
# for plain (not HEAD, not upgrade, not chunked) responses; bounded.
_HEAD_CACHE: dict = {}
_NEVER_NAMED = frozenset({b"content-length", b"transfer-encoding", b"host"})
_ENCODED_DOT = re.compile(rb"%2[eE]")


def _origin_form(url: bytes, host: bytes, method: bytes) -> bytes:
    """The origin-form of a request target that is not one already.

    Absolute-form (``http://host/path``) is what a client sends to a proxy;
    routing uses ``Host``, so a target naming another host is refused and
    one naming the same host is forwarded as its path and query, which is
    all a service expects. ``*`` is kept for ``OPTIONS``."""
    if url == b"*" and method == b"OPTIONS":
        return url
    scheme_end = url.find(b"://")
    if scheme_end < 0 or url[:scheme_end].lower() not in (b"http", b"https"):
        raise _Refuse(400, "the request target must be a path or an http(s) URL")
    rest = url[scheme_end + 3:]
    cut = len(rest)
    for sep in (b"/", b"?", b"#"):
        k = rest.find(sep)
        if 0 <= k < cut:
            cut = k
    authority, target = rest[:cut], rest[cut:]
    if b"@" in authority:
        raise _Refuse(400, "user information in the request target")
    if authority.lower() != host.lower():
        raise _Refuse(400, "the request target names another host than the Host header")
    return target if target[:1] == b"/" else b"/" + target


def _clean_path(path: bytes) -> bytes:
    """The path routing sees and the service gets (``path`` itself when
    there is nothing to change; see docs/security.md, "Paths").

    * ``%2F`` and ``%5C`` (encoded slash and backslash), a raw backslash and
      a leading ``//``: refused. A service that decodes them would see more
      segments than the relay routed on (``/api/..%2Fadmin``).
    * ``%2E`` is a dot (RFC 3986 6.2.2.2), then dot segments are removed
      (RFC 3986 5.2.4): ``/api/../admin`` is routed, and forwarded, as
      ``/admin``. Climbing above the root, and a dot segment followed by a
      ``;`` parameter (``/..;/``, which some servers take as ``..``), are
      refused.
    """
    if b"%" in path:
        low = path.lower()
        if b"%2f" in low or b"%5c" in low:
            raise _Refuse(400, "encoded slash or backslash in the path")
        if b"%2e" in low:
            path = _ENCODED_DOT.sub(b".", path)
    if b"\\" in path:
        raise _Refuse(400, "backslash in the path")
    if path[:2] == b"//":
        raise _Refuse(400, "the path starts with //")
    if b"/." not in path:
        return path
    out = []
    segments = path.split(b"/")
    for seg in segments[1:]:
        if seg[:1] == b"." and seg.split(b";", 1)[0] in (b".", b".."):
            if seg not in (b".", b".."):
                raise _Refuse(400, "a dot segment with parameters in the path")
            if seg == b"..":
                if not out:
                    raise _Refuse(400, "the path climbs above the root")
                out.pop()
        else:
            out.append(seg)
    clean = b"/" + b"/".join(out)
    if segments[len(segments) - 1] in (b".", b"..") and out:
        clean += b"/"
    return clean


_IDLE = "idle"
_GATEWAY = "gateway"
_IDEMPOTENT = {b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"}
_RESP_HEAD = http1.RESPONSE_HEAD
# First letters (lower case) of the response fields the relay acts on.
_RESP_FIRST = frozenset(b"cktpu")
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade"})
_NO_TOKENS: frozenset = frozenset()


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
        sw = getattr(conn, "_sweep", None)
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


# ChunkedEnd states
_CH_SIZE = 0  # hex digits of a chunk size
_CH_EXT = 1  # a chunk extension, up to CR
_CH_SIZE_LF = 2  # the LF of a size line
_CH_DATA = 3  # chunk data: ``left`` bytes to go
_CH_DATA_CR = 4
_CH_DATA_LF = 5
_CH_TRAILER = 6  # the start of a trailer line, or of the final CRLF
_CH_FIELD = 7  # inside a trailer field line
_CH_FIELD_LF = 8
_CH_END_LF = 9
_CH_DONE = 10


class ChunkedEnd:
    """Where a chunked body ends (RFC 9112 7.1), to the byte, without
    copying or changing it: chunk data is skipped by counting, only size
    lines and trailers are looked at. Strict, as the request parser is: hex
    sizes of at most 15 digits, CRLF line ends only, no NUL, no obs-fold in
    trailers, lines bounded. Knowing the exact end is what lets the relay
    drop whatever a service sends after it instead of passing it on as a
    next response."""

    def __init__(self, max_line: int = 4096, max_trailers: int = 32 * 1024) -> None:
        self.max_line = max_line  # a size line
        self.max_trailers = max_trailers  # the whole trailer section
        self.state = _CH_SIZE
        self.left = 0
        self.digits = 0
        self.line = 0
        self.colon = False

    def feed(self, data: bytes) -> int:
        """-1: the body goes on past ``data``; -2: it is malformed; else the
        offset in ``data`` just after the body's last byte."""
        i: cython.Py_ssize_t = 0
        n: cython.Py_ssize_t = len(data)
        take: cython.Py_ssize_t
        c: cython.int
        state: cython.int = self.state
        while i < n:
            if state == _CH_DATA:
                take = n - i
                if take > self.left:
                    take = self.left
                i += take
                self.left -= take
                if self.left == 0:
                    state = _CH_DATA_CR
                continue
            c = data[i]
            i += 1
            if state == _CH_SIZE:
                if 48 <= c <= 57 or 97 <= (c | 0x20) <= 102:
                    if self.digits == 15:
                        return -2
                    self.left = self.left * 16 + (c - 48 if c <= 57 else (c | 0x20) - 87)
                    self.digits += 1
                elif self.digits == 0:
                    return -2
                elif c == 59:  # ';'
                    state = _CH_EXT
                elif c == 13:
                    state = _CH_SIZE_LF
                else:
                    return -2
            elif state == _CH_EXT:
                if c == 13:
                    state = _CH_SIZE_LF
                elif c == 10 or c == 0:
                    return -2
                else:
                    self.line += 1
                    if self.line > self.max_line:
                        return -2
            elif state == _CH_SIZE_LF:
                if c != 10:
                    return -2
                self.digits = 0
                self.line = 0
                state = _CH_DATA if self.left else _CH_TRAILER
            elif state == _CH_DATA_CR:
                if c != 13:
                    return -2
                state = _CH_DATA_LF
            elif state == _CH_DATA_LF:
                if c != 10:
                    return -2
                state = _CH_SIZE
            elif state == _CH_TRAILER:
                if c == 13:
                    state = _CH_END_LF
                elif c == 10 or c == 0 or c == 32 or c == 9 or c == 58:
                    return -2  # bare LF, NUL, obs-fold, empty field name
                else:
                    self.colon = False
                    state = _CH_FIELD
            elif state == _CH_FIELD:
                if c == 13:
                    if not self.colon:
                        return -2
                    state = _CH_FIELD_LF
                elif c == 10 or c == 0:
                    return -2
                else:
                    if c == 58:
                        self.colon = True
                    self.line += 1
                    if self.line > self.max_trailers:
                        return -2
            elif state == _CH_FIELD_LF:
                if c != 10:
                    return -2
                state = _CH_TRAILER
            elif state == _CH_END_LF:
                if c != 10:
                    return -2
                self.state = _CH_DONE
                return i
            else:  # _CH_DONE: nothing belongs to the body any more
                return i - 1
        self.state = state
        return -1


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


class _Refuse(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
