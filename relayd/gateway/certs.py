"""Certificates of the HTTPS port that take care of themselves.

Theory of operation
-------------------
Every host name the HTTPS port answers for gets a certificate that names
it, chosen by SNI (relayd.net.tls.CertSelector), from one of three places,
the first that applies:

1. a certificate file of the config (``[[serve.certs]]``): the operator's;
2. ACME (``[acme]``, relayd.control.acme): for the relay's own DNS names and
   every HTTP endpoint's host (or ``acme.names``), kept in
   ``<data>/acme/certs/<name>.pem`` (chain and key, mode 0600, replaced
   atomically) and renewed before expiry;
3. the relay's own CA: a certificate for each HTTP endpoint host that the
   relay's server certificate does not name (``<data>/certs/<name>.pem``),
   also what a name waiting for its first ACME certificate gets.

The relay's own names are on its server certificate already (the default of
the HTTPS port). A certificate replaced here is swapped into the selector:
handshakes from then on get the new one, established connections keep
theirs, nothing is dropped.

One task looks after every name: it sleeps until the earliest renewal is
due (``renew_before`` before expiry, by default a third of the lifetime),
renews, and after a failure keeps the certificate it has and tries again
after ``acme.retry``, doubling to ``acme.retry_max``. ACME orders run one at
a time in a worker thread; ``stop()`` ends them at once.

Challenges. HTTP-01: a plain-HTTP listener (``acme.http_listen``, port 80
by default) answers ``GET /.well-known/acme-challenge/<token>`` with the key
authorization while the order waits for it, and redirects everything else
to HTTPS. TLS-ALPN-01 (RFC 8737): while a challenge is pending, the HTTPS
listener peeks at each ClientHello (relayd.core.tlshello); a connection that
asks for that name with ALPN ``acme-tls/1`` gets the challenge certificate
and is closed after the handshake, everyone else the usual certificate. The
same peek gives relayd's own clients (ALPN ``relayd``) the relay's own
certificate when a public one answers for one of its names.

Metrics: relayd_acme_orders_total{result}, relayd_acme_errors_total{kind},
relayd_acme_challenge_requests_total{challenge, result}, and each managed
name's expiry in relayd_certificate_expiry_timestamp_seconds{cert="acme" or
"host", name}. Log lines name the host, the kind and the server's cleaned
text; never a key, a token or a nonce.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography import x509

from relayd import metrics
from relayd.control import acme
from relayd.control.ca import UNREADABLE, CertificateAuthority, write_private
from relayd.core import http1
from relayd.core.tlshello import ClientHello
from relayd.errors import ConfigError, RelaydError
from relayd.log import RateLimitedLog
from relayd.net import tls
from relayd.net.admission import public_connection_ok

log = logging.getLogger("relayd.certs")
_LOG = RateLimitedLog(log)

ACME_DIR = "acme"
HOST_CERTS_DIR = "certs"
#: Days a certificate of the relay's CA for an HTTP endpoint's host lasts.
HOST_CERT_DAYS = 397
_TLS_ALPN = acme.ACME_TLS_ALPN.encode()
_RELAY_ALPN = tls.RELAY_ALPN.encode()


def renew_at(not_before: float, not_after: float, renew_before: float | None) -> float:
    """When to renew: ``renew_before`` ahead of expiry, or with a third of
    the lifetime left when none is set or it is not shorter than the lifetime."""
    life = max(0.0, not_after - not_before)
    if renew_before is None or renew_before >= life:
        renew_before = life / 3
    return not_after - renew_before


@dataclass
class _Name:
    """One host name the relay looks after."""

    name: str
    acme: bool  # ACME wanted for it (else the relay's CA)
    own: bool  # one of the relay's own names (on its server certificate already)
    source: str = ""  # what is served now: "acme", "host" (the relay's CA) or "" (the default)
    not_before: float = 0.0
    not_after: float = 0.0
    serial: int = 0
    next_at: float = 0.0  # wall-clock time of the next renewal or retry
    failures: int = 0


class HostCerts:
    """The managed certificates of the HTTPS port (see the module's doc)."""

    def __init__(self, data: Path, ca: CertificateAuthority, selector: tls.CertSelector,
                 make_context: Callable[[str], ssl.SSLContext], own_context: ssl.SSLContext,
                 cfg: acme.AcmeConfig | None) -> None:
        self.data = Path(data)
        self.ca = ca
        self.selector = selector
        self.make_context = make_context
        self.own_context = own_context
        self.cfg = cfg
        self.names: dict[str, _Name] = {}
        self._own_public = False  # a name of the relay's own answers with another CA's certificate
        self._own_names: frozenset[str] = frozenset()
        self._alpn: dict[str, ssl.SSLContext] = {}  # name -> TLS-ALPN-01 challenge context
        self._http: dict[str, tuple[str, str]] = {}  # token -> (name, key authorization)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._cancel = threading.Event()
        self.client: acme.AcmeClient | None = None
        if cfg is not None:
            self.client = self._account()

    # -- ACME account ---------------------------------------------------------------------

    def _account(self) -> acme.AcmeClient:
        """The account key (made at the first start) and the cached account
        URL; a key that cannot be used is a ConfigError now, at start."""
        d = self.data / ACME_DIR
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            (d / "certs").mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {d}: {exc.strerror}") from None
        path = d / "account.key"
        try:
            key = acme.load_account_key(path)
        except FileNotFoundError:
            write_private(path, acme.new_account_key())
            key = acme.load_account_key(path)
            log.info("ACME account key created", extra={"file": str(path)})
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        url = None
        try:
            cached = json.loads((d / "account.json").read_bytes())
            if isinstance(cached, dict) and cached.get("directory") == self.cfg.directory \
                    and cached.get("thumbprint") == key.thumbprint and isinstance(cached.get("account"), str):
                url = cached["account"]
        except (OSError, ValueError):
            pass
        return acme.AcmeClient(self.cfg.directory, key, email=self.cfg.email, ca=self.cfg.ca, account_url=url,
                               cancel=self._cancel)

    def _save_account(self) -> None:
        doc = {"directory": self.cfg.directory, "account": self.client.account_url,
               "thumbprint": self.client.key.thumbprint}
        try:
            write_private(self.data / ACME_DIR / "account.json", json.dumps(doc).encode())
        except OSError as exc:
            log.warning("cannot write the ACME account cache: %s", exc.strerror)

    # -- which names ------------------------------------------------------------------------

    def set_names(self, own: list[str], hosts: list[str]) -> None:
        """The relay's own names and the HTTP endpoints' hosts, at start and
        after a reload; certificates of names no longer wanted stop being
        served, new names get theirs (from the relay's CA at once; ACME's
        in the background)."""
        wanted: dict[str, _Name] = {}
        acme_names = set(self.cfg.names) if self.cfg is not None and self.cfg.names is not None else None
        for name, is_own in [(n, True) for n in own] + [(h, False) for h in hosts]:
            name = name.lower()
            if name in wanted or name == "*" or self.selector.covers(name):
                continue
            want_acme = self.cfg is not None and acme.is_dns_name(name) and \
                (acme_names is None or name in acme_names)
            if not want_acme and is_own:
                continue  # on the relay's server certificate
            wanted[name] = self.names.get(name) or _Name(name, want_acme, is_own)
            wanted[name].acme, wanted[name].own = want_acme, is_own
        for name in acme_names or ():
            if name not in wanted and not self.selector.covers(name):
                wanted[name] = self.names.get(name) or _Name(name, True, False)
        for name in set(self.names) - set(wanted):
            self._unserve(self.names[name])
        self.names = wanted
        for st in list(wanted.values()):
            if not st.source:
                self._load(st)
            if not st.source and not st.own and not self._issue_from_ca(st):  # until ACME's arrives, if it is to
                if not st.acme:
                    del wanted[st.name]
        self._own_names = frozenset(n.lower() for n in own)
        self._own_public = any(self.selector.covers(n.lower()) for n in own) or \
            any(st.own and st.source == "acme" for st in wanted.values())
        if self._wake is not None:
            self._wake.set()

    # -- serving ----------------------------------------------------------------------------

    def _path(self, st: _Name, source: str) -> Path:
        return self.data / (ACME_DIR + "/certs" if source == "acme" else HOST_CERTS_DIR) / f"{st.name}.pem"

    def _load(self, st: _Name) -> None:
        """A certificate kept from an earlier run, if it still serves."""
        for source in (("acme", "host") if st.acme else ("host",)):
            path = self._path(st, source)
            try:
                pem = path.read_bytes()
                leaf = x509.load_pem_x509_certificates(pem)[0]
            except (OSError, *UNREADABLE):
                continue
            if st.name not in acme.dns_names(leaf) and source == "acme":
                continue
            if leaf.not_valid_after_utc.timestamp() <= time.time() + 60:
                continue
            if source == "host" and not self.ca.issued(leaf):
                continue  # another CA's (the data directory's CA was replaced)
            if self._serve(st, source, path, leaf):
                if source == "host" and st.acme:
                    st.next_at = 0.0  # ACME's is still to come
                return

    def _serve(self, st: _Name, source: str, path: Path, leaf: x509.Certificate) -> bool:
        try:
            ctx = self.make_context(str(path))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("certificate file not usable, ignored: %s", exc, extra={"host": st.name, "file": str(path)})
            return False
        if st.source and st.source != source:
            metrics.CERT_EXPIRY.remove(st.source, st.name)
        self.selector.set_managed(st.name, ctx)
        st.source = source
        st.serial = leaf.serial_number
        st.not_before = leaf.not_valid_before_utc.timestamp()
        st.not_after = leaf.not_valid_after_utc.timestamp()
        st.next_at = renew_at(st.not_before, st.not_after,
                              self.cfg.renew_before if source == "acme" and self.cfg is not None else None)
        metrics.CERT_EXPIRY.labels(source, st.name).set(st.not_after)
        return True

    def _unserve(self, st: _Name) -> None:
        if st.source:
            self.selector.set_managed(st.name, None)
            metrics.CERT_EXPIRY.remove(st.source, st.name)
            st.source = ""

    def _issue_from_ca(self, st: _Name) -> bool:
        """A certificate of the relay's CA for the name, served at once."""
        acme_next = st.next_at if st.acme else None
        try:
            chain, key = self.ca.issue_server_cert([st.name], days=HOST_CERT_DAYS)
        except ConfigError:
            log.warning("HTTP endpoint host %r cannot be named by a certificate; it gets the relay's", st.name[:80])
            return False
        path = self._path(st, "host")
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            write_private(path, chain + key)
        except OSError as exc:
            log.error("cannot write a host certificate: %s", exc.strerror, extra={"host": st.name})
            st.next_at = time.time() + 3600
            return False
        if not self._serve(st, "host", path, x509.load_pem_x509_certificates(chain)[0]):
            st.next_at = time.time() + 3600
            return False
        log.info("certificate issued by the relay's CA", extra={"host": st.name, "serial": f"{st.serial:x}"})
        if acme_next is not None:
            st.next_at = acme_next  # ACME's is still to come (or its retry is pending)
        return True

    # -- the HTTPS listener's choice by ClientHello -------------------------------------------

    @property
    def peeking(self) -> bool:
        """Whether the HTTPS listener should read ClientHellos now."""
        return bool(self._alpn) or self._own_public

    def choose(self, hello: ClientHello):
        """relayd.net.admission.TlsListener's chooser."""
        if _TLS_ALPN in hello.alpn:
            ctx = self._alpn.get(hello.server_name or "")
            metrics.ACME_CHALLENGES.labels("tls-alpn-01", "served" if ctx else "unknown").inc()
            return (ctx, _ChallengeDone) if ctx is not None else None
        if _RELAY_ALPN in hello.alpn and self._own_public and \
                (hello.server_name is None or hello.server_name in self._own_names):
            return self.own_context, None
        return None

    # -- HTTP-01 ----------------------------------------------------------------------------

    def http01(self, token: str, host: str) -> str | None:
        """The key authorization for ``token`` asked for at ``host``, or None."""
        found = self._http.get(token)
        if found is None or found[0] != host:
            return None
        return found[1]

    def _present(self, name: str, kind: str, token: str, key_authorization: str) -> None:
        # Called from the order's worker thread: single dict stores, which
        # the event loop reads whole.
        if kind == "http-01":
            self._http[token] = (name, key_authorization)
        else:
            cert, key = acme.tls_alpn_certificate(name, key_authorization)
            path = self.data / ACME_DIR / f".alpn-{name}.pem"
            write_private(path, cert + key)
            try:
                ctx = tls.server_context(str(path), None)
            finally:
                path.unlink(missing_ok=True)
            ctx.set_alpn_protocols([acme.ACME_TLS_ALPN])
            self._alpn[name] = ctx

    def _cleanup(self, name: str, kind: str, token: str) -> None:
        if kind == "http-01":
            self._http.pop(token, None)
        else:
            self._alpn.pop(name, None)

    # -- the renewal task -------------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        self._cancel.set()
        if self.client is not None:
            self.client.http.abort()
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            now = time.time()
            due = sorted((st for st in self.names.values() if st.next_at <= now), key=lambda s: s.next_at)
            for st in due:
                if self.names.get(st.name) is st:
                    await self._renew(st)
            self._wake.clear()
            soonest = min((st.next_at for st in self.names.values()), default=now + 3600)
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, min(soonest - time.time(), 3600)))
            except asyncio.TimeoutError:
                pass

    async def _renew(self, st: _Name) -> None:
        if not st.acme:
            self._issue_from_ca(st)
            return
        old_serial = st.serial if st.source == "acme" else None
        started = time.monotonic()
        try:
            chain, key = await asyncio.to_thread(self._order, st.name)
        except acme.AcmeError as exc:
            if self._cancel.is_set():
                return
            self._failed(st, exc)
            return
        except RelaydError as exc:  # a data directory we cannot write, a certificate we cannot load
            self._failed(st, acme.AcmeError("local", str(exc)))
            return
        path = self._path(st, "acme")
        try:
            write_private(path, chain + key)
        except OSError as exc:
            self._failed(st, acme.AcmeError("local", f"cannot write {path}: {exc.strerror}"))
            return
        leaf = x509.load_pem_x509_certificates(chain)[0]
        if not self._serve(st, "acme", path, leaf):
            self._failed(st, acme.AcmeError("local", f"the new certificate in {path} does not load"))
            return
        st.failures = 0
        metrics.ACME_ORDERS.labels("valid").inc()
        if st.own:
            self._own_public = True
        log.info("certificate renewed by ACME" if old_serial else "certificate issued by ACME", extra={
            "host": st.name, "serial": f"{st.serial:x}", "not_after": int(st.not_after),
            "renew_at": int(st.next_at), "seconds": round(time.monotonic() - started, 2)})
        if st.not_after - st.not_before <= (self.cfg.renew_before or 0):
            log.warning("acme.renew_before is not shorter than the certificates' lifetime; renewing with a third "
                        "of it left", extra={"host": st.name})

    def _order(self, name: str) -> tuple[bytes, bytes]:
        """In the worker thread: one order, the account registered if need be."""
        had = self.client.account_url
        try:
            return self.client.issue([name], self.cfg.challenge, self._present, self._cleanup)
        finally:
            if self.client.account_url and self.client.account_url != had:
                if had is not None:
                    log.warning("the ACME server did not know the recorded account; the account key is "
                                "registered again")
                self._save_account()

    def _failed(self, st: _Name, exc: acme.AcmeError) -> None:
        refused = isinstance(exc, acme.AcmeProblem) and exc.kind in acme.PROBLEM_TYPES
        metrics.ACME_ORDERS.labels("refused" if refused else "error").inc()
        kind = exc.kind if exc.kind in acme.PROBLEM_TYPES or exc.kind in acme.LOCAL_KINDS else "other"
        metrics.ACME_ERRORS.labels(kind).inc()
        delay = min(self.cfg.retry * 2 ** min(st.failures, 30), self.cfg.retry_max)
        if isinstance(exc, acme.AcmeProblem) and exc.kind == "rateLimited":
            delay = max(delay, min(3600.0, self.cfg.retry_max))
        st.failures += 1
        st.next_at = time.time() + delay
        log.warning("ACME order failed: %s", exc, extra={
            "host": st.name, "kind": kind, "failures": st.failures, "retry_in_s": round(delay, 1),
            "serving": {"acme": "the previous ACME certificate", "host": "the relay CA's certificate"}.get(
                st.source, "the relay's certificate")})


class _ChallengeDone(asyncio.Protocol):
    """A TLS-ALPN-01 validation connection: the handshake was the answer."""

    def __init__(self, ticket) -> None:
        self.ticket = ticket

    def connection_made(self, transport) -> None:
        self.ticket.release()
        transport.close()

    def connection_lost(self, exc) -> None:
        self.ticket.release()


# --- the plain-HTTP listener ---------------------------------------------------------------------

_CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,256}\Z")
_METHOD_START = re.compile(rb"(\r\n)*([A-Z]{1,20}( |\Z)|\r?\Z)")
_HOST = re.compile(r"([A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]{2,45}\])(:[0-9]{1,5})?\Z")
#: The plain-HTTP listener's limits: a head of at most this many bytes,
#: within HEAD_TIMEOUT seconds, one request per connection, at most
#: MAX_CONNECTIONS open at once.
MAX_HEAD = 8192
HEAD_TIMEOUT = 10.0
MAX_CONNECTIONS = 256


class ChallengeHttp:
    """The plain-HTTP listener: HTTP-01 answers and redirects to HTTPS."""

    def __init__(self, certs: HostCerts, https_port: Callable[[], int | None], admission=None) -> None:
        self.certs = certs
        self.https_port = https_port
        self.admission = admission
        self.open = 0
        self._servers: list[asyncio.AbstractServer] = []

    async def serve(self, socks: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for s in socks:
            self._servers.append(await loop.create_server(lambda: _HttpConn(self), sock=s))

    def close(self) -> None:
        for s in self._servers:
            s.close()

    def answer(self, head: http1.RequestHead) -> tuple[int, bytes, list]:
        """(status, body, extra headers) for one request."""
        host_field = head.get(b"host")
        if host_field is None or b"," in host_field:
            return 400, b"one Host header is required\n", []
        host = host_field.decode("latin-1")
        if not _HOST.match(host):
            return 400, b"bad Host header\n", []
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.lower()
        path = head.path
        if path.startswith(_CHALLENGE_PREFIX):
            token = path[len(_CHALLENGE_PREFIX):]
            auth = self.certs.http01(token.decode("ascii"), name) if _TOKEN.match(token) else None
            metrics.ACME_CHALLENGES.labels("http-01", "served" if auth else "unknown").inc()
            if head.method not in (b"GET", b"HEAD"):
                return 405, b"GET only\n", [(b"Allow", b"GET, HEAD")]
            if auth is None:
                return 404, b"no such challenge\n", []
            return 200, auth.encode("ascii"), []
        port = self.https_port()
        if port is None:
            return 404, b"not found\n", []
        if not head.target.startswith(b"/"):
            return 400, b"origin-form request target only\n", []
        location = f"https://{name}{'' if port == 443 else f':{port}'}".encode() + head.target
        return 308, b"", [(b"Location", location)]


class _HttpConn(asyncio.Protocol):
    def __init__(self, srv: ChallengeHttp) -> None:
        self.srv = srv
        self.buf = b""
        self.transport = None
        self.timer = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.srv.open += 1
        if not public_connection_ok(self.srv.admission, transport, "acme_http"):
            return
        if self.srv.open > MAX_CONNECTIONS:
            self._bad("too_many_connections", None)
            return
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._timeout)

    def connection_lost(self, exc) -> None:
        self.srv.open -= 1
        if self.timer is not None:
            self.timer.cancel()

    def _timeout(self) -> None:
        self._bad("head_timeout", None)

    def _bad(self, kind: str, status: int | None) -> None:
        metrics.BAD_INPUT.labels("acme_http", kind).inc()
        _LOG.info("plain-HTTP request refused: %s", kind, extra={"listener": "acme_http"})
        if status is not None:
            self.transport.write(http1.response(status, f"{kind}\n".encode()))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.buf is None:
            return
        self.buf += data
        try:
            if not _METHOD_START.match(self.buf):
                raise http1.HeadError("not an HTTP request")  # TLS on port 80, other protocols: now, not at a timeout
            end = http1.find_request_head(self.buf, MAX_HEAD)
            if end < 0:
                return
            head = http1.parse_request_head(self.buf[:end])
        except http1.HeadError as exc:
            self.buf = None
            self._bad("bad_head", exc.status)
            return
        self.buf = None
        self.timer.cancel()
        status, body, headers = self.srv.answer(head)
        if status == 400:
            metrics.BAD_INPUT.labels("acme_http", "bad_request").inc()
        out = http1.response(status, body, b"application/octet-stream" if status == 200 else
                             b"text/plain; charset=utf-8", headers=headers)
        if head.method == b"HEAD" and body:
            out = out[: len(out) - len(body)]
        self.transport.write(out)
        self.transport.close()
