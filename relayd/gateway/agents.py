"""The agents' way in: the agent port's requests, the links, and what the
relay says to agents.

An agent's connection (TLS on the agents port, or the WebSocket link on the
HTTPS port) starts with one typed request (relayd.core.wire): ``ca``,
``enroll`` and ``renew`` are answered by the control plane
(relayd.control.enrollment); ``tunnel`` turns the connection into a yamux
session registered in the agent registry. Refusals carry codes, failures of
the relay itself say ``unavailable`` (try again; nothing was spent).

Each link also carries control streams both ways (relayd.net.control): the
relay pushes messages to an agent (``push``) and dispatches the agent's to
handlers (``on_control``); an agent's stream of any other kind is reset and
counted.

Two background tasks keep the registry honest: revocations are noticed by
polling the store's revision counter (``relayd admin revoke-agent`` from
another process cuts a live link within a second), and every agent's status
(connected since, address, bytes) is written in one transaction every two
seconds, off the event loop; the same tick reads back the earliest
certificate expiry of the connected agents (a gauge: renewals that fail show
there long before an agent is locked out).
"""

from __future__ import annotations

import asyncio
import functools
import logging

from relayd import metrics
from relayd.control.enrollment import Enrollment
from relayd.control.store import AsyncStore
from relayd.core import wire
from relayd.core.config import MuxConfig
from relayd.core.wire import KIND_CONTROL, StreamHeader
from relayd.errors import AuthError, ForbiddenError, RelaydError
from relayd.gateway.registry import AgentSession, Registry
from relayd.gateway.streams import StreamSeam
from relayd.log import RateLimitedLog
from relayd.net import control, peer_name
from relayd.net.mux import MuxConnection

log = logging.getLogger("relayd.relay")
# Refusals anyone can cause at will: rate-limited lines (every one is counted).
_REFUSALS = RateLimitedLog(log)

REVOCATION_POLL = 0.5
STATUS_INTERVAL = 2.0


class AgentPort:
    def __init__(self, registry: Registry, seam: StreamSeam, db: AsyncStore, enrollment: Enrollment,
                 mux: MuxConfig, endpoints, wss_address) -> None:
        self.registry = registry
        self.seam = seam
        self.db = db
        self.enrollment = enrollment
        self.mux = mux
        self.endpoints = endpoints  # the names of the configured endpoints
        self._wss = wss_address  # () -> the relay's WebSocket address, or None
        self.control_handlers: dict = {}  # control message type -> handler (on_control)
        self._revision = -1
        #: Coroutine functions called when the store's revision changes
        #: (another process changed the data directory: `relayd admin ...`).
        self.on_revision: list = []
        self._status_writes: set[asyncio.Task] = set()
        #: Functions called ``(session, up)`` when a link is registered
        #: (up) and when it leaves the registry (a replaced link does not).
        self.on_link: list = []
        self._store_closed = False
        self._counted: set[str] = set()  # endpoints with a relayd_endpoint_agents series

    # -- requests ----------------------------------------------------------------

    async def on_request(self, msg: dict, transport) -> tuple[dict, asyncio.Protocol | None]:
        """One preamble request (relayd.net.preamble) -> (reply, protocol)."""
        op = msg.get("op")
        if op not in wire.REQUESTS:
            op = None  # attacker text: never logged, never echoed
        peer = peer_name(transport)
        try:
            req = wire.decode_request(msg)
            if isinstance(req, wire.CaRequest):
                return wire.ok_reply(ca=self.enrollment.ca.cert_pem.decode(), wss=self._wss()), None
            if isinstance(req, wire.EnrollRequest):
                return await self.enrollment.enroll(req, peer), None
            ident = await self.enrollment.peer_identity(transport)
            if isinstance(req, wire.RenewRequest):
                return await self.enrollment.renew(req, ident, peer), None
            return await self._tunnel(req, ident, peer)
        except (AuthError, wire.WireError) as exc:
            code = getattr(exc, "code", wire.BAD_REQUEST)
            if isinstance(exc, wire.WireError) and not isinstance(exc, wire.VersionMismatch):
                code = wire.BAD_REQUEST
                metrics.BAD_INPUT.labels("agent_port", "unknown_op" if op is None else "bad_request").inc()
            if op in ("enroll", "renew"):
                metrics.ENROLLMENTS.labels(op, "refused").inc()
            if op == "tunnel":
                metrics.LISTENER_CONNECTIONS.labels("refused").inc()
            _REFUSALS.warning("agent request refused: %s", exc,
                              extra={"op": op or "unknown", "code": code, "peer": peer})
            return wire.refusal_reply(code, str(exc)), None
        except Exception as exc:
            # The relay's own failure (its database full or read-only, a bug),
            # not a refusal: the agent gets a reply that says to try again
            # instead of a cut connection. An enrollment is one transaction,
            # so its join token is still valid (relayd.control.enrollment).
            what = {"enroll": "enrollment", "renew": "certificate renewal", "tunnel": "link"}.get(op, "request")
            if op in ("enroll", "renew"):
                metrics.ENROLLMENTS.labels(op, "error").inc()
            elif op == "tunnel":
                metrics.LISTENER_CONNECTIONS.labels("error").inc()
            if not isinstance(exc, RelaydError):
                metrics.INTERNAL_ERRORS.labels("agent_port").inc()
            # relayd's and the OS's messages name causes and paths, never what
            # the request carried; anything else is logged by type only.
            reason = str(exc) if isinstance(exc, (RelaydError, OSError)) else type(exc).__name__
            log.error("agent request failed: %s", reason, extra={"op": op or "unknown", "peer": peer})
            return wire.refusal_reply(wire.UNAVAILABLE, f"relay could not complete the {what}: internal error"), None

    async def _tunnel(self, req: wire.TunnelRequest, ident: tuple[str, int], peer: str) -> tuple[dict, asyncio.Protocol]:
        agent_id, serial = ident
        wanted = list(req.endpoints)
        record = await self.db("get_agent", agent_id)
        allowed = set(record["endpoints"]) if record else set()
        if allowed and not set(wanted) <= allowed:
            raise ForbiddenError(f"agent {agent_id} may not serve {sorted(set(wanted) - allowed)}")
        unknown = [e for e in wanted if e not in self.endpoints]
        conn = MuxConnection(False, self.mux, on_stream=functools.partial(self._on_agent_stream, agent_id),
                             name=agent_id)
        sess = AgentSession(agent_id, serial, [e for e in wanted if e in self.endpoints], conn, peer, offered=wanted)
        sess.control = control.ControlChannel(functools.partial(self.seam.open_control, sess))
        old = self.registry.add(sess)
        if old is not None:
            # The same agent authenticated again: its old link is stale.
            log.info("agent reconnected: replacing its previous link", extra={"agent": agent_id})
            self._set_status(old, connected=False)
            old.conn.abort()
        conn.closed_future.add_done_callback(lambda _f, s=sess: self._on_link_closed(s))
        metrics.LISTENER_CONNECTIONS.labels("success").inc()
        metrics.ACTIVE_LISTENERS.set(len(self.registry))
        self.count_endpoints()
        log.info("agent connected", extra={"agent": agent_id, "peer": peer, "endpoints": ",".join(sess.endpoints),
                                           "unknown_endpoints": ",".join(unknown)})
        self._set_status(sess, connected=True)
        for changed in self.on_link:
            changed(sess, True)
        return wire.ok_reply(agent_id=agent_id, unknown_endpoints=unknown, wss=self._wss()), conn

    def _on_link_closed(self, sess: AgentSession) -> None:
        if self.registry.get(sess.agent_id) is sess:
            self._unregister(sess)
            err = sess.conn.error  # protocol errors are counted by the connection
            log.info("agent disconnected", extra={"agent": sess.agent_id, "error": str(err) if err else None})

    def _unregister(self, sess: AgentSession) -> None:
        self.registry.remove(sess)
        metrics.ACTIVE_LISTENERS.set(len(self.registry))
        self.count_endpoints()
        self._set_status(sess, connected=False)
        for changed in self.on_link:
            changed(sess, False)

    def count_endpoints(self) -> None:
        """relayd_endpoint_agents for every configured endpoint, 0 included
        (the "endpoint without agent" alert); endpoints gone by a reload
        lose their series."""
        names = set(self.registry.by_endpoint)
        for name, sessions in self.registry.by_endpoint.items():
            metrics.ENDPOINT_AGENTS.labels(name).set(len(sessions))
        for gone in self._counted - names:
            metrics.ENDPOINT_AGENTS.remove(gone)
        self._counted = names

    # -- control streams ---------------------------------------------------------------

    async def push(self, agent_id: str, type_: str, **fields) -> bool:
        """Send one control message to a connected agent (over its control
        stream, opened on first use); False if it is not connected."""
        sess = self.registry.get(agent_id)
        if sess is None or sess.conn.closed:
            return False
        return await sess.control.send(type_, **fields)

    def on_control(self, type_: str, handler) -> None:
        """Call ``handler(agent_id, message)`` for each control message of
        ``type_`` an agent sends."""
        self.control_handlers[type_] = handler

    async def _on_agent_stream(self, agent: str, stream) -> None:
        """A stream an agent opened: control streams are taken, any other
        kind is refused (reset) and counted."""
        try:
            async with asyncio.timeout(10):
                header = StreamHeader.decode(await stream.read_message())
        except (RelaydError, asyncio.IncompleteReadError, TimeoutError) as exc:
            metrics.BAD_INPUT.labels("agent_link", "bad_stream_header").inc()
            _REFUSALS.warning("agent opened a stream without a valid header: %s", type(exc).__name__,
                              extra={"agent": agent})
            stream.reset()
            return
        if header.kind != KIND_CONTROL:
            metrics.BAD_INPUT.labels("agent_link", "stream_kind_refused").inc()
            stream.reset()
            return
        try:
            await control.receive(stream, functools.partial(self._dispatch_control, agent))
        except (RelaydError, asyncio.IncompleteReadError) as exc:
            metrics.BAD_INPUT.labels("agent_link", "bad_control_message").inc()
            _REFUSALS.warning("bad control message from an agent: %s", type(exc).__name__, extra={"agent": agent})
            stream.reset()

    def _dispatch_control(self, agent: str, kind: str, msg: dict) -> None:
        handler = self.control_handlers.get(kind)
        if handler is None:
            metrics.BAD_INPUT.labels("agent_link", "unknown_control_type").inc()
            return
        handler(agent, msg)

    # -- background ------------------------------------------------------------------

    def start(self) -> list[asyncio.Task]:
        loop = asyncio.get_running_loop()
        self.count_endpoints()
        return [loop.create_task(self._watch_revocations()), loop.create_task(self._write_status())]

    async def _watch_revocations(self) -> None:
        while True:
            await asyncio.sleep(REVOCATION_POLL)
            try:
                rev = await self.db("revision")
                if rev == self._revision:
                    continue
                self._revision = rev
                sessions = list(self.registry.sessions.values())
                revoked = await self.db.run(lambda store: [s for s in sessions
                                                           if store.is_revoked(s.agent_id, s.serial)])
                for sess in revoked:
                    log.warning("agent revoked: cutting its link", extra={"agent": sess.agent_id})
                    self._unregister(sess)
                    sess.conn.abort()
                for changed in self.on_revision:
                    await changed()
            except Exception:
                log.exception("revocation check failed")

    def _set_status(self, sess: AgentSession, connected: bool) -> None:
        """Connect/disconnect: written at once, in a worker thread."""
        if self._store_closed:
            return
        row = (sess.agent_id, sess.connected_since if connected else None, sess.address,
               sess.conn.bytes_in, sess.conn.bytes_out)
        task = asyncio.get_running_loop().create_task(self.db("set_agent_statuses", [row]))
        self._status_writes.add(task)
        task.add_done_callback(self._status_writes.discard)

    async def flush_status(self) -> None:
        """At stop: the status writes in flight, then every agent offline."""
        if self._status_writes:
            await asyncio.gather(*self._status_writes, return_exceptions=True)
        await self.db("set_agent_statuses", [(s.agent_id, None, s.address, s.conn.bytes_in, s.conn.bytes_out)
                                             for s in self.registry.sessions.values()])
        self._store_closed = True  # links that close after this are not written

    async def _write_status(self) -> None:
        # One transaction for all agents, off the event loop: the store
        # fsyncs every commit, and a loop stalled on disk stalls every link.
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            rows = [(s.agent_id, s.connected_since, s.address, s.conn.bytes_in, s.conn.bytes_out)
                    for s in self.registry.sessions.values()]
            try:
                await self.db("set_agent_statuses", rows)
                expiry = await self.db("connected_cert_expiry")
            except Exception:
                log.exception("status update failed")
                continue
            for kind in ("agent", "device"):
                if kind in expiry:
                    metrics.AGENT_CERT_EXPIRY.labels(kind).set(expiry[kind])
                else:
                    metrics.AGENT_CERT_EXPIRY.remove(kind)
