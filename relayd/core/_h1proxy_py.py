"""HTTP/1.1 framing of the relay's HTTPS ingress, sans-I/O: bytes in, events out.

One ``Framing`` per client connection stands between the client and the
service behind an agent. It reads the client's requests and the service's
responses, decides where each message ends, and says what goes where; the
adapter (relayd.net.http_ingress) only moves the bytes, owns the timers,
applies back-pressure and opens the streams. The same source is compiled
(``_h1proxy_c``, contract in ``_ext/relayd/core/_h1proxy_c.pxd``) and runs
as it is (the pure twin); tests/core/test_h1proxy_differential.py feeds both
the same streams.

Theory of operation
-------------------
* Two sides, each an explicit state with a transition table (``CLIENT_TABLE``,
  ``SERVICE_TABLE``), the way h11 models a connection. A move the table does
  not have is a bug of this module (``FramingBug``), never a client's fault.

  client side (requests read)::

      HEAD --head, no body--> HEAD     --head + Content-Length--> LENGTH
      HEAD --head, chunked--> CHUNKED  --head, Upgrade--> UPGRADE
      LENGTH, CHUNKED --body end--> HEAD;  any --refused--> CLOSED

  service side (responses read)::

      IDLE --request starts--> HEAD --1xx--> HEAD
      HEAD --head--> LENGTH | CHUNKED | CLOSE (until EOF) | RAW (101) | IDLE (no body)
      LENGTH, CHUNKED --body end--> IDLE;  any --failed--> CLOSED

* Request heads are gathered whole and read by one regular expression
  (relayd.core.http1's grammar: RFC 9112, strict), then rewritten for the
  service: hop-by-hop fields out (RFC 9110 7.6.1, including those named in
  Connection), ``X-Forwarded-For``, ``X-Forwarded-Proto`` and ``Forwarded``
  in, the target normalised (``_clean_path``). A Content-Length body is
  counted, never parsed; a chunked body is de-chunked and chunked again, so
  that extensions and trailers never reach the service.
* Keep-alive and pipelining: one request is in flight (``active``); those
  that arrive meanwhile wait in ``queue`` with their bodies (``backlog``
  bytes: the adapter pauses reading beyond its limit).
* Responses: the head is checked and rewritten (``_client_head``), then the
  body passes unchanged: counted (Content-Length), followed to its exact end
  (chunked, ``ChunkedEnd``), or until the service closes. Bytes past the end
  are dropped and the service connection is let go. 1xx heads go on and the
  final head follows; after a 101 both directions are raw.

Events: ``receive_client`` and ``receive_service`` return lists of
``(code, value)``; the codes are the ``EV_*`` names below.
"""

from __future__ import annotations

import collections
import re

import cython

from relayd.core import http1
from relayd.core.http1 import HeadError, find_request_head

# -- events (code, value) -------------------------------------------------------

#: A request became the one in flight (value: the Request). Route it, then
#: send ``request_bytes()`` on a stream (or hand it to a local service).
EV_START = 1
#: Bytes for the service of the request in flight (value: bytes).
EV_UPSTREAM = 2
#: The request in flight has all its body (value: the Request).
EV_COMPLETE = 3
#: Bytes for the client (value: bytes).
EV_CLIENT = 4
#: The response ended by its own framing (value: None).
EV_DONE = 5
#: The service connection carries no further request: let the stream go.
EV_DROP = 6
#: Close the client connection cleanly once written.
EV_CLOSE = 7
#: Reset the client connection: a response was cut short.
EV_ABORT = 8
#: Refuse (value: (status, text, metric kind)); nothing more is framed.
EV_FAIL = 9
#: Bad input that ends nothing by itself (value: (metric kind, text)).
EV_NOTE = 10
#: The service connection closed under a request that is safe to repeat:
#: send it again (``request_bytes()``) on a fresh stream.
EV_RETRY = 11

EVENT_NAMES = {EV_START: "start", EV_UPSTREAM: "upstream", EV_COMPLETE: "complete", EV_CLIENT: "client",
               EV_DONE: "done", EV_DROP: "drop", EV_CLOSE: "close", EV_ABORT: "abort", EV_FAIL: "fail",
               EV_NOTE: "note", EV_RETRY: "retry"}

# -- states and transition tables -------------------------------------------------

if not cython.compiled:  # compiled, they are the C enums of the contract
    C_HEAD = 0  # waiting for (or gathering) a request head
    C_LENGTH = 1  # a Content-Length body: ``body_left`` bytes to come
    C_CHUNKED = 2  # a chunked body
    C_UPGRADE = 3  # after an upgrade request: raw bytes, held until a 101
    C_CLOSED = 4  # refused or handed over: nothing more is read
    S_IDLE = 0  # no request in flight: bytes from the service are unsolicited
    S_HEAD = 1  # a request is in flight: its response head is awaited
    S_LENGTH = 2  # a Content-Length body
    S_CHUNKED = 3  # a chunked body
    S_CLOSE = 4  # a body delimited by the service closing
    S_RAW = 5  # after 101: raw bytes
    S_CLOSED = 6  # failed or over
CLIENT_STATES = ("head", "length", "chunked", "upgrade", "closed")

SERVICE_STATES = ("idle", "head", "length", "chunked", "close", "raw", "closed")

# client-side inputs
CI_HEAD = 0
CI_HEAD_LENGTH = 1
CI_HEAD_CHUNKED = 2
CI_HEAD_UPGRADE = 3
CI_BODY_END = 4
CI_FAIL = 5
# service-side inputs
SI_START = 0
SI_INTERIM = 1
SI_HEAD_EMPTY = 2
SI_HEAD_LENGTH = 3
SI_HEAD_CHUNKED = 4
SI_HEAD_CLOSE = 5
SI_HEAD_SWITCH = 6
SI_BODY_END = 7
SI_RETRY = 8
SI_FAIL = 9

_X = -1  # no such move

#: CLIENT_TABLE[state][input] -> next state.
CLIENT_TABLE = (
    # HEAD   LENGTH    CHUNKED    UPGRADE    BODY_END  FAIL
    (C_HEAD, C_LENGTH, C_CHUNKED, C_UPGRADE, _X, C_CLOSED),  # C_HEAD
    (_X, _X, _X, _X, C_HEAD, C_CLOSED),  # C_LENGTH
    (_X, _X, _X, _X, C_HEAD, C_CLOSED),  # C_CHUNKED
    (_X, _X, _X, _X, _X, C_CLOSED),  # C_UPGRADE
    (_X, _X, _X, _X, _X, C_CLOSED),  # C_CLOSED
)

#: SERVICE_TABLE[state][input] -> next state.
SERVICE_TABLE = (
    # START  INTERIM  EMPTY   LENGTH    CHUNKED    CLOSE    SWITCH  BODY_END RETRY   FAIL
    (S_HEAD, _X, _X, _X, _X, _X, _X, _X, _X, S_CLOSED),  # S_IDLE
    (_X, S_HEAD, S_IDLE, S_LENGTH, S_CHUNKED, S_CLOSE, S_RAW, _X, S_HEAD, S_CLOSED),  # S_HEAD
    (_X, _X, _X, _X, _X, _X, _X, S_IDLE, _X, S_CLOSED),  # S_LENGTH
    (_X, _X, _X, _X, _X, _X, _X, S_IDLE, _X, S_CLOSED),  # S_CHUNKED
    (_X, _X, _X, _X, _X, _X, _X, S_CLOSED, _X, S_CLOSED),  # S_CLOSE
    (_X, _X, _X, _X, _X, _X, _X, S_CLOSED, _X, S_CLOSED),  # S_RAW
    (_X, _X, _X, _X, _X, _X, _X, _X, _X, S_CLOSED),  # S_CLOSED
)


class FramingBug(Exception):
    """A move the transition tables do not have: a bug of this module."""


HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization"})
#: What a client gets before the body of an ``Expect: 100-continue`` request.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Request:
    """One request from the client, as read and as rewritten for the service."""

    def __init__(self) -> None:
        self.method = b""
        self.url = b""  # the target the service gets (normalised)
        self.version = b"1.1"
        self.headers: list = []  # (name, value) as received
        self.host = b""  # the Host field
        self.path = b""  # the normalised path routing sees (``/`` for ``*``)
        self.upstream_head = b""
        self.chunked = False
        self.upgrade = False
        self.head_only = False  # HEAD: the response has no body whatever it says
        self.keep_alive = True
        self.expect_continue = False
        self.last_upstream = False  # asked in HTTP/1.0: the service closes after it
        self.complete = False  # all of the body has been read
        self.has_body = False
        self.retried = False
        self.body: list = []  # upstream-framed pieces waiting for the stream
        self.body_bytes = 0
        self.route = None  # the adapter's routing decision


class Framing:
    """The framing of one client connection and the service behind it."""

    def __init__(self, client: bytes = b"?", limits: http1.HttpLimits = http1.LIMITS) -> None:
        self.max_head = limits.max_head
        self.max_headers = limits.max_headers
        self.max_queued_requests = limits.max_queued_requests
        self.max_chunk_line = limits.max_chunk_line
        self.client = client
        fwd_for = b'"[' + client + b']"' if b":" in client else client
        self.fwd_head = b"X-Forwarded-Proto: https\r\nForwarded: for=" + fwd_for + b";proto=https;host="
        self.cstate = C_HEAD
        self.sstate = S_IDLE
        self.events = []
        self.inbuf = b""  # a request head not yet whole
        self.body_left = 0  # Content-Length request body bytes still to come
        self.req_chunks = None  # the chunked request body's reader (ChunkedEnd)
        self.cur = None  # the request whose body is being read
        self.active = None  # the request in flight
        self.queue = collections.deque()
        self.queued_bytes = 0  # request bodies not yet sent and held upgrade bytes
        self.upstream = False  # the active request's head went to the service
        self.held = []  # client bytes after an upgrade request, until a 101
        self.resp_head = b""  # a response head not yet whole
        self.resp_left = -1  # Content-Length response body bytes still to come
        self.resp_chunked = None  # finds where a chunked response ends
        self.resp_started = False  # the client has the response head
        self.resp_close = False  # the client connection ends with this response
        self.upstream_close = False  # the service connection ends with this response
        self.served = 0  # responses the current service connection has carried

    # -- state ---------------------------------------------------------------------

    @property
    def client_state(self) -> str:
        return CLIENT_STATES[self.cstate]

    @property
    def service_state(self) -> str:
        return SERVICE_STATES[self.sstate]

    @property
    def raw(self) -> bool:
        """After a 101: both directions are raw bytes."""
        return self.sstate == S_RAW

    @property
    def closed(self) -> bool:
        return self.cstate == C_CLOSED

    def _client_move(self, what: cython.int) -> None:
        nxt = CLIENT_TABLE[self.cstate][what]
        if nxt < 0:
            raise FramingBug(f"client side: no move from {CLIENT_STATES[self.cstate]} on input {what}")
        self.cstate = nxt

    def _service_move(self, what: cython.int) -> None:
        nxt = SERVICE_TABLE[self.sstate][what]
        if nxt < 0:
            raise FramingBug(f"service side: no move from {SERVICE_STATES[self.sstate]} on input {what}")
        self.sstate = nxt

    def _fail(self, status: cython.int, text: str, kind: str) -> None:
        if self.cstate != C_CLOSED:
            self.cstate = C_CLOSED
            self.sstate = S_CLOSED
            self.events.append((EV_FAIL, (status, text, kind)))

    def close(self) -> None:
        """The adapter is done with the connection (refused, lost, handed
        over): nothing more is framed."""
        self.cstate = C_CLOSED
        self.sstate = S_CLOSED

    # -- the client's bytes ----------------------------------------------------------

    def receive_client(self, data: bytes) -> list:
        events = self.events = []
        try:
            self._client_bytes(data)
        except _Refuse as exc:
            self._fail(exc.status, exc.text, exc.kind)
        return events

    def _client_bytes(self, data: bytes) -> None:
        n: cython.Py_ssize_t
        end: cython.Py_ssize_t
        while data:
            state = self.cstate
            if state == C_LENGTH:
                # A Content-Length body: counted and passed on, not parsed.
                n = self.body_left
                if len(data) < n:
                    self.body_left = n - len(data)
                    self._body(data)
                    return
                self.body_left = 0
                if n:
                    self._body(data[:n] if len(data) > n else data)
                self._body_end()
                data = data[n:]
            elif state == C_CHUNKED:
                pieces: list = []
                end = self.req_chunks.feed(data, pieces)
                for piece in pieces:
                    self._body(piece)
                if end == -2:
                    raise _Refuse(400, "bad request: malformed chunked body", "bad_request")
                if end == -1:
                    return
                self.req_chunks = None
                self._body_end()
                data = data[end:]
            elif state == C_HEAD:
                if self.inbuf:
                    data = self.inbuf + data
                    self.inbuf = b""
                try:
                    end = find_request_head(data, self.max_head)
                except HeadError as exc:
                    raise _Refuse(exc.status, str(exc), "bad_request") from None
                if end < 0:
                    self.inbuf = data
                    return
                head = data[:end]
                data = data[end:]
                self._request(head)
            elif state == C_UPGRADE:
                if self.sstate == S_RAW:
                    self.events.append((EV_UPSTREAM, data))
                else:
                    self.held.append(data)
                    self.queued_bytes += len(data)
                return
            else:
                return

    def _body(self, piece: bytes) -> None:
        """A piece of the current request's body (de-chunked): to the service
        now if it can go (chunked again for it), else kept with the request."""
        req = self.cur
        req.has_body = True
        if req is self.active and self.upstream and not req.body:
            self.events.append((EV_UPSTREAM, b"%x\r\n" % len(piece) + piece + b"\r\n" if req.chunked else piece))
        else:
            req.body.append(piece)
            req.body_bytes += len(piece)
            self.queued_bytes += len(piece)

    def _body_end(self) -> None:
        self._client_move(CI_BODY_END)
        req = self.cur
        req.complete = True
        if req is self.active:
            if req.chunked and self.upstream and not req.body:
                self.events.append((EV_UPSTREAM, b"0\r\n\r\n"))  # else request_bytes() ends it
            self.events.append((EV_COMPLETE, req))

    def _request(self, head: bytes) -> None:
        """A whole request head: read, rewritten, started or queued."""
        req = self.cur = _read_request(self, head)
        if req.upgrade:
            self._client_move(CI_HEAD_UPGRADE)
            if self.active is not None:
                raise _Refuse(400, "an upgrade request cannot be pipelined", "bad_request")
            req.complete = True
        elif req.chunked:
            self._client_move(CI_HEAD_CHUNKED)
            self.req_chunks = ChunkedEnd(self.max_chunk_line, self.max_head)
        elif self.body_left:
            self._client_move(CI_HEAD_LENGTH)
        else:
            self._client_move(CI_HEAD)
            req.complete = True
        if self.active is None:
            self._start(req)
        elif len(self.queue) >= self.max_queued_requests:
            raise _Refuse(400, "too many pipelined requests", "bad_request")
        else:
            self.queue.append(req)

    def _start(self, req: Request) -> None:
        self.active = req
        self.upstream = False
        self.resp_head = b""
        self.resp_started = False
        self.resp_close = False
        self.resp_left = -1
        self.resp_chunked = None
        self._service_move(SI_START)
        self.events.append((EV_START, req))

    def request_bytes(self, fresh: cython.bint) -> bytes:
        """What goes on the stream for the request in flight now that one is
        there (``fresh``: a new stream, not one kept alive): its head, and as
        much of its body as has come. Later pieces come as EV_UPSTREAM
        events."""
        req = self.active
        self.upstream = True
        if fresh:
            self.served = 0
        if not req.chunked:
            if not req.body:
                return req.upstream_head
            out = b"".join([req.upstream_head] + req.body)
        else:
            parts = [req.upstream_head]
            for piece in req.body:
                parts.append(b"%x\r\n" % len(piece))
                parts.append(piece)
                parts.append(b"\r\n")
            if req.complete:
                parts.append(b"0\r\n\r\n")
            out = b"".join(parts)
        self.queued_bytes -= req.body_bytes
        req.body = []
        req.body_bytes = 0
        return out

    def take_body(self) -> bytes:
        """The body of the request in flight as it has come (de-chunked), for
        one of the relay's own services (its response comes through
        ``receive_service`` as a service's would)."""
        req = self.active
        out = b"".join(req.body)
        self.queued_bytes -= req.body_bytes
        req.body = []
        req.body_bytes = 0
        return out

    def take_held(self) -> bytes:
        """The client's bytes after an upgrade request (for a local service
        that takes the connection over)."""
        out = b"".join(self.held)
        for piece in self.held:
            self.queued_bytes -= len(piece)
        self.held = []
        return out

    # -- the service's bytes ---------------------------------------------------------

    def receive_service(self, data: bytes) -> list:
        events = self.events = []
        state = self.sstate
        if state == S_HEAD:
            self._response_head(data)
        elif state == S_IDLE:
            # Bytes with no request in flight: this service connection's
            # framing cannot be trusted any more.
            events.append((EV_NOTE, ("unsolicited", f"service sent {len(data)} bytes with no request in flight")))
            self.upstream = False
            self.served = 0
            events.append((EV_DROP, None))
        elif state != S_CLOSED:
            self._response_body(data, b"")
        return events

    def _response_head(self, data: bytes) -> None:
        if self.resp_head:
            buf = self.resp_head = self.resp_head + data
        else:
            buf = data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > self.max_head:
                self._service_failed(502, "the service sent an oversized response head", "bad_response_head")
            else:
                self.resp_head = buf
            return
        head = buf[: end + 4]
        rest = buf[end + 4:]
        self.resp_head = b""
        active = self.active
        plain = active.keep_alive and not active.upgrade and not active.head_only
        hit = _HEAD_CACHE.get(head) if plain else None
        if hit is not None:
            # The same head as a recent response (services repeat theirs
            # byte for byte): the rewrite is a pure function of the bytes.
            status, client_head, what, self.resp_left, self.resp_close, self.upstream_close = hit
        else:
            try:
                status, client_head, what = self._client_head(head)
            except _Refuse as exc:
                self._service_failed(exc.status, exc.text, exc.kind)
                return
            if plain and status >= 200 and what != SI_HEAD_CHUNKED and len(head) <= 2048:
                if len(_HEAD_CACHE) >= 256:
                    _HEAD_CACHE.clear()
                _HEAD_CACHE[head] = (status, client_head, what, self.resp_left, self.resp_close,
                                     self.upstream_close)
        if what == SI_INTERIM:
            # 100 Continue, 103: the final response follows.
            self._service_move(SI_INTERIM)
            self.events.append((EV_CLIENT, client_head))
            if rest:
                self._response_head(rest)
            return
        if what == SI_HEAD_CHUNKED:
            self.resp_chunked = ChunkedEnd(self.max_chunk_line, self.max_head)
        if active.last_upstream:
            self.upstream_close = True
        if not active.complete and not self.resp_close and what != SI_HEAD_SWITCH:
            # An early answer (401, 413...) while the request body still
            # comes: where that body ends on the service connection is
            # unknown, so neither connection carries another request.
            self.resp_close = True
            client_head = client_head[:len(client_head) - 2] + b"Connection: close\r\n\r\n"
        self._service_move(what)
        self.resp_started = True
        if what == SI_HEAD_SWITCH and self.held:
            # The service switched protocols: the client's bytes held since
            # the upgrade request go on, in order.
            held = self.take_held()
            self.events.append((EV_UPSTREAM, held))
        if what == SI_HEAD_EMPTY:
            if rest:
                # A body where none can be: framing is lost, the excess is
                # dropped and this connection ends here.
                self.events.append((EV_NOTE, ("past_content_length",
                                              f"service sent {len(rest)} bytes after a response without a body")))
                self.resp_close = True
            self.events.append((EV_CLIENT, client_head))
            self._response_done()
            return
        self._response_body(rest, client_head)

    def _response_body(self, data: bytes, head: bytes) -> None:
        """Response bytes to the client as they come; ``head`` (the rewritten
        response head) goes out in the same write."""
        n: cython.Py_ssize_t = len(data)
        end: cython.Py_ssize_t
        left: cython.longlong
        done = False
        state = self.sstate
        if state == S_LENGTH:
            # Content-Length: count, do not parse.
            left = self.resp_left
            if n >= left:
                done = True
                if n > left:
                    # More than the service announced: the excess is
                    # dropped and this connection ends here.
                    self.events.append((EV_NOTE, ("past_content_length",
                                                  f"service sent {n - left} bytes past its Content-Length")))
                    self.resp_close = True
                    data = data[:left]
            self.resp_left = left - len(data)
        elif state == S_CHUNKED:
            # Chunked: find the end by its framing; the bytes pass unchanged.
            end = self.resp_chunked.feed(data, None)
            if end == -2:
                self.events.append((EV_NOTE, ("bad_chunked_response", "service sent a malformed chunked body")))
                self._service_move(SI_FAIL)
                self.cstate = C_CLOSED
                if head:
                    self.events.append((EV_CLIENT, head))
                self.events.append((EV_ABORT, None))
                return
            if end >= 0:
                done = True
                if end < n:
                    # A forged "next response" (or anything) after the last
                    # chunk: it is not the client's.
                    self.events.append((EV_NOTE, ("past_chunked_end",
                                                  f"service sent {n - end} bytes after its chunked body")))
                    self.resp_close = True
                    data = data[:end]
        if head or data:
            self.events.append((EV_CLIENT, head + data if head else data))
        if done:
            self._service_move(SI_BODY_END)
            self._response_done()

    def _response_done(self) -> None:
        """The response ended by its own framing."""
        self.active = None
        self.resp_chunked = None
        self.resp_left = -1
        self.resp_started = False
        self.served += 1
        events = self.events
        events.append((EV_DONE, None))
        if self.resp_close:
            self.upstream = False
            self.cstate = C_CLOSED
            self.sstate = S_CLOSED
            events.append((EV_DROP, None))
            events.append((EV_CLOSE, None))
            return
        if self.upstream_close:
            self.upstream = False
            self.served = 0
            self.upstream_close = False
            events.append((EV_DROP, None))
        if self.queue:
            req = self.queue.popleft()
            self._start(req)

    def _service_failed(self, status: cython.int, text: str, kind: str) -> None:
        """The service's response cannot be passed on."""
        if self.resp_started:
            self.cstate = C_CLOSED
            self.sstate = S_CLOSED
            self.events.append((EV_NOTE, (kind, text)))
            self.events.append((EV_ABORT, None))
        else:
            self._fail(status, text, kind)

    def service_closed(self, reset: cython.bint) -> list:
        """The service's connection ended: closed (EOF) or reset."""
        events = self.events = []
        state = self.sstate
        if state == S_CLOSED:
            return events
        self.upstream = False
        if state == S_IDLE:
            self.served = 0
            if not reset:
                events.append((EV_DROP, None))  # an idle kept-alive connection closed: fine
            return events
        if state == S_HEAD and not self.resp_head:
            if self._retry():
                return events
        if not self.resp_started:
            if reset:
                self._fail(502, "the service behind the agent is unreachable", "service_unreachable")
            else:
                self._fail(502, "the service closed without a response", "service_closed")
            return events
        self.cstate = C_CLOSED
        if not reset and (state == S_CLOSE or state == S_RAW):
            # Close-delimited response (or the end of an upgraded connection).
            self._service_move(SI_BODY_END)
            events.append((EV_CLOSE, None))
        else:
            # Framed but cut short: the client must not take it as complete.
            self._service_move(SI_FAIL)
            events.append((EV_ABORT, None))
        return events

    def _retry(self) -> cython.bint:
        """A kept-alive service connection closed just as a request went out
        on it (the service's idle timeout racing the request): a request that
        is safe to repeat goes once more on a fresh stream, as browsers and
        reverse proxies do (RFC 9110 9.2.2). Not after a first response byte,
        not for a body, not twice."""
        req = self.active
        if (self.served == 0 or req.retried or req.upgrade or req.chunked or req.method not in _IDEMPOTENT
                or not req.complete or req.has_body):
            return False
        req.retried = True
        self.served = 0
        self._service_move(SI_RETRY)
        self.events.append((EV_RETRY, req))
        return True

    def _client_head(self, head: bytes):
        """The response head for the client, and how its body is delimited
        (a service-side input; sets ``resp_left``, ``resp_close``,
        ``upstream_close``)."""
        # One C-speed check of the whole head's syntax (RFC 9112: status
        # line, token ":" value, CRLF only, no obs-fold, no NUL or bare CR/LF).
        if _RESP_HEAD.match(head) is None:
            raise _Refuse(502, "the service sent a malformed response head", "bad_response_head")
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
                    raise _Refuse(502, "the service sent conflicting Content-Length fields", "bad_response_head")
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
                    raise _Refuse(502, "the service sent a Transfer-Encoding other than chunked",
                                  "bad_response_head")
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
        self.resp_close = False
        active = self.active
        if 100 <= status < 200 and status != 101:
            out.append(b"\r\n")
            return status, b"\r\n".join(out), SI_INTERIM
        what = SI_HEAD_CLOSE
        if status == 101:
            if not active.upgrade:
                raise _Refuse(502, "the service switched protocols unasked", "bad_response_head")
            what = SI_HEAD_SWITCH
        elif active.upgrade:
            # Upgrade refused: this response ends the connection, so nothing
            # more is framed after it (and it needs no second Connection: close).
            self.resp_close = True
            out.append(b"Connection: close")
        if what == SI_HEAD_SWITCH:
            pass  # raw both ways from here: no body framing
        elif status == 204 or status == 304 or active.head_only:
            self.resp_left = 0
            what = SI_HEAD_EMPTY
        elif chunked:
            # Chunked with a Content-Length as well is how responses get
            # smuggled (RFC 9112 6.3 says treat it as an error).
            if length is not None:
                raise _Refuse(502, "the service sent both Content-Length and Transfer-Encoding",
                              "bad_response_head")
            what = SI_HEAD_CHUNKED
        elif length is not None:
            if not length.isdigit() or len(length) > 18:
                raise _Refuse(502, "the service sent a bad Content-Length", "bad_response_head")
            self.resp_left = int(length)
            what = SI_HEAD_LENGTH if self.resp_left else SI_HEAD_EMPTY
        elif not self.resp_close:
            # Delimited by the close: the client must see it too.
            self.resp_close = True
            out.append(b"Connection: close")
        if not active.keep_alive and not self.resp_close and status != 101:
            # The client asked to close after this response (Connection:
            # close, or HTTP/1.0 without keep-alive): say so, then do it.
            self.resp_close = True
            out.append(b"Connection: close")
        out.append(b"\r\n")
        return status, b"\r\n".join(out), what


def _read_request(fr: Framing, head: bytes) -> Request:
    """A whole request head -> a Request with the head the service gets;
    sets ``fr.body_left`` for a Content-Length body. Strict (RFC 9112)."""
    while head[:2] == b"\r\n":
        head = head[2:]
    if _REQ_HEAD.match(head) is None:
        raise _Refuse(400, "bad request: malformed request head", "bad_request")
    lines = head[:len(head) - 4].split(b"\r\n")
    if len(lines) > fr.max_headers + 1:
        raise _Refuse(431, f"more than {fr.max_headers} header fields", "bad_request")
    req = Request()
    first = lines[0]
    sp = first.find(b" ")
    method = req.method = first[:sp]
    url = first[sp + 1:len(first) - 9]
    http10 = first[len(first) - 1] == 48  # HTTP/1.0
    if method not in _METHODS:
        # A method the relay does not know: a service that reads it another
        # way (``head`` as HEAD, say) would frame its answer otherwise than
        # the relay expects (RFC 9110 9.1: 501).
        raise _Refuse(501, "method not implemented", "bad_request")
    if method == b"CONNECT":
        # A reverse proxy has no business tunnelling to where a client
        # names: nothing after this head may reach an agent.
        raise _Refuse(405, "CONNECT is not served here", "bad_request")
    req.head_only = method == b"HEAD"
    host = b""
    te = None
    length = None
    named = None
    xff = None
    upgrade = None
    headers = req.headers
    out = [b""]  # the request line, once the version is known
    for line in lines[1:]:
        colon = line.find(b":")
        name = line[:colon]
        value = line[colon + 1:].strip(b" \t")
        headers.append((name, value))
        special = _REQ_SPECIAL.get(name.lower())
        if special is None:
            out.append(name + b": " + value)
        elif special == 1:  # host
            if host and value != host:
                raise _Refuse(400, "several Host headers", "bad_request")
            host = value
            out.append(name + b": " + value)
        elif special == 2:  # transfer-encoding
            if te is not None or value.lower() != b"chunked":
                raise _Refuse(400, "only Transfer-Encoding: chunked is accepted", "bad_request")
            te = value
        elif special == 3:  # connection
            named = (named or set()) | {t.strip().lower() for t in value.split(b",")}
        elif special == 4:
            xff = value
        elif special == 5:
            upgrade = value
        elif special == 6:  # expect
            req.expect_continue = value.lower() == b"100-continue"
        elif special == 7:  # content-length
            if length is not None or not value.isdigit():
                raise _Refuse(400, "bad or repeated Content-Length", "bad_request")
            if len(value.lstrip(b"0")) > 18:
                raise _Refuse(400, "Content-Length too large", "bad_request")
            length = value
            out.append(name + b": " + value)
        # else: hop-by-hop, or a forwarding header the relay writes itself
    if not host:
        raise _Refuse(400, "Host header required", "bad_request")
    if te is not None and (length is not None or http10):
        # Both framings (how requests get smuggled), or chunked in HTTP/1.0
        # (RFC 9112 6.1): refused.
        raise _Refuse(400, "Transfer-Encoding with Content-Length or in HTTP/1.0", "bad_request")
    tokens = named or _NO_TOKENS
    req.keep_alive = (b"keep-alive" in tokens) if http10 else (b"close" not in tokens)
    req.upgrade = bool(upgrade) and b"upgrade" in tokens  # an empty Upgrade asks for nothing
    req.version = b"1.0" if http10 else b"1.1"
    req.chunked = te is not None
    req.host = host
    if url[:1] != b"/":
        url = _origin_form(url, host, method)
    q = url.find(b"?")
    path = url if q < 0 else url[:q]
    clean = _clean_path(path)
    if clean != path:
        url = clean if q < 0 else clean + url[q:]
    req.url = url
    req.path = b"/" if clean == b"*" else clean
    # The service is asked in the client's HTTP version, so that an HTTP/1.0
    # client never gets a chunked body it cannot read; asked in HTTP/1.0, a
    # service closes after its answer: never send another request after it.
    out[0] = method + b" " + url + (b" HTTP/1.0" if http10 else b" HTTP/1.1")
    req.last_upstream = http10
    if named:
        # Connection names further fields to drop (rare), but never the ones
        # that frame the body or route the request: dropping Content-Length
        # while the body still flows would make the body a second request.
        named = named - _NEVER_NAMED
        out[1:] = [line for line in out[1:] if line.partition(b":")[0].lower() not in named]
    client = fr.client
    out.append(b"X-Forwarded-For: " + (xff + b", " + client if xff else client))
    out.append(fr.fwd_head + host)
    if req.upgrade:
        out.append(b"Connection: Upgrade")
        out.append(b"Upgrade: " + upgrade)
    if te is not None:
        out.append(b"Transfer-Encoding: chunked")
    out.append(b"\r\n")
    req.upstream_head = b"\r\n".join(out)
    if length is not None and te is None and not req.upgrade:
        fr.body_left = int(length)
    return req


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
        raise _Refuse(400, "the request target must be a path or an http(s) URL", "bad_request")
    rest = url[scheme_end + 3:]
    cut = len(rest)
    for sep in (b"/", b"?", b"#"):
        k = rest.find(sep)
        if 0 <= k < cut:
            cut = k
    authority, target = rest[:cut], rest[cut:]
    if b"@" in authority:
        raise _Refuse(400, "user information in the request target", "bad_request")
    if authority.lower() != host.lower():
        raise _Refuse(400, "the request target names another host than the Host header", "bad_request")
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
            raise _Refuse(400, "encoded slash or backslash in the path", "bad_request")
        if b"%2e" in low:
            path = _ENCODED_DOT.sub(b".", path)
    if b"\\" in path:
        raise _Refuse(400, "backslash in the path", "bad_request")
    if path[:2] == b"//":
        raise _Refuse(400, "the path starts with //", "bad_request")
    if b"/." not in path:
        return path
    out = []
    segments = path.split(b"/")
    for seg in segments[1:]:
        if seg[:1] == b"." and seg.split(b";", 1)[0] in (b".", b".."):
            if seg not in (b".", b".."):
                raise _Refuse(400, "a dot segment with parameters in the path", "bad_request")
            if seg == b"..":
                if not out:
                    raise _Refuse(400, "the path climbs above the root", "bad_request")
                out.pop()
        else:
            out.append(seg)
    clean = b"/" + b"/".join(out)
    if segments[len(segments) - 1] in (b".", b"..") and out:
        clean += b"/"
    return clean


# Request header fields the relay looks at (or drops) rather than passing on.
_REQ_SPECIAL = {b"host": 1, b"transfer-encoding": 2, b"connection": 3, b"x-forwarded-for": 4, b"upgrade": 5,
                b"expect": 6, b"content-length": 7, b"x-forwarded-proto": 0, b"forwarded": 0,
                **{h: 0 for h in HOP_BY_HOP if h not in (b"transfer-encoding", b"connection", b"upgrade")}}
#: Response head -> (status, rewritten head, service input, Content-Length
#: left, client close, service close) for plain responses; bounded.
_HEAD_CACHE: dict = {}
_NEVER_NAMED = frozenset({b"content-length", b"transfer-encoding", b"host"})
_ENCODED_DOT = re.compile(rb"%2[eE]")


def clear_head_cache() -> None:
    """Forget the rewritten response heads (so that a test input replays
    the same way alone or after others)."""
    _HEAD_CACHE.clear()

#: The methods the relay forwards: the registered ones whose framing it
#: knows (CONNECT is refused on its own).
_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH", b"CONNECT",
                      b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"SEARCH",
                      b"REPORT", b"ACL", b"BIND", b"UNBIND", b"REBIND", b"MKCALENDAR", b"MKACTIVITY",
                      b"CHECKOUT", b"MERGE", b"LINK", b"UNLINK", b"PURGE"})
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_RESP_HEAD = http1.RESPONSE_HEAD
_REQ_HEAD = http1.REQUEST_HEAD
# First letters (lower case) of the response fields the relay acts on.
_RESP_FIRST = frozenset(b"cktpu")
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade"})
_NO_TOKENS: frozenset = frozenset()


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
    """Where a chunked body ends (RFC 9112 7.1), to the byte: chunk data is
    skipped by counting (or collected, for a body that is chunked again),
    only size lines and trailers are looked at. Strict: hex sizes of at most
    15 digits, CRLF line ends only, no NUL, no obs-fold in trailers, lines
    bounded. Knowing the exact end is what lets the relay drop whatever
    comes after it instead of passing it on as a next message."""

    def __init__(self, max_line: int = 4096, max_trailers: int = 32 * 1024) -> None:
        self.max_line = max_line  # a size line
        self.max_trailers = max_trailers  # the whole trailer section
        self.state = _CH_SIZE
        self.left = 0
        self.digits = 0
        self.line = 0
        self.colon = False

    def feed(self, data: bytes, pieces) -> cython.Py_ssize_t:
        """-1: the body goes on past ``data``; -2: it is malformed; else the
        offset in ``data`` just after the body's last byte. Chunk data is
        appended to the list ``pieces`` unless it is None."""
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
                if pieces is not None:
                    pieces.append(data if take == n else data[i:i + take])
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


class _Refuse(Exception):
    def __init__(self, status: int, text: str, kind: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.kind = kind
