"""Zero-trust access on the relay's HTTPS port: the controller's API and the
gateway's user sessions (``../shared/specs/zero-trust.md`` sections 3 to 8).

Controller API (JSON; under the relay's own prefix ``/_relayd/v1``, any
host name): ``GET providers``, ``POST login``, then over mTLS with the
session certificate and ``Authorization: Bearer <claims token>``: ``POST
entitlements``, ``POST session/renew``, ``POST stepup``. The controller
(relayd.control.zerotrust) runs in a worker thread.

Gateway session: ``wss://<relay>/_relayd/v1/session`` over mTLS with the
session certificate. The WebSocket carries a yamux session (the agent
link's stack). The client's first stream is the control stream: ``hello``
(claims token, this site's entitlement token, device claims, cached
reasons) answered by ``welcome``, then ``claims`` / ``entitlements`` /
``device`` / ``reason`` updates from the client and ``interaction`` /
``interaction_done`` / ``renew`` / ``closed`` from the gateway. Every
other stream is one flow: ``{proto, host, port}`` answered by ``ok``,
``denied`` or ``stepup_required``; an allowed flow is spliced to a new
stream toward an agent of the site, opened through the one stream seam
(``dial``, the address the filter admitted). ``{"proto": "ip"}`` asks for
TUN mode instead: IP packets, each checked (relayd.gateway.ztpackets).

The session's rules are compiled from its tokens, the live device report,
the gateway's system claims, the reasons given and the clock into a
relayd.core.flowfilter RuleSet, swapped whole; every recompile matches the
live flows again and cuts those no longer allowed. Every decision writes an
audit record (logger ``relayd.audit``): who, from which device, where, the
rule, the verdict; never a token, a credential or payload.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time

import orjson
from cryptography.hazmat.primitives import serialization

from relayd import metrics
from relayd.control import jws
from relayd.control import policy as pol
from relayd.control.ca import UNREADABLE
from relayd.control.zerotrust import Controller, Refused, device_claims, reject, selector_matches, token_facts
from relayd.core import flowfilter as ff
from relayd.core import http1
from relayd.core.framing import FramingError
from relayd.core.http1 import error_reply as _error
from relayd.core.http1 import json_reply as _json
from relayd.core.wire import KIND_DIAL
from relayd.gateway.ztpackets import AddressPool, TunPath, proto_name
from relayd.core.wshandshake import Refuse, server_handshake
from relayd.errors import RelaydError
from relayd.gateway import ztmessages as zm
from relayd.log import RateLimitedLog, caught
from relayd.net.http_ingress import Route, buffered
from relayd.net.mux import MuxConnection, MuxStream
from relayd.net.wslink import WsProtocol

log = logging.getLogger("relayd.zerotrust")
audit_log = logging.getLogger("relayd.audit")
_LOG = RateLimitedLog(log)

PREFIX = "/_relayd/v1"
SESSION_PATH = PREFIX + "/session"
#: Seconds an interaction stays open; at most one re-send per condition in this many seconds.
INTERACTION_TTL = 300.0
INTERACTION_RESEND = 30.0
#: Address ranges no flow reaches unless a rule names them explicitly
#: (metadata services, loopback, link-local): a /0 or /8 allow does not.
_GUARDED = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "169.254.0.0/16", "::1/128", "fe80::/10", "0.0.0.0/8")]
#: Seconds a host name's answer is kept (an empty one, a failed lookup: less).
_DNS_TTL, _DNS_MIN = 60.0, 30.0
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _peer_der(ex) -> bytes | None:
    sslobj = ex.conn.transport.get_extra_info("ssl_object")
    return sslobj.getpeercert(binary_form=True) if sslobj is not None else None


def _bearer(head) -> str | None:
    v = None
    for name, value in head.headers:
        if name.lower() == b"authorization":
            v = value
            break
    if v is None or not v[:7].lower() == b"bearer ":
        return None
    return v[7:].strip().decode("latin-1")


class ZtGateway:
    """The controller API and the gateway sessions of one relay."""

    def __init__(self, controller: Controller, seam, site: str | None, relay_ca_pem: bytes = b"") -> None:
        self.ctl = controller
        self.relay_ca_pem = relay_ca_pem
        self.seam = seam
        self.site = site
        self.sessions: dict[str, "UserSession"] = {}  # sid -> live session here
        self.dns: dict[str, tuple[float, list]] = {}
        controller.listeners.append(self._revocations)
        self._gauge = metrics.ZT_SESSIONS.labels(site or "-")
        self._poll_task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool = AddressPool(controller.cfg.tun_pool)

    def routes(self) -> list[Route]:
        return [Route("", "*", PREFIX, serve=buffered(self._api, 1 << 20)),
                Route("", "*", SESSION_PATH, local=self._upgrade)]

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._poll_task = self.loop.create_task(self._poll())

    def stop(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
        for s in list(self.sessions.values()):
            s.close(1001, "going_away", "the relay is stopping")

    async def _poll(self) -> None:
        """Revocations other processes append (`relayd admin revoke`):
        four times a second, so a kill reaches live flows within a second."""
        while True:
            await asyncio.sleep(0.25)
            try:
                await asyncio.to_thread(self.ctl.poll)
            except RelaydError as exc:
                _LOG.warning("revocation poll failed: %s", exc)
            except Exception as exc:  # keep polling whatever one round did
                caught("zt_poll", exc)

    def fresh(self) -> bool:
        """Whether new sessions and flows may start (strict mode: the
        revocation view is recent enough)."""
        if self.ctl.cfg.revocation_mode != "strict":
            return True
        return time.monotonic() - self.ctl.view.fresh_at <= self.ctl.cfg.max_staleness

    # -- the controller's API ---------------------------------------------------

    async def _api(self, head, body: bytes, ex) -> http1.Reply:
        path = head.path.split(b"?", 1)[0].decode("latin-1")
        sub = path[len(PREFIX):]
        try:
            if sub == "/ca" and head.method == b"GET":
                # The relay's CA (its HTTPS certificate's issuer): a client
                # checks it against the pin it was given, then trusts only it.
                return http1.Reply(200, self.relay_ca_pem, b"application/x-pem-file")
            if sub == "/providers" and head.method == b"GET":
                return _json(200, await asyncio.to_thread(self.ctl.providers))
            if head.method != b"POST":
                return _error(405 if sub in ("/login", "/entitlements", "/renew", "/stepup") else 404,
                              "not_found", "no such API")
            try:
                doc = orjson.loads(body) if body else {}
            except orjson.JSONDecodeError:
                metrics.BAD_INPUT.labels("zt_api", "json").inc()
                return _error(400, "bad_request", "the body is not JSON")
            if not isinstance(doc, dict):
                return _error(400, "bad_request", "the body is not a JSON object")
            client = ex.client[0]
            if sub == "/login":
                return _json(200, await asyncio.to_thread(self.ctl.login, doc, client))
            der = _peer_der(ex)
            token = _bearer(head)
            if token is None:
                raise reject("no_token", "Authorization: Bearer <claims token> is required")
            if sub == "/entitlements":
                return _json(200, await asyncio.to_thread(self.ctl.entitlements, token, der))
            if sub == "/renew":
                return _json(200, await asyncio.to_thread(self.ctl.renew, token, der, doc))
            if sub == "/stepup":
                return _json(200, await asyncio.to_thread(self.ctl.stepup, token, der, doc))
            return _error(404, "not_found", "no such API")
        except Refused as exc:
            _LOG.info("zero-trust request refused", extra={"api": sub[:32], "reason": exc.reason,
                                                           "client": ex.client[0]})
            return _error(exc.status, exc.reason, str(exc))
        except RelaydError as exc:
            _LOG.info("zero-trust request refused", extra={"api": sub[:32], "reason": type(exc).__name__})
            return _error(getattr(exc, "status", 400), getattr(exc, "code", "bad_request"), str(exc))

    # -- sessions ---------------------------------------------------------------

    def _upgrade(self, head, transport, rest: bytes) -> None:
        res = server_handshake(head.method, head.target, head.headers)
        if isinstance(res, Refuse):
            metrics.BAD_INPUT.labels("zt_session", "bad_upgrade").inc()
            transport.write(http1.response(res.status, (res.reason + "\n").encode(), headers=list(res.headers)))
            transport.close()
            return
        sslobj = transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der or self.site is None:
            metrics.ZT_TOKEN_REJECTIONS.labels("no_certificate" if self.site else "no_site").inc()
            why = b"a session certificate is required\n" if self.site else b"this relay is no site's gateway\n"
            transport.write(http1.response(401 if self.site else 404, why))
            transport.close()
            return
        transport.write(res.response)
        sess = UserSession(self, der, transport.get_extra_info("peername"))
        proto = WsProtocol(sess.mux, client=False)
        sess.ws = proto
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if rest:
            proto.data_received(rest)

    def _revocations(self, entries: list[dict]) -> None:
        """New revocation entries, heard from any thread (the controller
        runs in worker threads): applied on the loop, in order."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._apply, entries)

    def _apply(self, entries: list[dict]) -> None:
        now = time.time()
        for e in entries:
            metrics.ZT_REVOCATIONS.labels(e["op"]).inc()
            for s in list(self.sessions.values()):
                s.revocation(e, now)

    async def resolve(self, name: str) -> list[str]:
        """A host name's addresses (cached 30 s to 5 min); IPv4-mapped
        IPv6 becomes IPv4."""
        name = name.lower().rstrip(".")
        hit = self.dns.get(name)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None, proto=6)
        except OSError:
            infos = []
        addrs = []
        for info in infos:
            a = ipaddress.ip_address(info[4][0].split("%")[0])
            if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
                a = a.ipv4_mapped
            if str(a) not in addrs:
                addrs.append(str(a))
        self.dns[name] = (now + (_DNS_TTL if addrs else _DNS_MIN), addrs)
        return addrs


class UserSession:
    """One client's session at this gateway."""

    def __init__(self, gw: ZtGateway, cert_der: bytes, peer) -> None:
        self.gw = gw
        self.loop = asyncio.get_running_loop()
        self.cert_der = cert_der
        self.peer = peer[0] if peer else "?"
        self.mux = MuxConnection(False, on_stream=self._on_stream, name="zt-session")
        self.mux.closed_future.add_done_callback(lambda _f: self._ended())
        self.ws: WsProtocol | None = None
        self.control: MuxStream | None = None
        self.claims: dict | None = None
        self.ents: dict | None = None
        self.sid: str | None = None
        self.device: dict = {}
        self.device_at = 0.0
        self.reasons: dict = {}  # suffix -> (at, text)
        self.connect_time = int(time.time())
        self.rules = ff.RuleSet([], 0)
        self.states: dict = {}
        self.generation = 0
        self.flows: dict = {}  # key -> (client stream, agent stream, ref, (ip, port))
        self.interactions: dict = {}  # id -> {condition, entitlement, expires, sent}
        self.timer: asyncio.TimerHandle | None = None
        self.renew_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self._flow_seq = 0
        # Limits on what the client says (relayd.gateway.ztmessages).
        self.hello_timer: asyncio.TimerHandle | None = self.loop.call_later(zm.HELLO_TIMEOUT, self._no_hello)
        self.superseded: dict = {}  # jti -> None: tokens this session held and replaced (oldest first)
        self.refused = 0
        self.bucket, self.bucket_at = float(zm.UPDATE_BURST), time.monotonic()
        self.stalled = False  # the client does not read its control stream
        self.tun: TunPath | None = None  # TUN mode, once asked for

    # -- life -------------------------------------------------------------------

    def _ended(self) -> None:
        self.closed = True
        if self.sid is not None and self.gw.sessions.get(self.sid) is self:
            del self.gw.sessions[self.sid]
            self.gw._gauge.dec()
        for t in (self.timer, self.renew_timer, self.hello_timer):
            if t is not None:
                t.cancel()
        for key in list(self.flows):
            self._cut(key, None)
        if self.tun is not None:
            self.tun.close()

    def close(self, code: int, reason: str, message: str) -> None:
        """Tell the client why (on the control stream), then close the
        WebSocket with ``code`` (4401: tokens refused; 4403: revoked)."""
        if self.closed:
            return
        self.closed = True
        if self.control is not None and not self.stalled:
            self._send({"type": "closed", "code": code, "reason": reason, "message": message})
        for key in list(self.flows):
            self._cut(key, "revoked" if code == 4403 else None)
        if self.tun is not None:
            self.tun.close()
        self.mux._flush_now()
        if self.ws is not None:
            self.ws.conn.fail(code, reason[:100])
            self.ws.end()
        self.mux.abort()

    def _send(self, msg: dict) -> None:
        if self.control is None or self.stalled:
            return
        data = _frame(msg)
        try:
            n = self.control.send_nowait(data)
        except RelaydError:
            return
        if n < len(data):
            # The client leaves its control stream unread: the rest of this
            # message has nowhere to wait, and a part of it would corrupt
            # the stream.
            self.stalled = True
            self._bad("not_reading")
            self.close(4400, "not_reading", "the control stream is not read")

    def _bad(self, kind: str) -> None:
        """The session is closed for ``kind`` of bad input: counted, logged."""
        metrics.BAD_INPUT.labels("zt_session", kind).inc()
        _LOG.info("zero-trust session closed: " + kind, extra={"sid": self.sid, "peer": self.peer, "reason": kind})

    def _refuse(self, reason: str, message: str, count: bool = True) -> None:
        """One control message refused: counted (unless the token check
        counted it already), logged, answered; a session that keeps
        sending what is refused is closed."""
        if count:
            metrics.BAD_INPUT.labels("zt_session", reason).inc()
        _LOG.info("zero-trust control message refused: " + reason,
                  extra={"sid": self.sid, "peer": self.peer, "reason": reason})
        self.refused += 1
        if self.refused >= zm.MAX_REFUSED:
            self._bad("too_many_errors")
            self.close(4400, "too_many_errors", f"{self.refused} control messages refused")
        else:
            self._send({"type": "error", "reason": reason, "message": message})

    def _take(self) -> bool:
        """A control message within the rate (a token bucket)."""
        now = time.monotonic()
        self.bucket = min(float(zm.UPDATE_BURST), self.bucket + (now - self.bucket_at) * zm.UPDATE_RATE)
        self.bucket_at = now
        if self.bucket < 1.0:
            return False
        self.bucket -= 1.0
        return True

    def _no_hello(self) -> None:
        self.hello_timer = None
        if self.claims is None and not self.closed:
            self._bad("hello_timeout")
            self.close(4400, "hello_timeout", f"no hello within {zm.HELLO_TIMEOUT:g} seconds")

    # -- streams ----------------------------------------------------------------------

    async def _on_stream(self, st: MuxStream) -> None:
        if self.control is None:
            self.control = st
            await self._control_loop(st)
            return
        if self.claims is None:
            st.reset()
            return
        try:
            async with asyncio.timeout(zm.FLOW_REQUEST_TIMEOUT):
                req = await st.read_message(zm.MAX_FLOW_REQUEST)
        except FramingError:
            self._bad_flow(st, f"a flow request is one msgpack map of at most {zm.MAX_FLOW_REQUEST} bytes")
            return
        except (RelaydError, asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            metrics.BAD_INPUT.labels("zt_flow", "request").inc()
            st.reset()
            return
        await self._flow(st, req)

    def _bad_flow(self, st: MuxStream, why: str) -> None:
        """A flow request refused: counted, logged, answered, reset."""
        metrics.BAD_INPUT.labels("zt_flow", "request").inc()
        _LOG.info("zero-trust flow refused: bad_request", extra={"sid": self.sid, "peer": self.peer,
                                                                 "reason": "bad_request"})
        try:
            st.send_nowait(_frame({"r": "bad_request", "why": why}))
        except RelaydError:
            pass
        st.reset()

    async def _control_loop(self, st: MuxStream) -> None:
        # The hello: within HELLO_TIMEOUT of the upgrade (_no_hello).
        try:
            self._hello(zm.control_message(await st.read_message(zm.MAX_CONTROL), False))
        except Refused as exc:
            _LOG.info("zero-trust session refused: " + exc.reason, extra={"peer": self.peer, "reason": exc.reason})
            self.close(4401, exc.reason, str(exc))
            return
        except zm.MessageError as exc:
            self._bad(exc.reason)
            self.close(4400, exc.reason, str(exc))
            return
        except FramingError:
            self._bad("bad_message")
            self.close(4400, "bad_message", f"a control message is one msgpack map of at most {zm.MAX_CONTROL} bytes")
            return
        except (RelaydError, asyncio.IncompleteReadError, ConnectionError):
            if not self.closed:
                self.close(4400, "bad_hello", "the control stream ended before hello")
            return
        try:
            while not self.closed:
                msg = await st.read_message(zm.MAX_CONTROL)
                try:
                    if not self._take():
                        raise zm.MessageError("rate_limited", "too many control messages: slow down")
                    self._update(zm.control_message(msg, True))
                except zm.MessageError as exc:
                    self._refuse(exc.reason, str(exc))
                except Refused as exc:
                    if exc.reason in ("revoked",):
                        self.close(4403, exc.reason, str(exc))
                        return
                    self._refuse(exc.reason, str(exc), count=False)  # counted by the token check
        except FramingError:
            if not self.closed:
                self._bad("bad_message")
                self.close(4400, "bad_message", f"a control message is one msgpack map of at most {zm.MAX_CONTROL} "
                                                "bytes")
        except (RelaydError, asyncio.IncompleteReadError, ConnectionError):
            if not self.closed:
                self.close(4400, "bad_message", "malformed control message")

    # -- tokens -----------------------------------------------------------------------

    def _verify(self, claims_tok, ents_tok) -> tuple[dict, dict]:
        c = self.gw.ctl.check_token(claims_tok, jws.CLAIMS, self.cert_der)
        e = self.gw.ctl.check_token(ents_tok, jws.ENTITLEMENTS, self.cert_der, site=self.gw.site)
        if (e["sub"], e["sid"], e["cnf"]) != (c["sub"], c["sid"], c["cnf"]):
            raise reject("session_mismatch", "the claims and entitlement tokens belong to different sessions")
        return c, e

    def _hello(self, m: dict) -> None:
        """``m``: a hello in its normal form (ztmessages)."""
        if not self.gw.fresh():
            raise reject("stale_revocations", "the gateway cannot check revocations now: try again")
        c, e = self._verify(m["claims"], m["entitlements"])
        live = self.gw.sessions.get(c["sid"])
        if live is not None:
            # A new connection of a live session takes over only with the
            # same or newer tokens (no rollback by reconnecting).
            self.superseded = dict(live.superseded)
            self._no_rollback(((c, live.claims), (e, live.ents)))
            for tok in (live.claims, live.ents):
                self._supersede(tok, c, e)
            live.close(4409, "replaced", "a newer connection of this session took over")
        self.claims, self.ents, self.sid = c, e, c["sid"]
        self.device = device_claims(m["device"])
        now = int(time.time())
        for r in m["reasons"]:
            self._keep_reason(r["suffix"], r["text"], min(r["at"], now))
        if self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None
        self.gw.sessions[self.sid] = self
        self.gw._gauge.inc()
        self._recompile()
        renew_at = int(min(c["exp"], e["exp"]) - (min(c["exp"], e["exp"]) - max(c["iat"], e["iat"])) / 4)
        self._send({"type": "welcome", "renew_at": renew_at, "pv": e["pv"], "rules": self.rules.count,
                    "site": self.gw.site})
        self._arm_expiry()
        log.info("user session", extra={"sid": self.sid, "user": c["user"]["username"], "site": self.gw.site,
                                        "peer": self.peer})

    def _update(self, m: dict) -> None:
        """``m``: an update in its normal form (ztmessages)."""
        t = m["type"]
        if t in ("claims", "entitlements", "tokens"):
            if m["certificate"] is not None:
                self._new_certificate(m["certificate"])
            claims, ents = m["claims"], m["entitlements"]
            c = self.gw.ctl.check_token(claims, jws.CLAIMS, self.cert_der) if claims is not None else self.claims
            e = (self.gw.ctl.check_token(ents, jws.ENTITLEMENTS, self.cert_der, site=self.gw.site)
                 if ents is not None else self.ents)
            for new, old in ((c, self.claims), (e, self.ents)):
                if (new["sub"], new["sid"]) != (old["sub"], old["sid"]):
                    raise reject("session_mismatch", "a token of another session")
            self._no_rollback(((c, self.claims), (e, self.ents)))
            if c["cnf"] != e["cnf"]:
                raise reject("session_mismatch", "the tokens are bound to different certificates")
            for tok in (self.claims, self.ents):
                self._supersede(tok, c, e)
            self.claims, self.ents = c, e
            self._recompile()
            self._arm_expiry()
            self._send({"type": "accepted", "what": t})
            self._done_interactions()
        elif t == "device":
            now = time.monotonic()
            if now - self.device_at < 1.0:
                raise zm.MessageError("device_flap", "device claims at most once a second")
            self.device_at = now
            self.device = device_claims(m["claims"])
            self._recompile()
            self._done_interactions()
        elif t == "reason":
            self._reason(m)
        else:  # ping
            self._send({"type": "pong"})

    def _no_rollback(self, pairs) -> None:
        """Each (new, held) token pair: the new one is not older than the
        one held, nor one this session held before. Token times are whole
        seconds: a token replaced in the second it was issued has the same
        ``iat`` as its successor, hence the memory of replaced ``jti``."""
        for new, old in pairs:
            if new["iat"] < old["iat"] or new["jti"] in self.superseded:
                raise reject("rollback", "an older token than the one this session holds")

    def _supersede(self, old: dict, *new) -> None:
        if all(old["jti"] != n["jti"] for n in new):
            self.superseded[old["jti"]] = None
            if len(self.superseded) > zm.MAX_SUPERSEDED:
                del self.superseded[next(iter(self.superseded))]

    def _new_certificate(self, pem) -> None:
        """A renewed session certificate: from the user CA, for the same
        subject and the same key as the one this connection was opened with
        (the TLS handshake proved that key), so the renewed tokens' ``cnf``
        can name it."""
        from cryptography import x509

        try:
            new = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else b"")
            old = x509.load_der_x509_certificate(self.cert_der)
        except UNREADABLE:
            raise reject("bad_certificate", "the renewed certificate does not parse") from None
        if not self.gw.ctl.user_ca.issued(new) or new.subject != old.subject \
                or new.public_key().public_bytes(*_SPKI) != old.public_key().public_bytes(*_SPKI):
            raise reject("bad_certificate", "the renewed certificate is not this session's")
        self.cert_der = new.public_bytes(serialization.Encoding.DER)

    def _reason(self, m: dict) -> None:
        """A reason answers an open interaction of this session that asks
        for a reason with this suffix; no other (spec 7, 10)."""
        inter = self.interactions.get(m["interaction"])
        if inter is None or inter["expires"] <= time.time() or not any(
                r.get("type") == "reason" and r.get("suffix") == m["suffix"] for r in inter["msg"]["remedies"]):
            raise zm.MessageError("unknown_interaction", "no open interaction of this session asks for this reason")
        self._keep_reason(m["suffix"], m["text"], int(time.time()))
        self._recompile()
        self._done_interactions()

    def _keep_reason(self, suffix: str, text: str, at: int) -> None:
        self.reasons[suffix] = (at, text)
        if len(self.reasons) > zm.MAX_REASONS:
            self.reasons.pop(next(iter(self.reasons)))
        audit_log.info("reason given", extra={"sid": self.sid, "suffix": suffix,
                                              "reason": orjson.dumps(text[:200]).decode()})

    def _arm_expiry(self) -> None:
        """Tokens past their end (plus the leeway) close the session."""
        if self.renew_timer is not None:
            self.renew_timer.cancel()
        end = min(self.claims["exp"], self.ents["exp"]) + 30
        self.renew_timer = self.loop.call_later(max(0.0, end - time.time()), self._expired)

    def _expired(self) -> None:
        metrics.ZT_TOKEN_REJECTIONS.labels("expired").inc()
        self.close(4401, "expired", "the session's tokens expired: renew")

    # -- rules ----------------------------------------------------------------------------

    def context(self) -> dict:
        c = self.claims
        snapshot = (c.get("device") or {}).get("reported", {})
        return {"user": c.get("user", {}), "device": self.device or snapshot,
                "system": {"client_src_ip": self.peer, "connect_time": self.connect_time, "site": self.gw.site},
                "stepup": c.get("stepup", {}), "reasons": self.reasons, "now": int(time.time())}

    def _recompile(self) -> None:
        ctx = self.context()
        conds = self.ents.get("conditions", {})
        ents = self.ents.get("entitlements", [])
        self.states = {e["id"]: pol.judge(e, conds, ctx) for e in ents}
        self.generation += 1
        dns = self.gw.dns

        def resolve(name):
            hit = dns.get(name.lower())
            return hit[1] if hit else []

        self.rules = ff.RuleSet(pol.compile_rules(ents, self.states, resolve), self.generation)
        missing = [n for n in pol.names_of(ents) if n not in dns or dns[n][0] < time.monotonic()]
        if missing:
            self.loop.create_task(self._resolve_then_recompile(missing))
        for key, (cs, ast, ref, dst) in list(self.flows.items()):
            verdict, _ = self._match(dst[0], dst[1])
            if verdict != ff.ALLOW:
                self._cut(key, "revoked_by_reeval")
        if self.tun is not None:
            for proto, dst, port in self.tun.recheck():
                metrics.ZT_FLOWS_CUT.labels(self.gw.site or "-", "revoked_by_reeval").inc()
                self._audit("revoked_by_reeval", "", str(ipaddress.ip_address(dst)), port, None,
                            proto=proto_name(proto))
        if self.timer is not None:
            self.timer.cancel()
        at = pol.next_deadline(conds, ctx)
        if at is not None:
            self.timer = self.loop.call_later(max(0.05, at - time.time() + 0.01), self._deadline)

    async def _resolve_then_recompile(self, names) -> None:
        for n in names:
            await self.gw.resolve(n)
        if not self.closed and self.claims is not None:
            self._recompile()

    def _deadline(self) -> None:
        self.timer = None
        if not self.closed:
            self._recompile()

    def _match(self, ip: str, port: int) -> tuple[int, str]:
        a = ipaddress.ip_address(ip)
        verdict, ref = self.rules.match(ff.TCP, 32 if a.version == 4 else 128, int(a), port)
        if verdict == ff.ALLOW and not self.allowed_address(a, ref):
            return ff.DENY, ""
        return verdict, ref

    def allowed_address(self, a, ref: str) -> bool:
        """Loopback, link-local and metadata addresses only by a rule that
        names them (``a``: an address, or an IPv4 address as an int)."""
        if isinstance(a, int):
            a = ipaddress.IPv4Address(a)
        return not any(a in n for n in _GUARDED if n.version == a.version) or self._named(a, ref)

    def _named(self, a, ref: str) -> bool:
        eid, _, n = ref.partition("#")
        for e in self.ents.get("entitlements", []):
            if e["id"] == eid:
                for act in e["actions"]:
                    if str(act.get("n")) == n:
                        for h in act["hosts"]:
                            if pol._is_ip(h):
                                net = ipaddress.ip_network(h, strict=False)
                                if a in net and net.prefixlen >= (8 if a.version == 4 else 10):
                                    return True
        return False

    # -- flows ------------------------------------------------------------------------------

    async def _flow(self, st: MuxStream, req) -> None:
        t0 = time.monotonic()
        if isinstance(req, dict) and req.get("proto") == "ip":
            await self._packets(st)
            return
        try:
            _, host, port, is_name = zm.flow_request(req)
        except zm.MessageError as exc:
            self._bad_flow(st, str(exc))
            return
        if not self.gw.fresh():
            st.send_nowait(_frame({"r": "denied", "why": "stale_revocations"}))
            st.write_eof()
            return
        name, ip = (host, None) if is_name else (None, host)
        if is_name:
            addrs = await self.gw.resolve(name)
            if not addrs:
                self._audit("deny", "", "", port, name, why="unresolved")
                st.send_nowait(_frame({"r": "denied", "why": "unresolved"}))
                st.write_eof()
                return
            ip = addrs[0]  # the checked address is the dialed address
        if self.closed:
            st.reset()
            return
        verdict, ref = self._match(ip, port)
        if verdict == ff.PENDING:
            self._recompile()  # conditions judged again at access (Appgate)
            verdict, ref = self._match(ip, port)
        if verdict == ff.PENDING:
            eid = ref.partition("#")[0]
            inter = self._interaction(eid)
            self._audit("pending", ref, ip, port, name, why=",".join(self.states[eid].failing),
                        interaction=inter["id"] if inter else None)
            st.send_nowait(_frame({"r": "stepup_required", "interaction": inter["id"] if inter else None,
                                   "ref": ref}))
            st.write_eof()
            return
        if verdict != ff.ALLOW:
            self._audit(ff.VERDICTS[verdict], ref, ip, port, name)
            st.send_nowait(_frame({"r": "denied", "ref": ref}))
            st.write_eof()
            return
        self._flow_seq += 1
        key = self._flow_seq
        fut = self.loop.create_future()

        def ready(stream, reason):
            if not fut.done():
                fut.set_result((stream, reason))

        opening = self.gw.seam.open(f"site:{self.gw.site}", self.peer, ready, kind=KIND_DIAL,
                                    identity=self.claims["sub"], dest=f"{ip} {port}")
        try:
            agent_st, reason = await fut
        except asyncio.CancelledError:
            if opening is not None:
                opening.cancel()
            raise
        if agent_st is None or self.closed:
            if agent_st is not None:
                agent_st.reset()
            self._audit("allow", ref, ip, port, name, why=reason or "closed")
            st.send_nowait(_frame({"r": "unreachable", "why": reason or "closed"}))
            st.write_eof()
            return
        self.flows[key] = (st, agent_st, ref, (ip, port))
        self._audit("allow", ref, ip, port, name)
        metrics.ZT_FLOW_OPEN_SECONDS.observe(time.monotonic() - t0)
        st.send_nowait(_frame({"r": "ok", "ip": ip, "ref": ref}))
        try:
            await _join(st, agent_st)
        finally:
            self.flows.pop(key, None)

    async def _packets(self, st: MuxStream) -> None:
        """TUN mode (one per session)."""
        if self.tun is not None:
            metrics.BAD_INPUT.labels("zt_flow", "second_tun").inc()
            st.send_nowait(_frame({"r": "bad_request", "why": "this session has its TUN path already"}))
            st.reset()
            return
        if not self.gw.fresh():
            st.send_nowait(_frame({"r": "denied", "why": "stale_revocations"}))
            st.write_eof()
            return
        addr = self.gw.pool.take()
        if addr is None:
            st.send_nowait(_frame({"r": "unreachable", "why": "no tunnel address left"}))
            st.write_eof()
            return
        self.tun = TunPath(self, addr)
        log.info("tun mode", extra={"sid": self.sid, "site": self.gw.site, "address": str(ipaddress.IPv4Address(addr))})
        try:
            await self.tun.run(st, self.gw.ctl.cfg.tun_mtu)
        finally:
            self.gw.pool.give_back(addr)

    def _cut(self, key, why: str | None) -> None:
        flow = self.flows.pop(key, None)
        if flow is None:
            return
        cs, ast, ref, (ip, port) = flow
        cs.reset()
        ast.reset()
        if why is not None:
            metrics.ZT_FLOWS_CUT.labels(self.gw.site or "-", why).inc()
            self._audit(why, ref, ip, port, None)

    def _audit(self, verdict: str, ref: str, ip: str, port: int, name, why: str | None = None,
               interaction: str | None = None, proto: str = "tcp") -> None:
        metrics.ZT_DECISIONS.labels(self.gw.site or "-", verdict).inc()
        c = self.claims or {}
        prov, user, dev = c.get("_triple", ("", "", ""))
        audit_log.info("access decision", extra={
            "sid": self.sid, "device_id": dev, "user": user, "provider": prov, "site": self.gw.site,
            "proto": proto, "dst": ip, "host": name, "port": port, "verdict": verdict, "rule": ref,
            "failing": why, "interaction": interaction})

    # -- step-up ----------------------------------------------------------------------------

    def _interaction(self, eid: str) -> dict | None:
        j = self.states.get(eid)
        if j is None or not j.remedies:
            return None
        now = time.time()
        cond = ",".join(j.failing)
        for inter in self.interactions.values():
            if inter["condition"] == cond and inter["expires"] > now:
                if now - inter["sent"] >= INTERACTION_RESEND:
                    inter["sent"] = now
                    self._send(inter["msg"])
                return inter
        for k in [k for k, v in self.interactions.items() if v["expires"] <= now]:
            del self.interactions[k]
        if len(self.interactions) >= 16:
            return None
        iid = secrets.token_hex(16)
        msg = {"type": "interaction", "id": iid, "entitlement": eid, "conditions": j.failing,
               "logic": j.remedy_logic, "remedies": j.remedies, "expires_at": int(now + INTERACTION_TTL)}
        inter = {"id": iid, "condition": cond, "entitlement": eid, "expires": now + INTERACTION_TTL, "sent": now,
                 "msg": msg}
        self.interactions[iid] = inter
        self._send(msg)
        return inter

    def _done_interactions(self) -> None:
        for iid, inter in list(self.interactions.items()):
            j = self.states.get(inter["entitlement"])
            if j is not None and j.state == "active":
                del self.interactions[iid]
                self._send({"type": "interaction_done", "id": iid, "result": "granted"})

    # -- revocation --------------------------------------------------------------------------

    def revocation(self, e: dict, now: float) -> None:
        if self.claims is None or self.closed:
            return
        facts = [token_facts(self.claims), token_facts(self.ents)]
        hit = [f for f in facts if selector_matches(e["selector"], f)
               and (e["op"] not in ("kill", "renew") or (f["tt"] in e["types"] and f["iat"] < e["issued_before"]))]
        if not hit:
            return
        if e["op"] in ("kill", "lock"):
            self.close(4403, "revoked", e["reason"] or "revoked by an administrator")
        elif e["op"] == "renew":
            self._send({"type": "renew", "types": e["types"], "deadline": int(e["effective_at"]),
                        "reason": e["reason"]})
            self.loop.call_later(max(0.0, e["effective_at"] - now) + 0.05, self._renew_deadline)
        elif e["op"] == "reevaluate":
            self._recompile()

    def _renew_deadline(self) -> None:
        if self.closed or self.claims is None:
            return
        now = time.time()
        view = self.gw.ctl.view
        for p in (self.claims, self.ents):
            e = view.revoked(token_facts(p), now)
            if e is not None:
                self.close(4403, "revoked", "tokens not renewed in time")
                return


def _frame(msg: dict) -> bytes:
    from relayd.core.framing import encode_message

    return encode_message(msg, 512 * 1024)


async def _join(a: MuxStream, b: MuxStream) -> None:
    """Two streams joined until both directions end (or either resets)."""

    async def pump(src: MuxStream, dst: MuxStream) -> None:
        try:
            while True:
                data = await src.read(256 * 1024)
                if not data:
                    break
                await dst.write(data)
            dst.write_eof()
        except (RelaydError, ConnectionError, asyncio.IncompleteReadError):
            a.reset()
            b.reset()

    await asyncio.gather(pump(a, b), pump(b, a))
