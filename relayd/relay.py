"""``relayd serve``: the relay node.

Agents dial in over TLS on the agents port. One listener serves four
requests (see relayd.net.preamble): ``ca`` (bootstrap: the CA certificate,
whose pin the agent checks against its join token), ``enroll`` (join token +
CSR -> certificate), ``renew`` (current certificate + CSR -> new
certificate) and ``tunnel`` (mTLS; the link becomes a yamux session).

Each public TCP endpoint is a listener; every connection to it becomes one
yamux stream to an agent serving that endpoint, opened by the gateway's
stream seam (relayd.gateway.streams: agent choice, grace period, header,
metrics), then spliced with back-pressure (relayd.net.splice). HTTP
endpoints open their streams through the same seam.

The control plane (SQLite store, CA) is consulted when a link or stream
opens, never per byte. Revocations are noticed by polling the store's
revision counter, so ``relayd admin revoke-agent`` from another process cuts
a live link within a second.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import ssl
from pathlib import Path

import orjson

from relayd import metrics
from relayd.config import ServeConfig, format_hostport
from relayd.control.ca import CertificateAuthority, cert_info, write_private
from relayd.control.store import Store
from relayd.core import wire
from relayd.core.wire import KIND_CONTROL, KIND_HTTP, StreamHeader
from relayd.errors import AuthError, ConfigError, ForbiddenError, RelaydError, RevokedError
from relayd.gateway.registry import AgentRegistry, AgentSession
from relayd.gateway.streams import StreamSeam
from relayd.log import RateLimitedLog
from relayd.net import admission, control, peer_name, tls
from relayd.net.mux import MuxConnection
from relayd.net.preamble import ServerPreamble
from relayd.net.splice import TcpSplice
from relayd.net.http_ingress import HttpConnection, Route, parse_route
from relayd.net.wslink import AGENT_PATH, HttpsPort, agent_link_service

log = logging.getLogger("relayd.relay")
# Refusals anyone can cause at will: rate-limited lines (every one is counted).
_REFUSALS = RateLimitedLog(log)

REVOCATION_POLL = 0.5
STATUS_INTERVAL = 2.0


class RelayNode:
    """One relay process: agent listener, public endpoints, control plane."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg.validate()
        self.data = Path(cfg.data)
        self.store: Store | None = None
        self.ca: CertificateAuthority | None = None
        self.registry = AgentRegistry(cfg.endpoints)
        self.seam = StreamSeam(self.registry, cfg.grace)
        self.agents_port: int | None = None
        self.tcp_ports: dict[str, int] = {}
        self.metrics_port: int | None = None
        self.https_port: int | None = None
        self.certs: tls.CertSelector | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._listeners: list[admission.TlsListener] = []
        self.admission: admission.Admission | None = None
        self._tasks: list[asyncio.Task] = []
        self._public: set[TcpSplice] = set()
        self._revision = -1
        self._status_writes: set[asyncio.Task] = set()
        self._active_children: dict[str, object] = {}
        self.control_handlers: dict = {}  # control message type -> handler (on_control)
        self.stopped = asyncio.Event()

    @property
    def sessions(self) -> dict[str, AgentSession]:
        """Connected agents by id (the registry's)."""
        return self.registry.sessions

    @property
    def by_endpoint(self) -> dict[str, list[AgentSession]]:
        return self.registry.by_endpoint

    # -- life cycle -----------------------------------------------------------

    def _prepare_data_dir(self) -> ssl.SSLContext:
        from relayd.control.store import open_data_dir
        from relayd.errors import DataDirError

        # The CA and the database, checked to belong together: never start on
        # a database that would refuse every agent the CA enrolled.
        self.ca, self.store = open_data_dir(self.data, create=True)
        target = self.data
        try:
            self.store.clear_all_status()
            names = ["localhost", "127.0.0.1", "::1"]
            adv_host = self.cfg.advertised[0]
            for n in (self.cfg.hostname, adv_host, self.cfg.agents[0]):
                if n and n not in ("0.0.0.0", "::") and n not in names:
                    names.insert(0, n)
            chain, key = self.ca.issue_server_cert(names)
            target = self.data / "server.crt"
            target.write_bytes(chain)
            target = self.data / "server.key"
            write_private(target, key)
        except BaseException as exc:
            self.store.close()
            self.store = None
            if isinstance(exc, OSError):
                raise DataDirError(f"cannot write {target}: {exc.strerror}") from None
            raise
        return tls.server_context(str(self.data / "server.crt"), str(self.data / "server.key"),
                                  client_ca=str(self.ca_path))

    def _write_relay_json(self) -> None:
        """What `relayd admin join-token` needs: the addresses agents dial
        (the real ports when bound to port 0)."""
        adv = self.cfg.advertised
        if adv[1] == 0:
            adv = (adv[0], self.agents_port)
        info = {"advertised": format_hostport(adv), "hostname": self.cfg.hostname or adv[0]}
        if self.wss_address:
            info["https"] = self.wss_address
        (self.data / "relay.json").write_bytes(orjson.dumps(info))

    @property
    def wss_address(self) -> str | None:
        hp = self.cfg.advertised_https
        if hp is None:
            return None
        return format_hostport((hp[0], self.https_port if hp[1] == 0 and self.https_port else hp[1]))

    @property
    def ca_path(self) -> Path:
        return self.data / "ca" / "ca.crt"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = self._prepare_data_dir()
        # Every listener is bound first, so that an address in use or not
        # local is one clear error before anything else starts.
        host, port = self.cfg.agents
        bound: list = []

        def bind(hp, what):
            socks = admission.bind(hp[0], hp[1], what)
            bound.extend(socks)
            return socks

        try:
            agent_socks = bind(self.cfg.agents, "serve.agents")
            https_socks = bind(self.cfg.https, "serve.https") if self.cfg.https is not None else None
            tcp_socks = {name: bind(hp, f"serve.tcp.{name}") for name, hp in self.cfg.tcp.items()}
            metrics_socks = bind(self.cfg.metrics, "serve.metrics") if self.cfg.metrics is not None else None
        except BaseException:
            for sock in bound:
                sock.close()
            raise
        adm = self.admission = admission.Admission(self.cfg.admission)
        lst = admission.TlsListener(adm, "agent_port", agent_socks, ctx,
                                    lambda ticket: ServerPreamble(self._on_request, ticket=ticket))
        self._listeners.append(lst)
        self.agents_port = lst.port
        if https_socks is not None:
            # Agents that can only get HTTPS out: the link as a WebSocket.
            # Its own context, so user certificates (SNI) apply there only.
            hctx = tls.server_context(str(self.data / "server.crt"), str(self.data / "server.key"),
                                      client_ca=str(self.ca_path))
            try:
                self.certs = tls.CertSelector(hctx, [(str(c), str(k)) for c, k in self.cfg.certs],
                                              str(self.ca_path))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"config key 'serve.certs': cannot load a certificate ({exc})") from None
            # Each request is routed on its own: the relay's own services
            # (the agent link on any host name), then the HTTP endpoints.
            routes = [Route("", "*", AGENT_PATH, local=agent_link_service(lambda: ServerPreamble(self._on_request)))]
            routes += [parse_route(name, r) for name, r in self.cfg.http.items()]
            opener = functools.partial(self.seam.open, kind=KIND_HTTP)
            hs = admission.TlsListener(
                adm, "https", https_socks, hctx,
                lambda ticket: HttpsPort(lambda port, t: HttpConnection(port, t, routes, opener,
                                                                         self.cfg.gateway_timeout), ticket=ticket))
            self._listeners.append(hs)
            self.https_port = hs.port
        self._write_relay_json()
        for name, socks in tcp_socks.items():
            for sock in socks:
                srv = await loop.create_server(lambda name=name: self._public_protocol(name), sock=sock,
                                               backlog=1024)
                self._servers.append(srv)
            self.tcp_ports[name] = socks[0].getsockname()[1]
        if metrics_socks is not None:
            for sock in metrics_socks:
                self._servers.append(await metrics.serve_metrics(sock))
            self.metrics_port = metrics_socks[0].getsockname()[1]
        self._tasks.append(loop.create_task(self._watch_revocations()))
        self._tasks.append(loop.create_task(self._write_status()))
        log.info("relay listening", extra={
            "agents": format_hostport((host, self.agents_port)),
            "endpoints": ",".join(f"{n}={format_hostport((h, self.tcp_ports[n]))}" for n, (h, _) in self.cfg.tcp.items()),
        })

    def reload_certs(self) -> bool:
        """SIGHUP: re-read the HTTPS port's certificates. Established
        connections keep theirs; a file that fails to load keeps the old set."""
        if self.certs is None:
            return False
        try:
            names = self.certs.reload()
        except (OSError, ValueError) as exc:
            metrics.BAD_INPUT.labels("config", "cert_reload").inc()
            log.error("certificate reload failed, keeping the previous certificates: %s", exc)
            return False
        log.info("certificates reloaded", extra={"names": ",".join(sorted(names))})
        return True

    async def stop(self, drain: float = 0.0) -> None:
        """Stop accepting, send every agent link GoAway, let open streams
        finish for up to ``drain`` seconds, then close; what is still open
        then is cut (reset)."""
        for t in self._tasks:
            t.cancel()
        self.seam.close()
        for lst in self._listeners:
            lst.close()
        for s in self._servers:
            s.close()
        links = [sess.conn for sess in self.sessions.values()]
        for conn in links:
            conn.go_away()
        if drain > 0 and links:
            busy = sum(c.stream_count() for c in links)
            log.info("draining: no new streams, open ones may finish",
                     extra={"streams": busy, "drain_s": drain})
            done = await asyncio.gather(*(c.drained(drain) for c in links))
            left = sum(c.stream_count() for c, ok in zip(links, done) if not ok)
            log.info("drained" if not left else "drain time over: cutting what is left", extra={"streams": left})
        for sp in list(self._public):
            sp._abort()
        for conn in links:
            conn.abort()
        for s in self._servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass
        if self._status_writes:
            await asyncio.gather(*self._status_writes, return_exceptions=True)
        if self.store is not None:
            await self._flush_status()
            self.store.close()
            self.store = None
        self.stopped.set()

    # -- agent port ---------------------------------------------------------------

    async def _on_request(self, msg: dict, transport) -> tuple[dict, asyncio.Protocol | None]:
        op = msg.get("op")
        if op not in wire.REQUESTS:
            op = None  # attacker text: never logged, never echoed
        peer = peer_name(transport)
        try:
            req = wire.decode_request(msg)
            if isinstance(req, wire.CaRequest):
                return wire.ok_reply(ca=self.ca.cert_pem.decode(), wss=self.wss_address), None
            if isinstance(req, wire.EnrollRequest):
                return await self._enroll(req, peer), None
            ident = await self._peer_identity(transport)
            if isinstance(req, wire.RenewRequest):
                return await self._renew(req, ident, peer), None
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
            # so its join token is still valid (see _enroll).
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

    async def _db(self, fn, *args):
        """Every store call goes through here: in a worker thread, never on
        the event loop (a write fsyncs, and a loop stalled on the disk stalls
        every link)."""
        return await asyncio.to_thread(fn, *args)

    async def _peer_identity(self, transport) -> tuple[str, int]:
        sslobj = transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            raise AuthError("this request needs the agent's client certificate")
        info = cert_info(der)
        agent_id = info.get("agent_id") or info.get("common_name")
        if not agent_id:
            raise AuthError("client certificate names no agent")
        if await self._db(self.store.is_revoked, agent_id, info["serial"]):
            raise RevokedError(f"agent {agent_id}: certificate revoked or unknown")
        return agent_id, info["serial"]

    async def _enroll(self, req: wire.EnrollRequest, peer: str) -> dict:
        token_id, secret, csr = req.token_id, req.secret, req.csr
        # The token is checked before the CA signs anything for this peer, and
        # spent in the transaction that records the agent: a refusal (a bad
        # CSR) or a failure (a full disk) on the way leaves it valid.
        await self._db(self.store.check_join_token, token_id, secret)
        agent_id = "ag-" + secrets.token_hex(6)
        cert = self.ca.sign_agent_csr(csr.encode(), agent_id, days=self.cfg.agent_cert_ttl / 86400)
        info = cert_info(cert)
        endpoints = await self._db(self.store.enroll_agent, token_id, secret, agent_id, info["serial"],
                                            info["not_after"].timestamp())
        metrics.ENROLLMENTS.labels("enroll", "success").inc()
        log.info("agent enrolled", extra={"agent": agent_id, "peer": peer, "allowed": ",".join(endpoints) or "*"})
        return wire.ok_reply(agent_id=agent_id, cert=cert.decode(), ca=self.ca.cert_pem.decode(), wss=self.wss_address)

    async def _renew(self, req: wire.RenewRequest, ident: tuple[str, int], peer: str) -> dict:
        agent_id, _ = ident
        csr = req.csr
        cert = self.ca.sign_agent_csr(csr.encode(), agent_id, days=self.cfg.agent_cert_ttl / 86400)
        info = cert_info(cert)
        await self._db(self.store.update_agent_cert, agent_id, info["serial"], info["not_after"].timestamp())
        metrics.ENROLLMENTS.labels("renew", "success").inc()
        log.info("agent certificate renewed", extra={"agent": agent_id, "peer": peer})
        return wire.ok_reply(cert=cert.decode())

    async def _tunnel(self, req: wire.TunnelRequest, ident: tuple[str, int], peer: str) -> tuple[dict, asyncio.Protocol]:
        agent_id, serial = ident
        wanted = list(req.endpoints)
        record = await self._db(self.store.get_agent, agent_id)
        allowed = set(record["endpoints"]) if record else set()
        if allowed and not set(wanted) <= allowed:
            raise ForbiddenError(f"agent {agent_id} may not serve {sorted(set(wanted) - allowed)}")
        unknown = [e for e in wanted if e not in self.cfg.endpoints]
        conn = MuxConnection(False, self.cfg.mux, on_stream=functools.partial(self._on_agent_stream, agent_id),
                             name=agent_id)
        sess = AgentSession(agent_id, serial, [e for e in wanted if e in self.cfg.endpoints], conn, peer)
        sess.control = control.ControlChannel(functools.partial(self.seam.open_control, sess))
        old = self.registry.add(sess)
        if old is not None:
            # The same agent authenticated again: its old link is stale.
            log.info("agent reconnected: replacing its previous link", extra={"agent": agent_id})
            self._set_status(old, connected=False)
            old.conn.abort()
        conn.closed_future.add_done_callback(lambda _f, s=sess: self._on_link_closed(s))
        metrics.LISTENER_CONNECTIONS.labels("success").inc()
        metrics.ACTIVE_LISTENERS.set(len(self.sessions))
        metrics.AGENT_ONLINE.labels(agent_id).set(1)
        log.info("agent connected", extra={"agent": agent_id, "peer": peer, "endpoints": ",".join(sess.endpoints),
                                           "unknown_endpoints": ",".join(unknown)})
        self._set_status(sess, connected=True)
        return wire.ok_reply(agent_id=agent_id, unknown_endpoints=unknown, wss=self.wss_address), conn

    def _on_link_closed(self, sess: AgentSession) -> None:
        if self.sessions.get(sess.agent_id) is sess:
            self._unregister(sess)
            err = sess.conn.error  # protocol errors are counted by the connection
            log.info("agent disconnected", extra={"agent": sess.agent_id, "error": str(err) if err else None})

    def _unregister(self, sess: AgentSession) -> None:
        if self.registry.remove(sess):
            metrics.AGENT_ONLINE.labels(sess.agent_id).set(0)
        metrics.ACTIVE_LISTENERS.set(len(self.registry))
        self._set_status(sess, connected=False)

    # -- public endpoints -------------------------------------------------------------

    def _public_protocol(self, endpoint: str) -> TcpSplice:
        return PublicConnection(self, endpoint)

    def _route(self, sp: PublicConnection, endpoint: str) -> None:
        self._public.add(sp)
        self._active_gauge(endpoint).inc()
        sp.opening = self.seam.open(endpoint, peer_name(sp.transport), sp.stream_ready)

    def _public_closed(self, sp: PublicConnection) -> None:
        self._public.discard(sp)
        self._active_gauge(sp.endpoint).dec()
        if sp.opening is not None:  # gone while held for an agent
            sp.opening.cancel()
            sp.opening = None

    def _active_gauge(self, endpoint: str):
        g = self._active_children.get(endpoint)
        if g is None:
            g = self._active_children[endpoint] = metrics.ACTIVE_CONNECTIONS.labels(endpoint)
        return g

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

    async def _watch_revocations(self) -> None:
        while True:
            await asyncio.sleep(REVOCATION_POLL)
            try:
                rev = await self._db(self.store.revision)
                if rev == self._revision:
                    continue
                self._revision = rev
                sessions = list(self.sessions.values())
                revoked = await self._db(
                    lambda: [s for s in sessions if self.store.is_revoked(s.agent_id, s.serial)])
                for sess in revoked:
                    log.warning("agent revoked: cutting its link", extra={"agent": sess.agent_id})
                    self._unregister(sess)
                    sess.conn.abort()
            except Exception:
                log.exception("revocation check failed")

    def _set_status(self, sess: AgentSession, connected: bool) -> None:
        """Connect/disconnect: written at once, in a worker thread."""
        if self.store is None:
            return
        row = (sess.agent_id, sess.connected_since if connected else None, sess.address,
               sess.conn.bytes_in, sess.conn.bytes_out)
        task = asyncio.get_running_loop().create_task(self._db(self.store.set_agent_statuses, [row]))
        self._status_writes.add(task)
        task.add_done_callback(self._status_writes.discard)

    async def _flush_status(self) -> None:
        await self._db(self.store.set_agent_statuses,
                       [(s.agent_id, None, s.address, s.conn.bytes_in, s.conn.bytes_out)
                        for s in self.sessions.values()])

    async def _write_status(self) -> None:
        # One transaction for all agents, off the event loop: the store
        # fsyncs every commit, and a loop stalled on disk stalls every link.
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            rows = [(s.agent_id, s.connected_since, s.address, s.conn.bytes_in, s.conn.bytes_out)
                    for s in self.sessions.values()]
            try:
                await self._db(self.store.set_agent_statuses, rows)
            except Exception:
                log.exception("status update failed")


class PublicConnection(TcpSplice):
    """A client of a public endpoint; routed to an agent once connected."""

    def __init__(self, relay: RelayNode, endpoint: str) -> None:
        super().__init__(on_close=relay._public_closed)
        self.relay = relay
        self.endpoint = endpoint
        self.opening = None  # the stream seam's Opening while held for an agent

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if admission.public_connection_ok(self.relay.admission, transport, "tcp"):
            self.relay._route(self, self.endpoint)
        else:
            self.on_close = None  # never routed: nothing to account for

    def stream_ready(self, stream, reason) -> None:
        """The stream seam's answer: splice, or reset the client."""
        self.opening = None
        if stream is None:
            self._abort()
        elif self._done:
            stream.reset()  # the client left meanwhile
        else:
            self.bind(stream)
