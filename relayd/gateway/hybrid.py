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

from relayd import metrics
from relayd.control import sas
from relayd.control.hybrid import Catalog, HybridConnection
from relayd.core import hcwire, http1
from relayd.core import wsframe as ws
from relayd.core.wshandshake import Refuse, server_handshake
from relayd.log import RateLimitedLog
from relayd.net import abort_with_reset, peer_name
from relayd.net.http_ingress import Route
from relayd.net.wspeer import WsPeer, WsSplice

log = logging.getLogger("relayd.hybrid")
_LOG = RateLimitedLog(log)

#: Seconds a rendezvous address lives (Azure: about 30).
ACCEPT_TIMEOUT = 30.0
#: Seconds between pings on a listener's control channel.
PING_INTERVAL = 30.0
#: Bytes a waiting sender may send before its answer (it should send none).
_MAX_EARLY = 64 * 1024
# Headers of a sender's handshake that are the relay's, not the listener's.
_NOT_FORWARDED = {b"servicebusauthorization", b"authorization", b"connection", b"upgrade", b"host",
                  b"sec-websocket-extensions", b"content-length", b"transfer-encoding", b"te", b"keep-alive"}


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

    def ws_message(self, peer: WsPeer, ev) -> None:
        if type(ev) is not ws.TextMessage:
            return  # a stray binary message (hyco-https after a HEAD): ignored
        try:
            msg = hcwire.parse_listener_message(ev.data)
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


class HybridGateway:
    """The hybrid connections of one node."""

    def __init__(self, catalog: Catalog, namespaces, clock_skew: float = sas.CLOCK_SKEW,
                 ws_config: ws.WsConfig | None = None, accept_timeout: float = ACCEPT_TIMEOUT) -> None:
        self.catalog = catalog
        self.namespaces = {n.lower() for n in namespaces}
        self.clock_skew = clock_skew
        self.ws_config = ws_config or ws.WsConfig()
        self.accept_timeout = accept_timeout
        self.listeners: dict[str, list[Listener]] = {}  # entity key -> its listeners
        self.pending: dict[str, Pending] = {}  # rendezvous key -> waiting sender
        self._turn = itertools.count()
        self._pinger = None

    def routes(self) -> list[Route]:
        """The front door's local routes: ``/$hc`` on each of the node's names."""
        return [Route("hybrid", host, "/$hc", local=self.upgrade) for host in sorted(self.namespaces)]

    def set_catalog(self, catalog: Catalog) -> None:
        """A new catalog (reload, ``relayd admin hc``): listeners of hybrid
        connections that are gone are closed with 1001."""
        self.catalog = catalog
        for key, ls in list(self.listeners.items()):
            if key not in catalog.connections:
                for lst in list(ls):
                    lst.peer.close(ws.CLOSE_GOING_AWAY, "the hybrid connection was deleted")
                    self._listener_gone(lst, 1001)

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
            else:
                raise HcRefusal(400, "Bad Request: sb-hc-action must be listen, connect or accept", "bad_action")
        except HcRefusal as exc:
            self._refuse(transport, exc)

    def _refuse(self, transport, exc: HcRefusal) -> None:
        metrics.HC_REFUSALS.labels(exc.kind, str(exc.status)).inc()
        reason = f"{exc.reason}. TrackingId:{uuid.uuid4()}"
        transport.write(http1.response(exc.status, (reason + "\n").encode(), reason=reason.encode()))
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
            metrics.HC_LISTENER_ERRORS.labels(hc.path, str(exc.status)).inc()
            raise
        transport.write(res.response)
        lid = target.params.get("sb-hc-id") or str(uuid.uuid4())
        peer = WsPeer(None, self.ws_config, True, "hybrid")
        lst = Listener(self, hc, peer, lid, tok.expiry)
        peer.handler = lst
        transport.set_protocol(peer)
        peer.connection_made(transport)
        lst.address = peer_name(transport)
        self.listeners.setdefault(hc.key, []).append(lst)
        metrics.HC_LISTENER_SUCCESS.labels(hc.path).inc()
        metrics.HC_ACTIVE_LISTENERS.labels(hc.path).inc()
        log.info("listener connected", extra={"entity": hc.path, "listener": lid[:64], "address": lst.address})
        self._start_pinger()
        if rest:
            peer.data_received(rest)

    def _listener_gone(self, lst: Listener, code: int) -> None:
        ls = self.listeners.get(lst.hc.key)
        if ls is None or lst not in ls:
            return
        ls.remove(lst)
        if not ls:
            del self.listeners[lst.hc.key]
        metrics.HC_ACTIVE_LISTENERS.labels(lst.hc.path).dec()
        metrics.HC_LISTENER_DISCONNECTS.labels(lst.hc.path, str(code)).inc()
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
            res = server_handshake(head.method, head.target, head.headers)
            if isinstance(res, Refuse):
                raise HcRefusal(res.status, res.reason, "bad_upgrade")
        except HcRefusal as exc:
            metrics.HC_SENDER_ERRORS.labels(hc.path, "ws", str(exc.status)).inc()
            raise
        lst = live[next(self._turn) % len(live)]
        key = secrets.token_urlsafe(24)
        sid = target.params.get("sb-hc-id") or str(uuid.uuid4())
        p = Pending(self, key, hc, head, transport, rest)
        transport.set_protocol(_Waiting(p))
        self.pending[key] = p
        p.timer = asyncio.get_running_loop().call_later(self.accept_timeout, self._expire, p)
        host = head.get(b"host").decode("latin-1")
        addr = hcwire.address(host, hc.path, suffix, target.app_query,
                              [("sb-hc-action", "accept"), ("sb-hc-id", sid), (hcwire.RENDEZVOUS, key)])
        headers = {}
        for name, value in head.headers:
            if name.lower() not in _NOT_FORWARDED:
                n = name.decode("latin-1")
                headers[n] = headers[n] + ", " + value.decode("latin-1") if n in headers else value.decode("latin-1")
        lst.peer.send_text(hcwire.accept_message(addr, sid, headers, transport.get_extra_info("peername")[:2]))

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
        metrics.HC_SENDER_ERRORS.labels(p.hc.path, "ws", str(status)).inc()
        text = f"{reason}. TrackingId:{uuid.uuid4()}"
        p.transport.write(http1.response(status, (text + "\n").encode(), reason=text.encode()))
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
            metrics.HC_SENDER_ERRORS.labels(p.hc.path, "ws", str(code)).inc()
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

        def ended(from_listener: int, from_sender: int) -> None:
            metrics.HC_ACTIVE_CONNECTIONS.labels(hc.path).dec()
            metrics.HC_BYTES.labels(hc.path, "to_sender").inc(from_listener)
            metrics.HC_BYTES.labels(hc.path, "to_listener").inc(from_sender)

        WsSplice(listener, sender, ended)
        for peer, tr in ((listener, transport), (sender, p.transport)):
            tr.set_protocol(peer)
            peer.connection_made(tr)
        for peer, early in ((listener, rest), (sender, p.early)):
            if early:
                peer.data_received(early)
