"""``relayd serve``: the relay node, as the composition root of its parts.

* the control plane: the data directory's store and CA
  (relayd.control.store, relayd.control.ca) and enrollment
  (relayd.control.enrollment);
* the agent registry (relayd.gateway.registry) and the one stream-open seam
  (relayd.gateway.streams) every way in goes through;
* the ways in, one module each: agents (relayd.gateway.agents: the agents
  port and the links), public TCP endpoints (relayd.gateway.tcp), and the
  HTTPS front door (relayd.net.wslink.HttpsPort, routing each request to the
  relay's own services or to HTTP endpoints through relayd.net.http_ingress);
* admission (relayd.net.admission) in front of every TLS listener;
* the REST API (relayd.control.api: ``/api/v1`` on the relay's own host
  names only, so that HTTP endpoints on other names keep that path) and the
  admin key it checks, made at the first start.

This module binds the listeners, wires the parts together, and stops them in
order: no new connections, GoAway on every link, a drain, then the cut.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import time
from pathlib import Path

import orjson

import relayd
from relayd import metrics
from relayd.config import ServeConfig, format_hostport
from relayd.control import admin, api, console, devicegw, deviceproxy, devices, est, provisioning, webhooks
from relayd.control.events import LocalBus
from relayd.control.redisbus import RedisBus
from relayd.control.ca import CertificateAuthority, cert_info, write_private
from relayd.control.enrollment import Enrollment
from relayd.control.store import AsyncStore, Store
from relayd.core import http1
from relayd.core.wire import KIND_HTTP
from relayd.errors import ConfigError, RelaydError
from relayd.gateway.adminview import NodeView
from relayd.gateway.agents import AgentPort
from relayd.gateway.certs import ChallengeHttp, HostCerts
from relayd.gateway.devicegw import DeviceLinks
from relayd.gateway.devicereg import DeviceRegistry
from relayd.gateway.deviceproxy import DeviceProxy
from relayd.gateway.registry import AgentRegistry, AgentSession
from relayd.gateway.streams import StreamSeam
from relayd.gateway.tcp import TcpEndpoints
from relayd.net import admission, tls
from relayd.control.hybrid import Catalog
from relayd.gateway.hybrid import HybridGateway
from relayd.gateway.zerotrust import ZtGateway
from relayd.net.http_ingress import HttpConnection, Route, RouteTable, buffered, parse_route
from relayd.net.preamble import ServerPreamble
from relayd.net.wslink import AGENT_PATH, HttpsPort, agent_link_service

log = logging.getLogger("relayd.relay")
#: The hybrid connections' listeners now, in the data directory (`relayd admin hc list`).
LISTENERS_FILE = admin.LISTENERS_FILE
#: The device proxy's token keys (a JWK set), on the relay's own names.
JWKS_PATH = "/.well-known/jwks.json"


def _cert_expiry(role: str, name: str, pem: bytes) -> None:
    """The expiry gauge of one of the relay's own certificates (the first of ``pem``)."""
    metrics.CERT_EXPIRY.labels(role, name).set(cert_info(pem)["not_after"].timestamp())


class RelayNode:
    """One relay process: agent listener, public endpoints, control plane."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg.validate()
        self.data = Path(cfg.data)
        self.store: Store | None = None
        self.db: AsyncStore | None = None
        self.ca: CertificateAuthority | None = None
        self.registry = AgentRegistry(cfg.endpoints)
        self.seam = StreamSeam(self.registry, cfg.grace)
        self.agent_port: AgentPort | None = None
        self.tcp: TcpEndpoints | None = None
        self.agents_port: int | None = None
        self.metrics_port: int | None = None
        self.https_port: int | None = None
        self.certs: tls.CertSelector | None = None
        self.host_certs: HostCerts | None = None  # ACME and per-host certificates, with the HTTPS port
        self.acme_http: ChallengeHttp | None = None  # the plain-HTTP listener of ACME's http-01
        self._servers: list[asyncio.AbstractServer] = []
        self._listeners: list[admission.TlsListener] = []
        self.admission: admission.Admission | None = None
        self._tasks: list[asyncio.Task] = []
        self.routes: RouteTable | None = None  # the HTTPS front door's
        self._agent_route: Route | None = None
        self.hybrid: HybridGateway | None = None  # with the HTTPS port
        self.zt: ZtGateway | None = None  # the zero-trust controller API and gateway, with the HTTPS port
        self.api: api.Api | None = None  # the REST API (/api/v1 on the relay's own names), with the HTTPS port
        self.console: console.Console | None = None  # the web console (/console/), with the HTTPS port
        # the device cloud's events (relayd.control.events): this process, or shared through Redis
        self.bus = LocalBus() if not cfg.redis else RedisBus(cfg.redis, "", cfg.redis_presence_ttl)
        self.devices: DeviceRegistry | None = None  # connection events, presence, claim codes
        self.user_auth: devices.UserAuth | None = None  # the device API's users, with the HTTPS port
        self.device_links: DeviceLinks | None = None  # device tokens and forwarded calls, with the HTTPS port
        self.provisioning: provisioning.Provisioning | None = None  # OTPs, with the HTTPS port
        self.est: est.EstServer | None = None  # /.well-known/est, with the HTTPS port
        self.webhooks: webhooks.WebhookResources | None = None  # /api/v1/webhooks, with the HTTPS port
        self.device_proxy: deviceproxy.ProxyResources | None = None  # POST /api/v1/token, with the HTTPS port
        self.proxy_gate: DeviceProxy | None = None  # /api/v1/devices/{id}/proxy/..., with the HTTPS port
        self.notifier: webhooks.Notifier | None = None  # events to webhooks, with the HTTPS port
        self._listeners_timer = None
        self._https_names: set[str] = set()  # serve.certs with a certificate expiry series
        self._stopping = False
        self.started_at: float | None = None
        self.stopped = asyncio.Event()

    @property
    def sessions(self) -> dict[str, AgentSession]:
        """Connected agents by id (the registry's)."""
        return self.registry.sessions

    @property
    def tcp_ports(self) -> dict[str, int]:
        return self.tcp.ports if self.tcp is not None else {}

    async def push(self, agent_id: str, type_: str, **fields) -> bool:
        """Send one control message to a connected agent (relayd.gateway.agents)."""
        return await self.agent_port.push(agent_id, type_, **fields)

    def on_control(self, type_: str, handler) -> None:
        """Call ``handler(agent_id, message)`` for each control message of
        ``type_`` an agent sends."""
        self.agent_port.on_control(type_, handler)

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
            _cert_expiry("ca", "", self.ca.cert_pem)
            _cert_expiry("server", names[0], chain)
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
        self._admin_key()
        self.db = AsyncStore(self.store)
        enrollment = Enrollment(self.db, self.ca, self.cfg.agent_cert_ttl, lambda: self.wss_address)
        self.agent_port = AgentPort(self.registry, self.seam, self.db, enrollment, self.cfg.mux,
                                    self.cfg.endpoints, lambda: self.wss_address)
        return tls.server_context(str(self.data / "server.crt"), str(self.data / "server.key"),
                                  client_ca=str(self.ca_path))

    def _admin_key(self) -> None:
        """At the first start: the admin API key, in a file only the relay's
        user reads (the database keeps its hash). Written before the hash,
        so that a failed write leaves no key nobody has."""
        from relayd.errors import DataDirError

        if self.store.has_admin_key():
            return
        key = api.new_admin_key()
        path = self.data / api.KEY_FILE
        try:
            write_private(path, (key + "\n").encode())
        except OSError as exc:
            self.store.close()
            self.store = None
            raise DataDirError(f"cannot write {path}: {exc.strerror}") from None
        if self.store.set_admin_key(key, only_if_absent=True):
            log.warning("admin API key created: it is in this file, readable by this user only; "
                        "move it somewhere safe (`relayd admin api-key rotate` makes a new one)",
                        extra={"file": str(path)})

    def relay_info(self) -> dict:
        """What `relayd admin` reads of the running relay (relay.json, and
        the admin API live: relayd.control.admin): the addresses agents dial
        (the real ports when bound to port 0), the node, and the endpoints."""
        adv = self.cfg.advertised
        if adv[1] == 0:
            adv = (adv[0], self.agents_port)
        info = {"advertised": format_hostport(adv), "hostname": self.cfg.hostname or adv[0], "node": self.node_name,
                "started_at": self.started_at}
        if self.wss_address:
            info["https"] = self.wss_address
        endpoints = [{"name": n, "kind": "tcp", "listen": format_hostport((h, self.tcp_ports.get(n, p)))}
                     for n, (h, p) in sorted(self.cfg.tcp.items())]
        endpoints += [{"name": n, "kind": "http", "route": r} for n, r in sorted(self.cfg.http.items())]
        endpoints += [{"name": n, "kind": "site"} for n in sorted(self.cfg.endpoints) if n.startswith("site:")]
        info["endpoints"] = endpoints
        return info

    def _write_relay_json(self) -> None:
        tmp = self.data / "relay.json.tmp"
        tmp.write_bytes(orjson.dumps(self.relay_info()))
        tmp.replace(self.data / "relay.json")

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
        self.started_at = time.time()
        ctx = self._prepare_data_dir()
        # Every listener is bound first, so that an address in use or not
        # local is one clear error before anything else starts.
        host, port = self.cfg.agents
        bound: list = []

        def bind(hp, what):
            socks = admission.bind(hp[0], hp[1], what, listen=False)
            bound.extend(socks)
            return socks

        try:
            agent_socks = bind(self.cfg.agents, "serve.agents")
            https_socks = bind(self.cfg.https, "serve.https") if self.cfg.https is not None else None
            tcp_socks = {name: bind(hp, f"serve.tcp.{name}") for name, hp in self.cfg.tcp.items()}
            metrics_socks = bind(self.cfg.metrics, "serve.metrics") if self.cfg.metrics is not None else None
            acme_socks = bind(self.cfg.acme.http_listen, "acme.http_listen") \
                if self.cfg.acme is not None and self.cfg.acme.http_listen is not None else None
            # relay.json before the first connection can be accepted: whoever
            # sees a port open may run `relayd admin join-token` at once.
            self.agents_port = agent_socks[0].getsockname()[1]
            self.https_port = https_socks[0].getsockname()[1] if https_socks else None
            self._write_relay_json()
            for sock in bound:
                sock.listen(1024)
        except BaseException:
            for sock in bound:
                sock.close()
            raise
        self._device_registry()
        await self.bus.start()
        adm = self.admission = admission.Admission(self.cfg.admission)
        preamble = functools.partial(ServerPreamble, self.agent_port.on_request,
                                     timeout=self.cfg.admission.preamble_timeout)
        lst = admission.TlsListener(adm, "agent_port", agent_socks, ctx, lambda ticket: preamble(ticket=ticket))
        self._listeners.append(lst)
        self.agents_port = lst.port
        if https_socks is not None:
            self._listeners.append(self._https_port(adm, https_socks, preamble))
            self.host_certs.start()
            if acme_socks is not None:
                self.acme_http = ChallengeHttp(self.host_certs, lambda: int(self.wss_address.rpartition(":")[2]), adm)
                await self.acme_http.serve(acme_socks)
        self.tcp = TcpEndpoints(self.seam, adm, self.cfg.splice)
        for name, socks in tcp_socks.items():
            await self.tcp.listen(name, socks)
        if metrics_socks is not None:
            for sock in metrics_socks:
                self._servers.append(await metrics.serve_metrics(sock, self.health))
            self.metrics_port = metrics_socks[0].getsockname()[1]
        self._tasks += self.agent_port.start()
        if self.zt is not None:
            self.zt.start()
        log.info("relay listening", extra={
            "agents": format_hostport((host, self.agents_port)),
            "endpoints": ",".join(f"{n}={format_hostport((h, self.tcp_ports[n]))}" for n, (h, _) in self.cfg.tcp.items()),
        })

    def _https_port(self, adm, socks, preamble) -> admission.TlsListener:
        """The HTTPS front door: each request routed on its own, to the
        relay's own services (the agent link, on any host name) or to the
        HTTP endpoints."""
        # Its own context, so user certificates (SNI) apply there only. Client
        # certificates of both CAs verify here: agents' (the agent link) and
        # users' (zero-trust sessions); each service checks that the one
        # presented comes from its own CA.
        from relayd.control.zerotrust import Controller, ZtConfig
        from relayd.control.ztstore import ZtStore

        controller = Controller(self.data, ZtStore(self.store), self.cfg.zerotrust or ZtConfig())
        _cert_expiry("user_ca", "", controller.user_ca.cert_pem)

        def https_context(cert: str, key: str | None = None) -> ssl.SSLContext:
            ctx = tls.server_context(cert, key, client_ca=str(self.ca_path))
            ctx.load_verify_locations(cadata=controller.user_ca.cert_pem.decode())
            return ctx

        hctx = https_context(str(self.data / "server.crt"), str(self.data / "server.key"))
        self.zt = ZtGateway(controller, self.seam, (self.cfg.zerotrust or ZtConfig()).site, self.ca.cert_pem)
        from relayd.control.ztapi import SCHEMAS, ZtResources

        self.api = api.Api(self.store.check_admin_key, relayd.__version__)
        self.api.add(ZtResources(controller).ops(), SCHEMAS)
        self.api.add(admin.AdminResources(self.store, self.ca, self.data, NodeView(self)).ops(), admin.SCHEMAS)
        self._device_gateway()
        self._user_api(controller)
        self._provisioning()
        self._console()
        try:
            self.certs = tls.CertSelector(hctx, [(str(c), str(k)) for c, k in self.cfg.certs], str(self.ca_path),
                                          https_context)
            self._https_cert_expiry()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config key 'serve.certs': cannot load a certificate ({exc})") from None
        self.host_certs = HostCerts(self.data, self.ca, self.certs, https_context,
                                    https_context(str(self.data / "server.crt"), str(self.data / "server.key")),
                                    self.cfg.acme)
        self.host_certs.set_names(self._names(), [parse_route(n, r).host for n, r in self.cfg.http.items()])
        self._agent_route = Route("", "*", AGENT_PATH, local=agent_link_service(preamble, self.cfg.websocket))
        self.hybrid = HybridGateway(Catalog.merged(self.cfg.hybrid, self.store.hc_catalog()), self._names(),
                                    self.cfg.hybrid_clock_skew)
        routes = self.routes = RouteTable(self._http_routes(self.cfg))
        self.agent_port.on_revision.append(self.hybrid_catalog_changed)
        self.hybrid.on_listeners = self._listeners_changed
        self._write_listeners()
        opener = functools.partial(self.seam.open, kind=KIND_HTTP)
        timeout, limits = self.cfg.gateway_timeout, self.cfg.http_limits
        return admission.TlsListener(
            adm, "https", socks, hctx,
            lambda ticket: HttpsPort(lambda port, t: HttpConnection(port, t, routes, opener, timeout, limits),
                                     ticket=ticket, limits=limits), chooser=self.host_certs)

    @property
    def node_name(self) -> str:
        """This relay among others (device events, presence): its name and agents port."""
        import socket

        return f"{self.cfg.hostname or socket.gethostname()}:{self.agents_port}"

    def _device_registry(self) -> None:
        """Device connection events, presence and claim codes
        (relayd.gateway.devicereg), on every link."""
        if isinstance(self.bus, RedisBus):
            self.bus.node = self.node_name
        self.devices = DeviceRegistry(self.db, self.bus, self.push, self.registry, self.node_name,
                                      devices.load_or_create_secret(self.data, devices.CLAIM_KEY_FILE))
        self.devices.start()
        self.agent_port.on_link.append(self.devices.link_changed)
        self.on_control("ack", self.devices.on_ack)

    def _user_api(self, controller) -> None:
        """The device API's users and devices (relayd.control.devices); its
        user authentication is the webhooks' and the device proxy's too."""
        store = devices.DeviceStore(self.store)
        providers = (self.cfg.zerotrust.providers if self.cfg.zerotrust is not None else {})
        self.user_auth = devices.UserAuth(store, providers,
                                          devicegw.load_or_create_key(self.data, devices.USER_KEY_FILE))
        res = devices.DeviceResources(store, self.user_auth, self.bus.publish, controller.check_local_user)
        self.api.add(res.ops(), devices.SCHEMAS)
        self.webhooks.user_auth = self.user_auth
        self.device_proxy.user_auth = self.user_auth

    def _device_gateway(self) -> None:
        """The device routes (relayd.control.devicegw) and the device
        tokens pushed down device tunnels (relayd.gateway.devicegw)."""
        tokens = devicegw.DeviceTokens(devicegw.load_or_create_key(self.data))
        gw = devicegw.DeviceGateway(self.store, self.ca, tokens, self.bus)
        self.api.add(gw.ops(), devicegw.SCHEMAS, {"deviceToken": {
            "type": "http", "scheme": "bearer", "bearerFormat": "JWS",
            "description": "The device token the relay pushes down a device's tunnel (or the device's client "
                           "certificate; or no credential through the agent's local forwarder)."}})
        self.device_links = DeviceLinks(self.push, self.db, self.api, tokens)
        self.agent_port.on_link.append(self.device_links.link_changed)
        self.on_control("device_api", self.device_links.on_call)
        hooks = webhooks.WebhookStore(self.store)
        self.webhooks = webhooks.WebhookResources(hooks)
        self.api.add(self.webhooks.ops(), webhooks.SCHEMAS, {"userToken": {
            "type": "http", "scheme": "bearer", "description": "A user's token (docs/device-cloud.md)."}})
        self.notifier = webhooks.Notifier(hooks, self.bus)
        self.notifier.start()
        self._device_proxy()

    def _device_proxy(self) -> None:
        """POST /api/v1/token and the JWK set (relayd.control.deviceproxy),
        and the proxy's gate (relayd.gateway.deviceproxy)."""
        tokens = deviceproxy.ProxyTokens(devicegw.load_or_create_key(self.data, deviceproxy.KEY_FILE),
                                         lambda: f"https://{self.wss_address}")
        self.device_proxy = deviceproxy.ProxyResources(self.store, tokens)
        self.api.add(self.device_proxy.ops(), deviceproxy.SCHEMAS, {"proxyToken": {
            "type": "http", "scheme": "bearer", "bearerFormat": "JWS",
            "description": "A proxy token from POST /api/v1/token (EdDSA; keys at /.well-known/jwks.json)."}})
        self.proxy_gate = DeviceProxy(tokens, functools.partial(deviceproxy.role_now, self.store),
                                      self.registry.get, self.seam.open)

    async def _jwks(self, head, body: bytes, ex):
        if head.method not in (b"GET", b"HEAD"):
            return http1.error_reply(405, "method_not_allowed", "this route takes GET, HEAD",
                                     ((b"Allow", b"GET, HEAD"),))
        return http1.json_reply(200, self.device_proxy.tokens.jwks(), ((b"Cache-Control", b"max-age=300"),))

    def _provisioning(self) -> None:
        """OTPs (relayd.control.provisioning: the /api/v1/admin/otps routes
        and NVIDIA's GET /admin/api/otp, /api/otp) and EST
        (relayd.control.est), both on the relay's own names only."""
        otps = provisioning.Otps(self.store)
        self.provisioning = provisioning.Provisioning(
            otps, self.store.check_admin_key, lambda: f"https://{self.wss_address}{est.PREFIX}", self.ca.pin,
            tuple(self.cfg.admin_allow))
        self.api.add(self.provisioning.ops(), provisioning.SCHEMAS)
        self.est = est.EstServer(self.store, self.ca, otps, self.cfg.agent_cert_ttl)

    def _console(self) -> None:
        """The web console (relayd.control.console): its pages, and its
        sessions in the admin API in place of the key."""
        def key_hash():
            rows = self.store.query("SELECT value FROM meta WHERE key = 'admin_api_sha256'")
            return rows[0][0] if rows else None

        self.console = console.Console(self.store.check_admin_key, key_hash, ())
        self.api.add(self.console.ops(), console.Console.SCHEMAS)
        self.api.accept_sessions(self.console.authorize, console.Console.SECURITY)

    async def _console_page(self, head, body: bytes, ex):
        return self.console.page(head.method.decode("latin-1"), head.target.decode("latin-1"), head, ex.client[0])

    async def _est_serve(self, head, body: bytes, ex):
        sslobj = ex.conn.transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        return await asyncio.to_thread(self.est.handle, head.method.decode("latin-1"), head.target.decode("latin-1"),
                                       head, body, ex.client[0], der)

    async def _nvidia_otp(self, head, body: bytes, ex):
        path = head.path.decode("latin-1").partition("?")[0]
        if path not in provisioning.NVIDIA_PATHS:
            return http1.error_reply(404, "not_found", "no such route")
        return await asyncio.to_thread(self.provisioning.nvidia, head.method.decode("latin-1"), head, ex.client[0])

    def _http_routes(self, cfg: ServeConfig) -> list[Route]:
        names = self._names()
        endpoints = [parse_route(name, r) for name, r in cfg.http.items()]
        for r in endpoints:
            if r.host in names and (r.prefix + "/").startswith(api.PREFIX + "/"):
                raise ConfigError(f"HTTP endpoint {r.endpoint}: {api.PREFIX} on {r.host} is the relay's own API")
            if r.host in names and api.PREFIX.startswith(r.prefix.rstrip("/") + "/") and r.prefix.rstrip("/"):
                # /api on the relay's own name: everything under it but /api/v1 goes to the endpoint.
                log.warning("HTTP endpoint %s: %s on %s is the relay's own API; the endpoint gets the rest of %s",
                            r.endpoint, api.PREFIX, r.host, r.prefix)
        # The device proxy and its key set on the relay's own names (the proxy
        # takes only /api/v1/devices/{id}/proxy/...; the API has the rest).
        jwks = buffered(self._jwks, 0)
        endpoints = [Route("device-proxy", host, "/api/v1/devices", gate=self.proxy_gate) for host in names] \
            + [Route("jwks", host, JWKS_PATH, serve=jwks) for host in names] + endpoints
        # The REST API on the relay's own names only: an HTTP endpoint on
        # another name keeps its /api/v1.
        serve = buffered(self.api.serve, api.MAX_BODY, too_large=self.api.too_large)
        # EST and NVIDIA's OTP paths on the relay's own names too: never an agent's.
        est_serve = buffered(self._est_serve, est.MAX_BODY, too_large=self.est.too_large)
        otp_serve = buffered(self._nvidia_otp, 4096)
        own = [Route("api", host, api.PREFIX, serve=serve) for host in names]
        own += [Route("est", host, est.PREFIX, serve=est_serve) for host in names]
        own += [Route("otp", host, p, serve=otp_serve) for host in names for p in provisioning.NVIDIA_PATHS]
        # The console on the relay's names that carry no HTTP endpoint: an
        # agent's pages must never share its origin (docs/console.md).
        shared = {r.host for r in endpoints if r.endpoint not in ("device-proxy", "jwks")}
        for host in sorted(shared & set(names)):
            log.warning("the web console is not served on %s: HTTP endpoints are there too", host)
        self.console.hosts = frozenset(n for n in names if n not in shared)
        page = buffered(self._console_page, 0, too_large=lambda head, ex: self.console.too_large(head, ex.client[0]))
        own += [Route("console", host, console.PATH, serve=page) for host in self.console.hosts]
        return [self._agent_route] + self.hybrid.routes() + self.zt.routes() + own + endpoints

    def _names(self) -> list[str]:
        """The relay's own host names: its certificate's, where its hybrid
        connections and services are (loopback names too when it listens
        there)."""
        names = []
        for n in (self.cfg.hostname, (self.cfg.advertised_https or ("", 0))[0], self.cfg.https[0]):
            if n and n not in ("0.0.0.0", "::") and n not in names:
                names.append(n.lower())
        if not names or any(n in ("127.0.0.1", "::1", "localhost") for n in names):
            names += [n for n in ("localhost", "127.0.0.1", "[::1]") if n not in names]
        return names

    def _listeners_changed(self) -> None:
        """A listener came or went: hybrid-listeners.json (what `relayd admin
        hc list` shows) is rewritten a moment later, once for a burst."""
        if self._listeners_timer is None:
            self._listeners_timer = asyncio.get_running_loop().call_later(0.2, self._write_listeners)

    def _write_listeners(self) -> None:
        self._listeners_timer = None
        path = self.data / LISTENERS_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_bytes(orjson.dumps(self.hybrid.listener_table()))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc.strerror)

    async def hybrid_catalog_changed(self) -> None:
        """The data directory's hybrid connections changed (`relayd admin
        hc`), or the config's did (reload)."""
        if self.hybrid is not None:
            self.hybrid.set_catalog(Catalog.merged(self.cfg.hybrid, await self.db("hc_catalog")))
            self.routes.replace(self._http_routes(self.cfg))  # HTTP mode: a route per hybrid connection

    async def reload(self, cfg: ServeConfig) -> None:
        """SIGHUP: take a new configuration's endpoints, routes and
        certificates without dropping anything established. Added TCP
        endpoints start listening; removed (or moved) ones stop accepting and
        their connections go on until they end; HTTP routes are swapped for
        the next request on every connection; connected agents serve what
        they offered of the new endpoints at once. A part that fails (an
        address in use, a certificate that does not load) keeps its old
        state and says so; the rest is applied."""
        old = self.cfg
        for key in ("agents", "https", "metrics", "data", "http_limits", "admission", "mux", "acme"):
            if getattr(cfg, key) != getattr(old, key):
                log.warning("reload: this setting needs a restart; keeping the running value", extra={"key": key})
                setattr(cfg, key, getattr(old, key))
        if self.routes is None and cfg.http:
            log.warning("reload: HTTP endpoints need the HTTPS port (serve.https) and a restart")
            cfg.http = {}
        for name, hp in old.tcp.items():
            if cfg.tcp.get(name) != hp:
                self.tcp.stop(name)
                log.info("reload: endpoint stops accepting", extra={"endpoint": name})
        for name, hp in list(cfg.tcp.items()):
            if old.tcp.get(name) == hp:
                continue
            try:
                socks = admission.bind(hp[0], hp[1], f"serve.tcp.{name}")
            except ConfigError as exc:
                log.error("reload: endpoint not started: %s", exc, extra={"endpoint": name})
                del cfg.tcp[name]
                continue
            await self.tcp.listen(name, socks)
            log.info("reload: endpoint listening", extra={"endpoint": name,
                                                          "address": format_hostport((hp[0], self.tcp.ports[name]))})
        if self.routes is not None and cfg.http != old.http:
            try:
                self.routes.replace(self._http_routes(cfg))
            except ConfigError as exc:
                log.error("reload: HTTP routes kept: %s", exc)
                cfg.http = old.http
        self.registry.set_endpoints(cfg.endpoints)
        self.agent_port.endpoints = cfg.endpoints
        self.agent_port.count_endpoints()
        if cfg.hybrid != old.hybrid or cfg.hybrid_clock_skew != old.hybrid_clock_skew:
            self.cfg = cfg
            if self.hybrid is not None:
                self.hybrid.clock_skew = cfg.hybrid_clock_skew
            await self.hybrid_catalog_changed()
        if self.certs is not None and cfg.certs != old.certs:
            self.certs.pairs = [(str(c), str(k)) for c, k in cfg.certs]
        self.cfg = cfg
        if not self.reload_certs() and self.certs is not None:
            self.certs.pairs = [(str(c), str(k)) for c, k in old.certs]
            cfg.certs = old.certs
        if self.host_certs is not None:
            self.host_certs.set_names(self._names(), [parse_route(n, r).host for n, r in cfg.http.items()])
        try:
            self._write_relay_json()  # the endpoints `relayd admin endpoints --data` lists
        except OSError as exc:
            log.warning("reload: cannot write relay.json: %s", exc.strerror)
        log.info("configuration reloaded", extra={"endpoints": ",".join(sorted(cfg.endpoints))})

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
        self._https_cert_expiry()
        return True

    def health(self) -> tuple[bool, dict]:
        """Whether this node serves (``GET /healthz`` on the metrics
        listener; the container image's HEALTHCHECK): started, not stopping,
        its database open and every TLS listener accepting (not closed, not
        paused for want of file descriptors)."""
        problems = []
        if self._stopping:
            problems.append("stopping")
        if self.store is None:
            problems.append("database closed")
        if not self._listeners:
            problems.append("not started")
        problems += [f"{lst.name}: not accepting" for lst in self._listeners if not lst.serving]
        detail = {"status": "unavailable" if problems else "ok", "agents": len(self.sessions)}
        if problems:
            detail["problems"] = problems
        return not problems, detail

    def _https_cert_expiry(self) -> None:
        """relayd_certificate_expiry_timestamp_seconds of the HTTPS port's
        certificates (serve.certs): one series each, by the name it gives."""
        seen = set()
        for cert, _key in self.certs.pairs:
            try:
                pem = Path(cert).read_bytes()
                name = cert_info(pem)["common_name"] or Path(cert).name
            except (OSError, RelaydError):
                continue  # the selector has just loaded it: an edit in between; the next reload tells
            _cert_expiry("https", name, pem)
            seen.add(name)
        for name in self._https_names - seen:
            metrics.CERT_EXPIRY.remove("https", name)
        self._https_names = seen

    async def stop(self, drain: float = 0.0) -> None:
        """Stop accepting, send every agent link GoAway, let open streams
        finish for up to ``drain`` seconds, then close; what is still open
        then is cut (reset)."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        self.seam.close()
        if self.hybrid is not None:
            self.hybrid.stop()
            self._write_listeners()
        if self.zt is not None:
            self.zt.stop()
        if self.device_links is not None:
            self.device_links.stop()
        if self.notifier is not None:
            self.notifier.stop()
        if self.devices is not None:
            self.devices.stop()
        for lst in self._listeners:
            lst.close()
        for s in self._servers:
            s.close()
        if self.host_certs is not None:
            self.host_certs.stop()
        if self.acme_http is not None:
            self.acme_http.close()
        if self.tcp is not None:
            self.tcp.close()
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
        if self.tcp is not None:
            self.tcp.abort_all()
        for conn in links:
            conn.abort()
        for s in self._servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass
        if self.tcp is not None:
            await self.tcp.wait_closed()
        await self.bus.stop()
        if self.store is not None:
            await self.agent_port.flush_status()
            self.store.close()
            self.store = None
        self.stopped.set()
