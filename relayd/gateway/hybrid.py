"""Azure Relay Hybrid Connections on the relay's HTTPS port: listeners'
control channels, senders' WebSocket connects and the rendezvous that joins
them (``../shared/specs/hybrid-connections.md``, sections 2 to 5).

The front door hands every ``/$hc/...`` upgrade on the relay's own host
names to ``HybridGateway.upgrade`` (a local route that takes the connection
over). By its ``sb-hc-action``:

* ``listen``: a listener's control channel, after its token (Listen right);
  it gets ``accept`` messages and may send ``renewToken``.
* ``connect``: a sender, after its token (Send right, unless the hybrid
  connection allows anonymous senders). Its upgrade stays unanswered while
  one listener (round robin) gets an ``accept`` naming a single-use
  rendezvous address; the listener opens a WebSocket there to accept (both
  get 101, the sender with the subprotocol the listener chose, and the two
  are spliced frame by frame) or to reject (the listener gets 410, the
  sender the listener's status and description). No answer within
  ``accept_timeout``: the sender gets 504.
* ``accept``: a listener at a rendezvous address.

Refusals are HTTP answers whose reason phrase says what Azure's says, with a
tracking id.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
import uuid
from urllib.parse import unquote

import orjson

from relayd import metrics
from relayd.control import sas
from relayd.control.hybrid import Catalog, HybridConnection
from relayd.core import h1proxy, hcwire, http1
from relayd.core import wsframe as ws
from relayd.core.wshandshake import Refuse, server_handshake
from relayd.log import RateLimitedLog
from relayd.net import abort_with_reset, peer_name
from relayd.net.http_ingress import LocalExchange, LocalService, Route
from relayd.net.wspeer import WsPeer, WsSplice

log = logging.getLogger("relayd.hybrid")
_LOG = RateLimitedLog(log)

#: Seconds a rendezvous address lives (Azure: about 30).
ACCEPT_TIMEOUT = 30.0
#: Seconds between pings on a listener's control channel.
PING_INTERVAL = 30.0
#: Bytes a waiting sender may send before its answer (it should send none).
_MAX_EARLY = 64 * 1024
# A sender's header fields that are the relay's or the connection's, not the
# listener's (hop-by-hop fields, the relay's token, its forwarding fields).
_NOT_FOR_LISTENER = h1proxy.HOP_BY_HOP | {b"host", b"content-length", b"close", b"servicebusauthorization",
                                          b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"}
# ... and of a WebSocket sender's handshake (no extension is ever negotiated).
_NOT_FOR_LISTENER_WS = _NOT_FOR_LISTENER | {b"authorization", b"sec-websocket-extensions"}


def _listener_headers(head: http1.RequestHead, drop) -> dict:
    """A sender's header fields for a listener (``connectHeaders``,
    ``requestHeaders``): those not in ``drop``, repeated ones joined with
    ", " (RFC 9110 5.3)."""
    out: dict = {}
    for name, value in head.headers:
        if name.lower() not in drop:
            n, v = name.decode("latin-1"), value.decode("latin-1")
            out[n] = out[n] + ", " + v if n in out else v
    return out


def _refusal(status: int, reason: str, close: bool = True) -> bytes:
    """An HTTP refusal as Azure words it: the reason phrase and the body
    end with a tracking id."""
    text = f"{reason}. TrackingId:{uuid.uuid4()}"
    return http1.response(status, (text + "\n").encode(), close=close, reason=text.encode())


def _gather(owner, ev) -> bytes | None:
    """A text message's parts into ``owner.text``: the whole message at its
    last part; None before that. Beyond MAX_CONTROL_MESSAGE the rest is
    dropped as it comes and the message ends up as b"" (refused by the
    parser, counted)."""
    if owner.text is not None:
        owner.text.append(ev.data)
        owner.text_size += len(ev.data)
        if owner.text_size > hcwire.MAX_CONTROL_MESSAGE:
            owner.text = None
    if not ev.fin:
        return None
    text = b"".join(owner.text) if owner.text is not None else b""
    owner.text, owner.text_size = [], 0
    return text


def _guid(listener_id: str) -> str:
    """The GUID part of a listener id (``GUID_G12`` -> ``guid``)."""
    return listener_id.split("_", 1)[0].lower()


def _ids(value: bytes | None) -> set | None:
    if value is None:
        return None
    return {_guid(v.strip().decode("latin-1")) for v in value.split(b",") if v.strip()}


class HcRefusal(Exception):
    def __init__(self, status: int, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind


class Listener:
    """One listener's control channel."""

    def __init__(self, gw: "HybridGateway", hc: HybridConnection, peer: WsPeer, id_: str, expiry: int) -> None:
        self.gw = gw
        self.hc = hc
        self.peer = peer
        self.id = id_
        self.expiry = expiry
        self.since = time.time()
        self.address = peer_name(peer.transport) if peer.transport is not None else "?"
        self.awaiting = None  # the HTTP request whose response body comes next
        self.text: list | None = []  # a text message's parts so far (None: too large, dropped)
        self.text_size = 0

    def ws_message(self, peer: WsPeer, ev) -> None:
        # Parts as they come (assemble=False), so that a response body
        # streams to its sender as the listener writes it.
        if ev.opcode != ws.OP_TEXT:
            # The body of the response just announced, or a stray binary
            # message (hyco-https sends one after a HEAD): ignored.
            req = self.awaiting
            if ev.fin:
                self.awaiting = None
            if req is not None:
                req.response_body(ev.data, ev.fin)
            return
        text = _gather(self, ev)
        if text is None:
            return
        self.awaiting = None
        try:
            msg = hcwire.parse_listener_message(text.decode("utf-8"))
        except hcwire.HcProtocolError as exc:
            metrics.BAD_INPUT.labels("hybrid", "bad_control_message").inc()
            _LOG.info("listener sent a bad control message: %s", exc, extra={"entity": self.hc.path})
            return
        if type(msg) is hcwire.RenewToken:
            try:
                tok = self.gw.authorize(msg.token, self.hc, "listen")
            except sas.SasError as exc:
                metrics.HC_LISTENER_DISCONNECTS.labels(self.hc.path, "1008").inc()
                _LOG.info("listener's renewed token refused: %s", exc.code, extra={"entity": self.hc.path})
                peer.close(ws.CLOSE_POLICY, f"{exc.code}: the renewed token was refused")
                self.gw._listener_gone(self, 1008)
                return
            self.expiry = tok.expiry
        elif type(msg) is hcwire.Response:
            req = self.gw.http.get(msg.request_id)
            if req is None or req.listener is not self or req.rendezvous is not None:
                return  # answered, timed out, or not this listener's: ignored
            req.response_head(msg)
            if msg.body:
                self.awaiting = req

    def ws_writable(self, peer: WsPeer, writable: bool) -> None:
        pass

    def ws_closed(self, peer: WsPeer, code: int, reason: str) -> None:
        self.gw._listener_gone(self, code)


class _Waiting(asyncio.Protocol):
    """A sender's connection while its upgrade waits for a listener."""

    def __init__(self, pending: "Pending") -> None:
        self.pending = pending

    def data_received(self, data: bytes) -> None:
        p = self.pending
        p.early += data
        if len(p.early) > _MAX_EARLY:
            p.gw._drop_pending(p)
            abort_with_reset(p.transport)

    def connection_lost(self, exc) -> None:
        self.pending.gw._drop_pending(self.pending)


class Pending:
    """A sender waiting for a listener to accept or reject it."""

    def __init__(self, gw: "HybridGateway", key: str, hc: HybridConnection, head: http1.RequestHead, transport,
                 early: bytes) -> None:
        self.gw = gw
        self.key = key
        self.hc = hc
        self.head = head
        self.transport = transport
        self.early = early
        self.started = time.monotonic()
        self.timer = None


# -- HTTP mode -----------------------------------------------------------------------------------

# Response headers the relay writes itself.
_NOT_FROM_LISTENER = {"connection", "content-length", "transfer-encoding", "keep-alive", "te", "trailer",
                      "upgrade", "proxy-connection", "via"}
#: Request metadata (the request message) above this goes over a rendezvous (Azure: 32 KiB).
_CONTROL_HEADERS = 32 * 1024
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class HttpRequest(LocalService):
    """One HTTP-mode request: from a sender's HTTPS request (the front
    door's local service) to a listener and its response back, streamed
    both ways (spec section 6)."""

    def __init__(self, gw: "HybridGateway", hc: HybridConnection, head: http1.RequestHead, ex: LocalExchange,
                 listener: Listener, target: str, auth_header: bytes | None) -> None:
        self.gw = gw
        self.hc = hc
        self.head = head
        self.ex = ex
        self.listener = listener
        self.id = str(uuid.uuid4())
        self.key = secrets.token_urlsafe(24)
        self.target = target
        # The header that carried the token is the relay's, not the listener's.
        self.drop = _NOT_FOR_LISTENER | {auth_header} if auth_header is not None else _NOT_FOR_LISTENER
        self.parts: list = []  # body held for the control channel, or until the rendezvous opens
        self.size = 0
        self.ended = False
        self.deferred = False  # the request goes over a rendezvous
        self.rendezvous: WsPeer | None = None
        self.rv_sent = False  # the request message went on the rendezvous
        self.body_started = False  # a body message began on the rendezvous
        self.started = time.monotonic()
        self.answered = False  # the response head went to the sender
        self.chunked = head.version != b"1.0"
        length = head.get(b"content-length")
        self.has_body = head.get(b"transfer-encoding") is not None or (length is not None and length != b"0")
        if (length is not None and length.isdigit() and int(length) > hc.control_threshold) \
                or len(self._message(True)) > _CONTROL_HEADERS:
            self._defer()  # a large body, or large headers: over a rendezvous
        ex.set_deadline(hc.response_timeout)

    # -- the sender's side (LocalService) --

    def body(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.rv_sent:
            self._rv_body(piece, False)
            return
        self.parts.append(piece)
        if not self.deferred and self.size > self.hc.control_threshold:
            self._defer()
        elif self.deferred and self.size > 4 * self.hc.control_threshold:
            self.ex.pause_body()  # until the listener opens the rendezvous

    def end(self) -> None:
        self.ended = True
        if self.rv_sent:
            self._rv_body(b"", True)
        elif not self.deferred:
            # Small enough for the control channel: the request, then its
            # body as the very next message.
            self.listener.peer.send_text(self._message(True))
            if self.size:
                self.listener.peer.send_binary(b"".join(self.parts))
            self.parts = []

    def lost(self) -> None:
        self.gw._http_done(self)
        if self.rendezvous is not None:
            self.rendezvous.close(ws.CLOSE_GOING_AWAY, "the sender went away")

    # -- the request message --

    def _message(self, full: bool) -> str:
        if not full:
            return orjson.dumps({"request": {"address": self._address(), "id": self.id}}).decode()
        headers = _listener_headers(self.head, self.drop)
        peer = self.ex.client
        return orjson.dumps({"request": {
            "address": self._address(), "id": self.id, "requestTarget": self.target,
            "method": self.head.method.decode("latin-1"), "remoteEndpoint": {"address": peer[0], "port": peer[1]},
            "requestHeaders": headers, "body": self.has_body and (self.size > 0 or not self.ended)}}).decode()

    def _address(self) -> str:
        host = self.head.get(b"host").decode("latin-1")
        return hcwire.address(host, self.hc.path, "", "", [("sb-hc-action", "request"), ("sb-hc-id", self.id),
                                                           (hcwire.RENDEZVOUS, self.key)])

    def _defer(self) -> None:
        """Too large for the control channel: the listener is asked to
        open a rendezvous, where the request and its body go."""
        if not self.deferred:
            self.deferred = True
            self.listener.peer.send_text(self._message(False))

    # -- the rendezvous --

    def rendezvous_open(self, peer: WsPeer) -> None:
        """The listener opened this request's rendezvous: the request goes
        there if it has not gone on the control channel; the response comes
        there either way."""
        self.rendezvous = peer
        self.text = []
        self.text_size = 0
        if self.deferred:
            self.rv_sent = True
            peer.send_text(self._message(True))
            if self.has_body:
                parts, self.parts = self.parts, []
                for piece in parts:
                    self._rv_body(piece, False)
                if self.ended:
                    self._rv_body(b"", True)
            self.ex.resume_body()

    def _rv_body(self, piece: bytes, fin: bool) -> None:
        if not self.has_body:
            return
        self.rendezvous.send_part(ws.OP_BINARY, piece, fin, not self.body_started)
        self.body_started = not fin

    def ws_message(self, peer: WsPeer, ev) -> None:
        if type(ev) is ws.DataFrame and ev.opcode == ws.OP_TEXT:
            text = _gather(self, ev)
            if text is not None:
                try:
                    msg = hcwire.parse_listener_message(text.decode("utf-8"))
                except (hcwire.HcProtocolError, UnicodeDecodeError):
                    msg = None
                if type(msg) is hcwire.Response and msg.request_id == self.id:
                    self.response_head(msg)  # (without a body, that ends it)
        elif type(ev) is ws.DataFrame and self.answered:
            self.response_body(ev.data, ev.fin)

    def ws_writable(self, peer: WsPeer, writable: bool) -> None:
        if writable:
            self.ex.resume_body()
        else:
            self.ex.pause_body()

    def ws_closed(self, peer: WsPeer, code: int, reason: str) -> None:
        self.rendezvous = None
        if self.gw.http.get(self.id) is self:
            self.gw._http_done(self)
            self.ex.fail()  # 502, or a reset once the response began

    # -- the response --

    def response_head(self, msg) -> None:
        if self.answered:
            return
        self.answered = True
        metrics.HC_SENDER_SUCCESS.labels(self.hc.path, "http").inc()
        metrics.HC_RESPONSE_SECONDS.observe(time.monotonic() - self.started)
        reason = "".join(c for c in msg.description if c.isprintable())[:200] or http1.REASONS.get(msg.status, "")
        lines = [f"HTTP/1.1 {msg.status} {reason}".encode("latin-1", "replace")]
        for name, value in msg.headers.items():
            if name.lower() in _NOT_FROM_LISTENER or not name or not set(name) <= _TOKEN_CHARS \
                    or any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value):
                continue
            lines.append(f"{name}: {value}".encode("latin-1", "replace"))
        lines.append(b"Via: 1.1 " + self.head.get(b"host").split(b":")[0])
        if not msg.body:
            lines.append(b"Content-Length: 0")
        elif self.chunked:
            lines.append(b"Transfer-Encoding: chunked")
        else:
            lines.append(b"Connection: close")  # an HTTP/1.0 sender: the body ends with the connection
        self.ex.respond(b"\r\n".join(lines) + b"\r\n\r\n")
        if not msg.body:
            self.gw._http_done(self)
            self._close_rendezvous()

    def response_body(self, data: bytes, fin: bool) -> None:
        if not self.answered:
            return
        if data and self.head.method != b"HEAD":
            self.ex.respond(b"%x\r\n" % len(data) + data + b"\r\n" if self.chunked else data)
        if fin:
            self.gw._http_done(self)
            if self.chunked:
                self.ex.respond(b"0\r\n\r\n")
            else:
                self.ex.finish()
            self._close_rendezvous()

    def _close_rendezvous(self) -> None:
        rv, self.rendezvous = self.rendezvous, None
        if rv is not None:
            rv.close(ws.CLOSE_NORMAL, "")


class HybridGateway:
    """The hybrid connections of one node."""

    def __init__(self, catalog: Catalog, namespaces, clock_skew: float = sas.CLOCK_SKEW,
                 ws_config: ws.WsConfig | None = None, accept_timeout: float = ACCEPT_TIMEOUT) -> None:
        self.catalog = catalog
        self.namespaces = {n.lower() for n in namespaces}
        self.clock_skew = clock_skew
        # Messages are relayed part by part as they come (never assembled
        # here), so their size is not bounded, only a frame's; control
        # messages are bounded where they are gathered (MAX_CONTROL_MESSAGE).
        self.ws_config = ws_config or ws.WsConfig(max_message=(1 << 62) - 1, max_frame=16 * 1024 * 1024)
        self.accept_timeout = accept_timeout
        self.listeners: dict[str, list[Listener]] = {}  # entity key -> its listeners
        self.pending: dict[str, Pending] = {}  # rendezvous key -> waiting sender
        self.http: dict[str, HttpRequest] = {}  # request id -> HTTP-mode request in flight
        self.http_keys: dict[str, HttpRequest] = {}  # rendezvous key -> the same
        self._turn = itertools.count()
        self._pinger = None
        #: Called (no arguments) when a listener comes or goes.
        self.on_listeners = None

    def routes(self) -> list[Route]:
        """The front door's local routes on each of the node's names: ``/$hc``
        (WebSockets), and ``/PATH`` of each hybrid connection that takes
        HTTP-mode requests."""
        out = []
        for host in sorted(self.namespaces):
            out.append(Route("hybrid", host, "/$hc", local=self.upgrade))
            out += [Route("hybrid", host, "/" + hc.path, serve=self.http_request)
                    for hc in self.catalog.connections.values() if hc.http]
        return out

    def set_catalog(self, catalog: Catalog) -> None:
        """A new catalog (reload, ``relayd admin hc``): listeners of hybrid
        connections that are gone are closed with 1001."""
        self.catalog = catalog
        for key, ls in list(self.listeners.items()):
            if key not in catalog.connections:
                for lst in list(ls):
                    lst.peer.close(ws.CLOSE_GOING_AWAY, "the hybrid connection was deleted")
                    self._listener_gone(lst, 1001)

    def listener_table(self) -> dict:
        """{path: [{"id", "since", "address"}]} of the listeners now."""
        return {ls[0].hc.path: [{"id": lst.id[:64], "since": lst.since, "address": lst.address} for lst in ls]
                for ls in self.listeners.values() if ls}

    def authorize(self, token: str | None, hc: HybridConnection, right: str) -> sas.Token:
        return sas.check(token, self.catalog.rules_for(hc), self.namespaces, hc.path, right, time.time(),
                         self.clock_skew)

    def stop(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        for p in list(self.pending.values()):
            self._answer(p, 503, "the relay is stopping")
        for ls in list(self.listeners.values()):
            for lst in list(ls):
                lst.peer.close(ws.CLOSE_GOING_AWAY, "the relay is stopping")
                self._listener_gone(lst, 1001)

    # -- the front door's local route ------------------------------------------------------

    def upgrade(self, head: http1.RequestHead, transport, rest: bytes) -> None:
        target = hcwire.parse_target(head.target)
        action = target.action if target is not None else ""
        try:
            if head.get(b"upgrade") is None or b"websocket" not in head.tokens(b"upgrade"):
                raise HcRefusal(400, "Bad Request: a WebSocket upgrade is expected on $hc", "not_upgrade")
            if action == hcwire.LISTEN:
                self._listen(head, target, transport, rest)
            elif action == hcwire.CONNECT:
                self._connect(head, target, transport, rest)
            elif action == hcwire.ACCEPT:
                self._accept(head, target, transport, rest)
            elif action == hcwire.REQUEST:
                self._request_rendezvous(head, target, transport, rest)
            else:
                raise HcRefusal(400, "Bad Request: sb-hc-action must be listen, connect, accept or request",
                                "bad_action")
        except HcRefusal as exc:
            self._refuse(transport, exc)

    def _refuse(self, transport, exc: HcRefusal) -> None:
        metrics.HC_REFUSALS.labels(exc.kind, str(exc.status)).inc()
        transport.write(_refusal(exc.status, exc.reason))
        transport.close()

    def _entity(self, target: hcwire.Target) -> tuple[HybridConnection, str]:
        found = self.catalog.find(target.path) if target.path else None
        if found is None:
            raise HcRefusal(404, f"Endpoint does not exist: {target.path[:100]}", "no_entity")
        return found

    def _token(self, head: http1.RequestHead, target: hcwire.Target):
        tok = target.params.get("sb-hc-token")
        if tok is None:
            value = head.get(b"servicebusauthorization")
            tok = value.decode("latin-1") if value is not None else None
        return tok

    def _check(self, head, target, hc: HybridConnection, right: str) -> sas.Token | None:
        if right == "send" and not hc.requires_client_auth:
            return None
        try:
            return self.authorize(self._token(head, target), hc, right)
        except sas.SasError as exc:
            raise HcRefusal(exc.status, str(exc), "unauthorized") from None

    # -- listeners -----------------------------------------------------------------------------

    def _listen(self, head, target, transport, rest) -> None:
        hc, suffix = self._entity(target)
        metrics.HC_LISTENER_REQUESTS.labels(hc.path).inc()
        try:
            if suffix:
                raise HcRefusal(404, f"Endpoint does not exist: {target.path[:100]}", "no_entity")
            tok = self._check(head, target, hc, "listen")
            live = self.listeners.get(hc.key, [])
            if len(live) >= hc.max_listeners:
                raise HcRefusal(403, f"MaximumListenersPerEndpoint: at most {hc.max_listeners} listeners",
                                "listener_quota")
            res = server_handshake(head.method, head.target, head.headers)
            if isinstance(res, Refuse):
                raise HcRefusal(res.status, res.reason, "bad_upgrade")
        except HcRefusal as exc:
            metrics.hc_listener_error(hc.path, exc.status)
            raise
        transport.write(res.response)
        lid = target.params.get("sb-hc-id") or str(uuid.uuid4())
        peer = WsPeer(None, self.ws_config, False, "hybrid")
        lst = Listener(self, hc, peer, lid, tok.expiry)
        peer.handler = lst
        transport.set_protocol(peer)
        peer.connection_made(transport)
        lst.address = peer_name(transport)
        self.listeners.setdefault(hc.key, []).append(lst)
        metrics.HC_LISTENER_SUCCESS.labels(hc.path).inc()
        metrics.HC_ACTIVE_LISTENERS.labels(hc.path).inc()
        if self.on_listeners is not None:
            self.on_listeners()
        log.info("listener connected", extra={"entity": hc.path, "listener": lid[:64], "address": lst.address})
        self._start_pinger()
        if rest:
            peer.data_received(rest)

    def _listener_gone(self, lst: Listener, code: int) -> None:
        for req in [r for r in self.http.values() if r.listener is lst and r.rendezvous is None]:
            self._http_done(req)
            req.ex.fail()  # its answer cannot come any more: 502
        ls = self.listeners.get(lst.hc.key)
        if ls is None or lst not in ls:
            return
        ls.remove(lst)
        if not ls:
            del self.listeners[lst.hc.key]
        metrics.HC_ACTIVE_LISTENERS.labels(lst.hc.path).dec()
        metrics.HC_LISTENER_DISCONNECTS.labels(lst.hc.path, str(code)).inc()
        if self.on_listeners is not None:
            self.on_listeners()
        log.info("listener disconnected", extra={"entity": lst.hc.path, "listener": lst.id[:64], "code": code,
                                                 "seconds": round(time.time() - lst.since, 1)})

    def _start_pinger(self) -> None:
        if self._pinger is None:
            self._pinger = asyncio.get_running_loop().call_later(PING_INTERVAL, self._ping)

    def _ping(self) -> None:
        """Every PING_INTERVAL: ping each control channel (its NATs stay
        open), and close those whose token expired (1008)."""
        self._pinger = None
        now = time.time()
        for ls in list(self.listeners.values()):
            for lst in list(ls):
                if lst.expiry + self.clock_skew < now:
                    lst.peer.close(ws.CLOSE_POLICY, "ExpiredToken: the listener's token expired")
                    self._listener_gone(lst, 1008)
                elif not lst.peer.done:
                    lst.peer.conn.send_ping(b"")
                    lst.peer.flush()
        if self.listeners:
            self._start_pinger()

    # -- senders ---------------------------------------------------------------------------------

    def _connect(self, head, target, transport, rest) -> None:
        hc, suffix = self._entity(target)
        metrics.HC_SENDER_REQUESTS.labels(hc.path, "ws").inc()
        try:
            if not hc.websocket:
                raise HcRefusal(404, f"Endpoint does not accept WebSocket connections: {hc.path}", "ws_disabled")
            self._check(head, target, hc, "send")
            live = self.listeners.get(hc.key)
            if not live:
                raise HcRefusal(404, f"Endpoint does not exist: no listener is connected to {hc.path}", "no_listener")
            lst = self._pick(live, head)
            res = server_handshake(head.method, head.target, head.headers)
            if isinstance(res, Refuse):
                raise HcRefusal(res.status, res.reason, "bad_upgrade")
        except HcRefusal as exc:
            metrics.hc_sender_error(hc.path, "ws", exc.status)
            raise
        key = secrets.token_urlsafe(24)
        sid = target.params.get("sb-hc-id") or str(uuid.uuid4())
        p = Pending(self, key, hc, head, transport, rest)
        transport.set_protocol(_Waiting(p))
        self.pending[key] = p
        p.timer = asyncio.get_running_loop().call_later(self.accept_timeout, self._expire, p)
        host = head.get(b"host").decode("latin-1")
        addr = hcwire.address(host, hc.path, suffix, target.app_query,
                              [("sb-hc-action", "accept"), ("sb-hc-id", sid), (hcwire.RENDEZVOUS, key)])
        headers = _listener_headers(head, _NOT_FOR_LISTENER_WS)
        lst.peer.send_text(hcwire.accept_message(addr, sid, headers, transport.get_extra_info("peername")[:2]))

    def _pick(self, live: list, head: http1.RequestHead) -> Listener:
        """The next listener in turn, among those the sender's
        ``Microsoft-Relay-AllowedListeners`` / ``-DisallowedListeners``
        (listener ids, the GUID part of their ``sb-hc-id``) leave."""
        allowed = _ids(head.get(b"microsoft-relay-allowedlisteners"))
        denied = _ids(head.get(b"microsoft-relay-disallowedlisteners"))
        if allowed is not None or denied is not None:
            live = [lst for lst in live if (allowed is None or _guid(lst.id) in allowed)
                    and (denied is None or _guid(lst.id) not in denied)]
            if not live:
                raise HcRefusal(404, "None of the connected listeners meet the AllowedListeners/"
                                     "DisallowedListeners criteria", "no_listener")
        return live[next(self._turn) % len(live)]

    def _expire(self, p: Pending) -> None:
        if self.pending.get(p.key) is p:
            self._answer(p, 504, "The listener did not accept the connection in time")

    def _drop_pending(self, p: Pending) -> None:
        if self.pending.get(p.key) is p:
            del self.pending[p.key]
            if p.timer is not None:
                p.timer.cancel()

    def _answer(self, p: Pending, status: int, reason: str) -> None:
        """Answer a waiting sender with an error status."""
        self._drop_pending(p)
        metrics.hc_sender_error(p.hc.path, "ws", status)
        p.transport.write(_refusal(status, reason))
        p.transport.close()

    # -- rendezvous ------------------------------------------------------------------------------

    def _accept(self, head, target, transport, rest) -> None:
        p = self.pending.get(target.params.get(hcwire.RENDEZVOUS, ""))
        if p is None:
            raise HcRefusal(403, "Forbidden: the rendezvous address is invalid or has expired", "bad_rendezvous")
        self._drop_pending(p)
        status = target.params.get("sb-hc-statuscode")
        if status is not None:
            # The listener rejects: it gets 410 (it expects the upgrade to
            # fail), the sender its status and description.
            code = int(status) if status.isdigit() and 200 <= int(status) <= 599 else 400
            desc = target.params.get("sb-hc-statusdescription", "Rejected by the listener")
            desc = "".join(c for c in desc if c.isprintable())[:200] or "Rejected"
            transport.write(http1.response(410, b"", reason=b"Gone"))
            transport.close()
            metrics.hc_sender_error(p.hc.path, "ws", code)
            p.transport.write(http1.response(code, (desc + "\n").encode("utf-8", "replace"),
                                             reason=desc.encode("latin-1", "replace")))
            p.transport.close()
            return
        offered = [t.strip() for t in (p.head.get(b"sec-websocket-protocol") or b"").split(b",") if t.strip()]
        wanted = [t.strip().decode("latin-1") for t in (head.get(b"sec-websocket-protocol") or b"").split(b",")
                  if t.strip()]
        chosen = wanted[0] if wanted else None
        if chosen is not None and chosen.encode("latin-1") not in offered:
            chosen = None
        lres = server_handshake(head.method, head.target, head.headers, subprotocols=(chosen,) if chosen else ())
        sres = server_handshake(p.head.method, p.head.target, p.head.headers,
                                subprotocols=(chosen,) if chosen else ())
        if isinstance(lres, Refuse) or isinstance(sres, Refuse):
            bad = lres if isinstance(lres, Refuse) else sres
            self._answer(p, 502, "The rendezvous failed")
            raise HcRefusal(bad.status, bad.reason, "bad_upgrade")
        transport.write(lres.response)
        p.transport.write(sres.response)
        listener = WsPeer(None, self.ws_config, False, "hybrid")
        sender = WsPeer(None, self.ws_config, False, "hybrid")
        hc = p.hc
        started = p.started
        metrics.HC_ACCEPT_SECONDS.observe(time.monotonic() - started)
        metrics.HC_SENDER_SUCCESS.labels(hc.path, "ws").inc()
        metrics.HC_ACTIVE_CONNECTIONS.labels(hc.path).inc()

        def ended(from_listener: int, from_sender: int, code: int) -> None:
            metrics.HC_ACTIVE_CONNECTIONS.labels(hc.path).dec()
            metrics.HC_SENDER_DISCONNECTS.labels(hc.path, str(code)).inc()
            metrics.HC_BYTES.labels(hc.path, "to_sender").inc(from_listener)
            metrics.HC_BYTES.labels(hc.path, "to_listener").inc(from_sender)

        WsSplice(listener, sender, ended)
        for peer, tr in ((listener, transport), (sender, p.transport)):
            tr.set_protocol(peer)
            peer.connection_made(tr)
        for peer, early in ((listener, rest), (sender, p.early)):
            if early:
                peer.data_received(early)

    # -- HTTP mode -------------------------------------------------------------------------------

    def http_request(self, head: http1.RequestHead, ex: LocalExchange) -> LocalService:
        """The front door's local service for ``/PATH/...`` of a hybrid
        connection: a sender's HTTP request, to a listener."""
        path, _, query = head.target.decode("latin-1").partition("?")
        found = self.catalog.find(unquote(path))
        hc = found[0] if found is not None else None
        mode_refusal = None
        if hc is None or not hc.http:
            mode_refusal = (404, f"Endpoint does not exist: {unquote(path)[:100]}", "no_entity")
        else:
            metrics.HC_SENDER_REQUESTS.labels(hc.path, "http").inc()
        params, app = hcwire.split_query(query)
        auth_header = None
        try:
            if mode_refusal is not None:
                raise HcRefusal(*mode_refusal)
            if hc.requires_client_auth:
                tok = params.get("sb-hc-token")
                if tok is None:
                    for auth_header in (b"servicebusauthorization", b"authorization"):
                        value = head.get(auth_header)
                        if value is not None:
                            tok = value.decode("latin-1")
                            break
                    else:
                        auth_header = None
                try:
                    self.authorize(tok, hc, "send")
                except sas.SasError as exc:
                    raise HcRefusal(exc.status, str(exc), "unauthorized") from None
            live = self.listeners.get(hc.key)
            if not live:
                raise HcRefusal(502, f"No listener is connected to {hc.path}", "no_listener")
            lst = self._pick(live, head)
        except HcRefusal as exc:
            if hc is not None:
                metrics.hc_sender_error(hc.path, "http", exc.status)
            metrics.HC_REFUSALS.labels(exc.kind, str(exc.status)).inc()
            ex.respond(_refusal(exc.status, exc.reason, close=False))
            return LocalService()
        target = path + ("?" + app if app else "")
        req = HttpRequest(self, hc, head, ex, lst, target, auth_header)
        self.http[req.id] = req
        self.http_keys[req.key] = req
        return req

    def _http_done(self, req: HttpRequest) -> None:
        if self.http.get(req.id) is req:
            del self.http[req.id]
            self.http_keys.pop(req.key, None)
            if self.listeners.get(req.hc.key) and req.listener.awaiting is req:
                req.listener.awaiting = None

    def _request_rendezvous(self, head, target, transport, rest) -> None:
        """A listener opens the rendezvous of an HTTP-mode request."""
        req = self.http_keys.get(target.params.get(hcwire.RENDEZVOUS, ""))
        if req is None or req.rendezvous is not None:
            raise HcRefusal(403, "Forbidden: the rendezvous address is invalid or has expired", "bad_rendezvous")
        res = server_handshake(head.method, head.target, head.headers)
        if isinstance(res, Refuse):
            raise HcRefusal(res.status, res.reason, "bad_upgrade")
        transport.write(res.response)
        peer = WsPeer(req, self.ws_config, False, "hybrid")
        transport.set_protocol(peer)
        peer.connection_made(transport)
        req.rendezvous_open(peer)
        if rest:
            peer.data_received(rest)
