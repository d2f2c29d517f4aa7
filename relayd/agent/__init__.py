"""``relayd agent``: dials out to the relay and serves its endpoints.

First start, with a join token: fetch the relay's CA certificate over TLS,
check its SHA-256 against the pin in the token (a mismatch aborts), generate
a key pair locally, then over TLS verified against that CA send the token's
secret with a CSR and store the certificate the relay's CA signed. The
private key never leaves this machine.

From then on: mTLS to the relay, a ``tunnel`` request naming the endpoints,
and a yamux session over which the relay opens one stream per public
connection. Each stream starts with a typed header (relayd.core.wire: version,
kind, endpoint, trace id, caller); for a tcp or http stream the agent dials
that endpoint's local service and splices, a control stream carries messages
the relay pushes. Keepalive pings detect a dead
link; reconnects back off exponentially with full jitter. The certificate
renews itself when two thirds of its lifetime have passed, over a separate
connection, so traffic never stops for it.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import hmac
import logging
import random
import re
import ssl
import time
from pathlib import Path

import orjson
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from relayd import metrics
from relayd.config import AgentConfig, format_hostport, parse_hostport
from relayd.control.ca import UNREADABLE, cert_info, generate_key_and_csr, pin_of, write_private
from relayd.control.jointoken import JoinToken
from relayd.core import wire
from relayd.core.wire import KIND_CONTROL, KIND_DIAL, KIND_PACKETS, StreamHeader, VersionMismatch
from relayd.core.framing import FramingError
from relayd.errors import AuthError, ConfigError, RelaydError, TemporaryError
from relayd.net import control, tls
from relayd.net.mux import MuxConnection, MuxStream
from relayd.net.preamble import ClientPreamble
from relayd.net.proxy import connect_via_proxy, parse_proxy_url, proxy_from_env
from relayd.net.wslink import ClientUpgrade
from relayd.net.splice import TcpSplice

log = logging.getLogger("relayd.agent")

STABLE_AFTER = 10.0  # a link that lived this long resets the backoff


class EnrollmentError(AuthError):
    """The relay refused the enrollment (bad, spent or expired token, CA pin
    mismatch); the message says why. The same token will not do better."""


class EnrollmentUnavailable(TemporaryError):
    """Enrollment did not complete: the relay could not be reached, or failed
    on its side. The relay spends a token only with a completed enrollment:
    try again with the same token while it is valid."""


class AgentNode:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg.validate()
        self.data = Path(cfg.data)
        self.identity: dict | None = None
        self.conn: MuxConnection | None = None
        self.connected = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._renew_task: asyncio.Task | None = None
        self.reconnects = 0
        self.streams_served = 0
        self.site_tun = None  # relayd.agent.sitetun.SiteTun, on the first packet stream
        self.control_handlers: dict = {}  # control message type -> handler (on_control)
        self._control_out = control.ControlChannel(self._open_control)  # ours to the relay (push)
        #: The device token the relay pushed (a device only; kept in memory,
        #: never written), its expiry (RFC 3339), and the local forwarder.
        self.device_token: str | None = None
        self.device_token_expires: str | None = None
        self.control_handlers["device_token"] = self._on_device_token
        self.control_handlers["claim_code"] = self._on_claim_code
        self.control_handlers["claimed"] = self._on_claimed
        self.device_api = None
        # Back-end TLS contexts, built once: (context, server name).
        self._backend_tls = {
            name: (b.context(), b.server_name or cfg.endpoints[name][0])
            for name, b in cfg.backend_tls.items()
        }

    # -- identity ------------------------------------------------------------------

    @property
    def _id_file(self) -> Path:
        return self.data / "identity.json"

    def load_identity(self) -> dict | None:
        try:
            ident = orjson.loads(self._id_file.read_bytes())
        except FileNotFoundError:
            return None
        except orjson.JSONDecodeError:
            raise ConfigError(f"{self._id_file} is corrupt; remove the agent data directory and enroll again") from None
        for f in ("agent.key", "agent.crt", "ca.crt"):
            if not (self.data / f).exists():
                raise ConfigError(f"{self.data / f} is missing; remove the agent data directory and enroll again")
        return ident

    def _proxy(self, host: str):
        if self.cfg.proxy:
            return parse_proxy_url(self.cfg.proxy, "agent.proxy")
        return proxy_from_env(host)

    async def _dial(self, factory, addr: str, ctx, server_hostname: str | None, websocket: bool):
        """TLS to ``addr`` (directly or through the forward proxy); with
        ``websocket`` the link then becomes a WebSocket at /.relayd/agent."""
        host, port = parse_hostport(addr, "relay address")
        server_hostname = server_hostname or host
        loop = asyncio.get_running_loop()
        proxy = self._proxy(host)
        upgrade = ClientUpgrade(factory(), addr, self.cfg.websocket) if websocket else None
        proto_factory = (lambda: upgrade) if websocket else factory
        async with asyncio.timeout(self.cfg.connect_timeout):
            if proxy is None:
                transport, _ = await loop.create_connection(proto_factory, host, port, ssl=ctx,
                                                            server_hostname=server_hostname)
            else:
                sock = await connect_via_proxy(proxy, host, port, self.cfg.connect_timeout)
                transport, _ = await loop.create_connection(proto_factory, sock=sock, ssl=ctx,
                                                            server_hostname=server_hostname)
            if upgrade is not None:
                try:
                    await upgrade.done
                except BaseException:
                    transport.abort()
                    raise
        return transport

    async def _connect(self, factory, tls_addr: str | None, wss_addr: str | None, ctx,
                       server_hostname: str | None = None):
        """Dial the relay as --transport says: tls, wss, or auto (TLS first,
        then the WebSocket link when TLS to the agents port fails)."""
        mode = self.cfg.transport
        # A device enrolled over EST knows only the HTTPS port: the WebSocket link.
        if mode == "wss" or tls_addr is None:
            if wss_addr is None:
                raise ConfigError("--transport wss: this agent knows no WebSocket address of the relay "
                                  "(enroll with a token from `relayd admin join-token --transport wss`)")
            return await self._dial(factory, wss_addr, ctx, server_hostname, True)
        try:
            return await self._dial(factory, tls_addr, ctx, server_hostname, False)
        except (OSError, asyncio.TimeoutError) as exc:
            if mode != "auto" or wss_addr is None:
                raise
            log.info("TLS to the agents port failed; trying the WebSocket link",
                     extra={"error": str(exc) or type(exc).__name__, "wss": wss_addr})
            return await self._dial(factory, wss_addr, ctx, server_hostname, True)

    def _stored_pin(self) -> str:
        try:
            der = x509.load_pem_x509_certificate((self.data / "ca.crt").read_bytes()).public_bytes(Encoding.DER)
        except (OSError, ValueError):
            return ""
        return pin_of(der)

    async def enroll(self, token_text: str) -> dict:
        """Join the relay named in the token; store and return the identity."""
        token = JoinToken.decode(token_text)
        host, _ = parse_hostport(token.address, "join token address")
        # The token names where to dial; --transport says how.
        wss = self.cfg.transport == "wss"
        tls_addr, wss_addr = (None, token.address) if wss else (token.address, None)

        async def ask(ctx, request: dict) -> dict:
            pre = ClientPreamble(request)
            try:
                transport = await self._connect(lambda: pre, tls_addr, wss_addr, ctx, host)
            except (OSError, asyncio.TimeoutError) as exc:
                raise EnrollmentUnavailable(f"cannot reach the relay at {token.address}: "
                                            f"{str(exc) or type(exc).__name__}") from None
            try:
                reply = await asyncio.wait_for(pre.reply, self.cfg.connect_timeout)
            except (OSError, asyncio.TimeoutError, FramingError) as exc:
                raise EnrollmentUnavailable(f"the relay at {token.address} did not answer: "
                                            f"{str(exc) or type(exc).__name__}") from None
            finally:
                transport.close()
            try:
                return wire.check_reply(reply)
            except wire.Refusal as exc:
                if exc.retry:
                    # The relay failed, it did not refuse: nothing was spent.
                    raise EnrollmentUnavailable(f"{exc}; the join token was not used: try again later") from None
                raise EnrollmentError(f"enrollment refused ({exc.code}): {exc}") from None
            except wire.VersionMismatch as exc:
                raise EnrollmentError(str(exc)) from None

        # 1. Whose CA is this? Nothing secret is sent on this connection.
        reply = await ask(tls.unverified_client_context(), wire.CaRequest())
        ca_pem = reply.get("ca")
        if not isinstance(ca_pem, str):
            raise EnrollmentError("the relay did not send its CA certificate")
        try:
            ca_der = x509.load_pem_x509_certificate(ca_pem.encode()).public_bytes(Encoding.DER)
        except UNREADABLE:
            raise EnrollmentError("the relay sent an unreadable CA certificate") from None
        self._check_pin(ca_der, token.pin, token.address, "token")
        ca_file = self._save_ca(ca_pem)
        # 2. Key pair here, secret + CSR over TLS verified against that CA.
        key_pem, csr_pem = generate_key_and_csr("relayd-agent")
        ctx = tls.relay_client_context(str(ca_file))
        reply = await ask(ctx, wire.EnrollRequest(token.token_id, token.secret, csr_pem.decode()))
        ident = {"agent_id": reply["agent_id"], "relay": tls_addr, "wss": wss_addr or reply.get("wss"),
                 "server_hostname": host}
        return self._save_identity(ident, key_pem, reply["cert"].encode(), token.address, "join token")

    async def enroll_est(self, otp: str, url: str, pin: str | None) -> dict:
        """Enroll as a device over EST (relayd.agent.est): the relay's CA
        from ``cacerts`` (checked against ``pin`` when given; else the TLS
        connection must verify by the system's trust store), a key pair
        made here, the OTP and a CSR to ``simpleenroll``. The agent link
        then runs over the same HTTPS port (a WebSocket), the one address a
        device was given."""
        from relayd.agent import est

        host, _, _ = est.parse_base(url)
        relay = est.address(url)
        try:
            if pin:
                want = pin.strip().lower()
                want = want if want.startswith("sha256:") else "sha256:" + want
                body = await est.call(url, "cacerts", tls.unverified_client_context(),
                                      timeout=self.cfg.connect_timeout)
            else:
                want = None
                body = await est.call(url, "cacerts", ssl.create_default_context(), timeout=self.cfg.connect_timeout)
            cas = [c for c in est.read_certs(body) if _is_ca(c)]
            if not cas:
                raise EnrollmentError("the relay's cacerts holds no CA certificate")
            ca = cas[0]
            if want is not None:
                match = [c for c in cas if hmac.compare_digest(pin_of(c.public_bytes(Encoding.DER)), want)]
                if not match:
                    self._check_pin(ca.public_bytes(Encoding.DER), want, relay, "OTP")
                ca = match[0]
            ca_file = self._save_ca(ca.public_bytes(Encoding.PEM).decode())
            key_pem, csr_pem = generate_key_and_csr("relayd-agent")
            csr_b64 = base64.b64encode(x509.load_pem_x509_csr(csr_pem).public_bytes(Encoding.DER))
            body = await est.call(url, "simpleenroll", tls.relay_client_context(str(ca_file)), body=csr_b64,
                                  authorization=est.basic(otp), timeout=self.cfg.connect_timeout)
            cert = next((c for c in est.read_certs(body) if not _is_ca(c)), None)
        except est.EstUnavailable as exc:
            raise EnrollmentUnavailable(f"{exc}; the OTP was not used: try again later") from None
        except est.EstRefused as exc:
            raise EnrollmentError(f"enrollment refused: {exc}") from None
        if cert is None:
            raise EnrollmentError("the relay's simpleenroll answer holds no certificate")
        cert_pem = cert.public_bytes(Encoding.PEM)
        info = cert_info(cert_pem)
        ident = {"agent_id": info["agent_id"] or info["common_name"], "relay": None, "wss": relay,
                 "server_hostname": host, "est": url}
        return self._save_identity(ident, key_pem, cert_pem, relay, "OTP")

    def _check_pin(self, ca_der: bytes, pin: str, relay: str, what: str) -> None:
        if not hmac.compare_digest(pin_of(ca_der), pin):
            raise EnrollmentError(
                f"CA pin mismatch: the relay at {relay} is not the one that issued this {what} "
                "(or something is intercepting the connection); refusing to enroll")

    def _save_ca(self, ca_pem: str) -> Path:
        ca_file = self.data / "ca.crt"
        try:
            # Before the secret is sent: a directory we cannot write must not
            # cost the token.
            self.data.mkdir(parents=True, exist_ok=True)
            self.data.chmod(0o700)
            ca_file.write_text(ca_pem)
        except OSError as exc:
            raise ConfigError(f"cannot write the agent data directory {self.data}: {exc.strerror}") from None
        return ca_file

    def _save_identity(self, ident: dict, key_pem: bytes, cert_pem: bytes, relay: str, secret: str) -> dict:
        try:
            write_private(self.data / "agent.key", key_pem)
            (self.data / "agent.crt").write_bytes(cert_pem)
            self._id_file.write_bytes(orjson.dumps(ident))
        except OSError as exc:
            raise ConfigError(f"enrolled as {ident['agent_id']} but cannot store the identity in {self.data}: "
                              f"{exc.strerror}; the {secret} is spent: revoke {ident['agent_id']} and "
                              f"enroll with a new {secret}") from None
        log.info("enrolled", extra={"agent": ident["agent_id"], "relay": relay})
        return ident

    # -- running ------------------------------------------------------------------

    async def start(self) -> None:
        ident = self.load_identity()
        if ident is None:
            if self.cfg.otp:
                ident = await self.enroll_est(self.cfg.otp, self.cfg.est, self.cfg.pin)
            elif not self.cfg.join:
                raise ConfigError(f"{self.data} holds no agent identity: enroll once with --join TOKEN "
                                  "(or --otp OTP --est https://HOST)")
            else:
                ident = await self.enroll(self.cfg.join)
        elif self.cfg.otp:
            log.info("already enrolled; ignoring the OTP", extra={"agent": ident["agent_id"]})
        elif self.cfg.join:
            token = JoinToken.decode(self.cfg.join)
            if token.address not in (ident.get("relay"), ident.get("wss")) or token.pin != self._stored_pin():
                # A token for another relay (or a relay with a new CA): join it.
                log.info("join token names another relay: enrolling again",
                         extra={"old_agent": ident["agent_id"], "relay": token.address})
                ident = await self.enroll(self.cfg.join)
            else:
                log.info("already enrolled with this relay; ignoring the join token",
                         extra={"agent": ident["agent_id"]})
        self.identity = ident
        if not self.cfg.endpoints and not self.cfg.site and not self.cfg.device_api:
            raise ConfigError("the agent serves no endpoint: give --endpoint NAME=HOST:PORT (or --site)")
        if self.cfg.device_api is not None:
            from relayd.agent.deviceapi import DeviceApiForwarder

            self.device_api = DeviceApiForwarder(self)
            await self.device_api.start(*self.cfg.device_api)
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._renew_task = asyncio.get_running_loop().create_task(self._renew_loop())

    async def stop(self, drain: float = 0.0) -> None:
        """Stop. With ``drain``: first send the relay GoAway (it sends new
        streams to other agents from then on) and let open streams finish for
        up to ``drain`` seconds."""
        self._stopping = True
        conn = self.conn
        if conn is not None and drain > 0 and not conn.closed:
            conn.go_away()
            log.info("draining: the relay sends new streams elsewhere", extra={"streams": conn.stream_count()})
            if not await conn.drained(drain):
                log.info("drain time over: cutting what is left", extra={"streams": conn.stream_count()})
        for t in (self._task, self._renew_task):
            if t is not None:
                t.cancel()
        if self.conn is not None:
            self.conn.abort()
        if self.site_tun is not None:
            self.site_tun.close()
        if self.device_api is not None:
            self.device_api.close()
        for t in (self._task, self._renew_task):
            if t is not None:
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass

    async def wait(self) -> None:
        if self._task is not None:
            await self._task

    def _tls(self):
        return tls.relay_client_context(str(self.data / "ca.crt"), cert_file=str(self.data / "agent.crt"),
                                  key_file=str(self.data / "agent.key"))

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._session()
            except (wire.Refusal, wire.VersionMismatch) as exc:
                log.error("relay refused this agent: %s", exc, extra={"code": exc.code})
                if exc.code == wire.REVOKED:
                    raise
            except (OSError, asyncio.TimeoutError, RelaydError) as exc:
                log.warning("link failed: %s", str(exc) or type(exc).__name__)
            if self._stopping:
                break
            if time.monotonic() - started > STABLE_AFTER:
                attempt = 0
            # Full jitter: spread a fleet of agents after a relay restart.
            delay = random.uniform(0, min(self.cfg.reconnect_max, 0.5 * 2 ** attempt))
            attempt += 1
            self.reconnects += 1
            metrics.AGENT_RECONNECTS.inc()
            log.info("reconnecting", extra={"in_s": round(delay, 2), "attempt": attempt})
            await asyncio.sleep(delay)

    async def _ask_relay(self, pre: ClientPreamble):
        """mTLS to the relay, one request; returns (transport, reply)."""
        ident = self.identity
        transport = await self._connect(lambda: pre, ident.get("relay"), ident.get("wss"), self._tls(),
                                        ident.get("server_hostname"))
        try:
            return transport, await asyncio.wait_for(pre.reply, self.cfg.connect_timeout)
        except BaseException:
            transport.abort()
            raise

    async def _session(self) -> None:
        pre = ClientPreamble(
            wire.TunnelRequest(tuple(sorted(self.cfg.endpoints)) + ((f"site:{self.cfg.site}",) if self.cfg.site else ())),
            make_protocol=lambda reply: MuxConnection(True, self.cfg.mux, on_stream=self._on_stream,
                                                      name=self.identity["agent_id"]),
        )
        transport, reply = await self._ask_relay(pre)
        try:
            wire.check_reply(reply)
        except (wire.Refusal, wire.VersionMismatch):
            transport.close()
            raise
        conn: MuxConnection = pre.protocol
        self.conn = conn
        self._control_out = control.ControlChannel(self._open_control)  # a new link: a new control stream
        self.connected.set()
        if reply.get("wss") and reply["wss"] != self.identity.get("wss"):
            # The relay now also takes WebSocket links: remember where (auto).
            self.identity["wss"] = reply["wss"]
            self._id_file.write_bytes(orjson.dumps(self.identity))
        log.info("connected", extra={"agent": self.identity["agent_id"],
                                     "relay": self.identity.get("relay") or self.identity.get("wss"),
                                     "endpoints": ",".join(sorted(self.cfg.endpoints))})
        try:
            await asyncio.shield(conn.closed_future)
        finally:
            self.connected.clear()
            self.conn = None
            conn.abort()
        log.warning("link to relay lost", extra={"error": str(conn.error) if conn.error else None})

    async def _on_stream(self, stream: MuxStream) -> None:
        loop = asyncio.get_running_loop()
        header = target = None
        try:
            # asyncio.timeout, not wait_for: no extra task per stream. The
            # header usually arrives with the SYN, so the read does not wait.
            async with asyncio.timeout(self.cfg.connect_timeout):
                header = StreamHeader.decode(await stream.read_message())
                if header.kind == KIND_PACKETS:
                    if self.cfg.site is None or header.target != f"site:{self.cfg.site}":
                        log.warning("packet stream for a site this agent does not serve",
                                    extra={"endpoint": header.target[:64], "trace": header.trace[:32]})
                        stream.reset()
                        return
                elif header.kind == KIND_DIAL:
                    target = self._site_target(header)
                    if target is None:
                        stream.reset()
                        return
                    await loop.create_connection(lambda: TcpSplice(stream, limits=self.cfg.splice), *target)
                elif header.kind != KIND_CONTROL:
                    target = self.cfg.endpoints.get(header.target)
                    if target is None:
                        log.warning("stream for an endpoint this agent does not serve",
                                    extra={"endpoint": header.target[:64], "trace": header.trace[:32]})
                        stream.reset()
                        return
                    btls = self._backend_tls.get(header.target)
                    if btls is None:
                        await loop.create_connection(lambda: TcpSplice(stream, limits=self.cfg.splice), *target)
                    else:
                        ctx, server_name = btls
                        await loop.create_connection(lambda: TcpSplice(stream, limits=self.cfg.splice), *target, ssl=ctx,
                                                     server_hostname=server_name)
        except (RelaydError, asyncio.IncompleteReadError) as exc:
            log.warning("bad stream header: %s", type(exc).__name__,
                        extra={"error": str(exc) if isinstance(exc, VersionMismatch) else None})
            stream.reset()
            return
        except (OSError, asyncio.TimeoutError) as exc:  # ssl errors included
            if header is None:
                log.warning("stream header did not arrive in time")
            else:
                log.warning("local service unreachable", extra={
                    "endpoint": header.target, "target": format_hostport(target),
                    "error": str(exc) or type(exc).__name__, "trace": header.trace[:32]})
            stream.reset()
            return
        if header.kind == KIND_CONTROL:
            await self._control(stream)
            return
        self.streams_served += 1
        if header.kind == KIND_PACKETS:
            if self.site_tun is None:
                from relayd.agent.sitetun import SiteTun

                self.site_tun = SiteTun(self.cfg.site_tun, self.cfg.site_networks)
            await self.site_tun.serve(stream, header.dest)

    def _site_target(self, header: StreamHeader) -> tuple[str, int] | None:
        """A zero-trust flow's address, if this agent serves that site and
        the address is inside the site's networks (the second line behind
        the gateway's filter)."""
        host, _, port = header.dest.partition(" ")
        try:
            addr = ipaddress.ip_address(host)
            p = int(port)
        except ValueError:
            addr, p = None, 0
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if (self.cfg.site is None or header.target != f"site:{self.cfg.site}" or addr is None
                or not 0 < p < 65536 or not any(addr.version == n.version and addr in n
                                                for n in self.cfg.site_networks)):
            log.warning("dial outside this agent's site networks refused",
                        extra={"endpoint": header.target[:64], "trace": header.trace[:32]})
            return None
        return str(addr), p

    async def push(self, type_: str, **fields) -> bool:
        """Send one control message to the relay (over this link's control
        stream, opened on first use); False if the link is down."""
        return await self._control_out.send(type_, **fields)

    def _open_control(self):
        conn = self.conn
        if conn is None or conn.closed:
            return None
        try:
            st = conn.open_stream_nowait()
        except RelaydError:
            return None
        st.send_nowait(StreamHeader(KIND_CONTROL, "", "").encode())
        return st

    def on_control(self, type_: str, handler) -> None:
        """Call ``handler(message)`` for each control message of ``type_``
        the relay pushes (claim codes, device tokens, step-up prompts...)."""
        self.control_handlers[type_] = handler

    async def _control(self, stream: MuxStream) -> None:
        """A control stream from the relay: its messages, until it ends."""
        try:
            await control.receive(stream, self._dispatch_control)
        except (RelaydError, asyncio.IncompleteReadError) as exc:
            log.warning("bad control stream: %s", type(exc).__name__)
            stream.reset()

    def _on_device_token(self, msg: dict) -> None:
        token = msg.get("token")
        if isinstance(token, str) and len(token) < 8192:
            self.device_token, self.device_token_expires = token, str(msg.get("expires_at"))[:64]
            log.info("device token received", extra={"expires_at": self.device_token_expires})

    @property
    def claim_code_file(self) -> Path:
        """Where an unclaimed device keeps the claim code the relay pushed
        (mode 0600) until someone claims it."""
        return self.data / "claim_code"

    def _on_claim_code(self, msg: dict) -> None:
        code = msg.get("code")
        if not isinstance(code, str) or not re.fullmatch(r"[0-9A-Z]{4}(-[0-9A-Z]{4}){3}", code):
            log.warning("claim code refused: not XXXX-XXXX-XXXX-XXXX")
            return
        try:
            write_private(self.claim_code_file, code.encode() + b"\n")  # atomic, 0600
        except OSError as exc:
            log.error("cannot store the claim code: %s", exc.strerror, extra={"file": str(self.claim_code_file)})
            return
        log.info("claim code stored", extra={"file": str(self.claim_code_file)})
        asyncio.get_running_loop().create_task(self.push("ack", of="claim_code"))

    def _on_claimed(self, msg: dict) -> None:
        try:
            self.claim_code_file.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove the claim code: %s", exc.strerror)
        log.info("device claimed: claim code removed")

    def _dispatch_control(self, kind: str, msg: dict) -> None:
        handler = self.control_handlers.get(kind)
        if handler is None:
            log.info("control message of a type this agent does not handle", extra={"type": kind})
            return
        handler(msg)

    # -- certificate renewal ----------------------------------------------------------

    def cert_lifetime(self) -> tuple[float, float]:
        info = cert_info((self.data / "agent.crt").read_bytes())
        return info["not_before"].timestamp(), info["not_after"].timestamp()

    async def _renew_loop(self) -> None:
        while not self._stopping:
            nb, na = self.cert_lifetime()
            renew_at = nb + (na - nb) * 2 / 3
            delay = max(1.0, renew_at - time.time())
            await asyncio.sleep(delay)
            try:
                await self.renew()
            except (OSError, asyncio.TimeoutError, RelaydError) as exc:
                log.warning("certificate renewal failed, retrying: %s", exc)
                await asyncio.sleep(min(30.0, max(1.0, (na - time.time()) / 10)))

    async def renew(self) -> None:
        """A new key and certificate: over the agent link's preamble, or by
        EST simplereenroll for a device enrolled over EST."""
        key_pem, csr_pem = generate_key_and_csr("relayd-agent")
        if self.identity.get("est"):
            cert_pem = await self._renew_est(csr_pem)
        else:
            transport, reply = await self._ask_relay(ClientPreamble(wire.RenewRequest(csr_pem.decode())))
            transport.close()
            wire.check_reply(reply)
            cert_pem = reply["cert"].encode()
        # Key first, then certificate: a crash in between leaves a pair that
        # fails loudly at the next TLS setup rather than a silent mismatch.
        write_private(self.data / "agent.key.new", key_pem)
        (self.data / "agent.crt.new").write_bytes(cert_pem)
        (self.data / "agent.key.new").replace(self.data / "agent.key")
        (self.data / "agent.crt.new").replace(self.data / "agent.crt")
        log.info("certificate renewed", extra={"agent": self.identity["agent_id"]})

    async def _renew_est(self, csr_pem: bytes) -> bytes:
        from relayd.agent import est

        csr_b64 = base64.b64encode(x509.load_pem_x509_csr(csr_pem).public_bytes(Encoding.DER))
        body = await est.call(self.identity["est"], "simplereenroll", self._tls(), body=csr_b64,
                              timeout=self.cfg.connect_timeout)
        cert = next((c for c in est.read_certs(body) if not _is_ca(c)), None)
        if cert is None:
            raise est.EstRefused("the relay's simplereenroll answer holds no certificate")
        return cert.public_bytes(Encoding.PEM)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
