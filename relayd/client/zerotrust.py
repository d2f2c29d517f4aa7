"""The zero-trust client: `relayd login` and `relayd connect`
(``../shared/specs/zero-trust.md`` sections 3, 7 and 8).

State lives in the client's data directory (mode 0700): a device id made
once, the session key (P-256, mode 0600) and certificate, the tokens, the
relay CA the client trusts the controller by (given as a file or a SHA-256
pin checked on first contact, like an agent's join token) and the
on-boarding secret of each user of this device.

``login`` sends the credentials (or an OpenID Connect code obtained through
the browser with a loopback redirect and PKCE) with a CSR; the certificate
and claims token come back, then the entitlement tokens. ``Connector`` keeps
one session per site (mTLS to a gateway, a WebSocket carrying yamux),
opens a stream per flow for the SOCKS5 proxy and the ``-L`` forwards,
answers interactions through a ``Prompter`` (the terminal, or the tests'),
renews at 75% of the tokens' life or when a gateway says ``renew``, and
says why when a gateway closes the session.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import secrets
import struct
import time
import urllib.parse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relayd.core.framing import encode_message
from relayd.errors import ConfigError, RelaydError
from relayd.net import tls
from relayd.net.mux import MuxConnection, MuxStream
from relayd.net.packets import PacketLink, TunDevice
from relayd.net.wslink import ClientUpgrade

log = logging.getLogger("relayd.client.zt")

API = "/_relayd/v1"
SESSION_PATH = API + "/session"
_STATE = "session.json"


class ZtClientError(RelaydError):
    """A refusal from the controller or a gateway, with its reason."""

    def __init__(self, reason: str, message: str, status: int = 0) -> None:
        super().__init__(f"{message} ({reason})")
        self.reason = reason
        self.status = status


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def token_payload(token: str) -> dict:
    """The payload of one of our own tokens (not verified: the client reads
    what it was given, the gateway verifies)."""
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


class ClientState:
    """The client's data directory."""

    def __init__(self, data: Path) -> None:
        self.dir = Path(data)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def path(self, name: str) -> Path:
        return self.dir / name

    def device_id(self) -> str:
        p = self.path("device-id")
        if p.exists():
            return p.read_text().strip()
        d = secrets.token_hex(16)
        p.write_text(d + "\n")
        return d

    def write_private(self, name: str, data: bytes) -> None:
        p = self.path(name)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(p, 0o600)

    def load(self) -> dict:
        try:
            return json.loads(self.path(_STATE).read_text())
        except FileNotFoundError:
            raise ConfigError(f"not signed in: run `relayd login` first (no {self.path(_STATE)})") from None

    def save(self, state: dict) -> None:
        self.write_private(_STATE, json.dumps(state).encode())


def new_key_and_csr(key: ec.EllipticCurvePrivateKey | None = None) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relayd client")]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


class Controller:
    """The controller's API as the client calls it (blocking http.client,
    run in a thread)."""

    def __init__(self, url: str, ca_file: str, cert: str | None = None, key: str | None = None) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "https" or not u.hostname:
            raise ConfigError(f"controller URL must be https://HOST[:PORT], not {url!r}")
        self.host, self.port = u.hostname, u.port or 443
        self.ctx = tls.relay_client_context(ca_file, cert_file=cert, key_file=key)

    def call(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = "Bearer " + token
        try:
            conn.request(method, API + path, json.dumps(body).encode() if body is not None else None, headers)
            r = conn.getresponse()
            data = r.read(4 << 20)
        except (OSError, http.client.HTTPException) as exc:
            raise ZtClientError("unreachable", f"controller {self.host}:{self.port}: {exc}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(data)
        except ValueError:
            raise ZtClientError("bad_answer", f"controller answered {r.status} without JSON", r.status) from None
        if r.status != 200:
            raise ZtClientError(doc.get("error", "refused"), doc.get("message", "refused"), r.status)
        return doc


def fetch_ca(url: str, pin: str) -> bytes:
    """The relay CA from its HTTPS port, checked against ``pin`` (SHA-256
    hex of its DER), as an agent does with its join token."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port or 443, context=tls.unverified_client_context(),
                                       timeout=15)
    try:
        conn.request("GET", API + "/ca")
        r = conn.getresponse()
        pem = r.read(65536)
    finally:
        conn.close()
    try:
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise ZtClientError("bad_ca", "the relay did not send a CA certificate") from None
    got = hashlib.sha256(der).hexdigest()
    if got != pin.lower().removeprefix("sha256:"):
        raise ZtClientError("pin_mismatch", f"the relay's CA has pin {got}, not the one given: refusing it")
    return pem


# -- sign-in --------------------------------------------------------------------------------


def login(data: Path, url: str, *, provider: str = "local", username: str | None = None,
          password: str | None = None, otp: str | None = None, ca_file: str | None = None,
          pin: str | None = None, browser=None, device_claims: dict | None = None) -> dict:
    """Sign in; the state saved in ``data``. ``browser(url) -> redirect
    URL`` drives an OpenID Connect provider's pages (the default opens the
    system browser and waits for the loopback redirect)."""
    st = ClientState(data)
    ca_path = st.path("relay-ca.pem")
    if ca_file:
        ca_path.write_bytes(Path(ca_file).read_bytes())
    elif pin:
        ca_path.write_bytes(fetch_ca(url, pin))
    elif not ca_path.exists():
        raise ConfigError("the first login needs the relay's CA: --ca FILE or --pin SHA256")
    ctl = Controller(url, str(ca_path))
    device_id = st.device_id()
    key, csr = new_key_and_csr()
    try:
        old = st.load()
    except ConfigError:
        old = {}
    secrets_by_user = old.get("onboarding", {})
    body = {"provider": provider, "device_id": device_id, "csr": csr,
            "device_claims": device_claims if device_claims is not None else collect_device_claims()}
    if provider == "local":
        body.update(username=username, password=password)
        if otp is not None:
            body["otp"] = otp
    else:
        body.update(oidc_code(ctl, provider, browser))
    who = f"{provider}/{username or ''}"
    for k, v in secrets_by_user.items():
        if provider != "local" and k.startswith(provider + "/") or k == who:
            body["onboarding_secret"] = v
    reply = ctl.call("POST", "/login", body)
    user = token_payload(reply["claims_token"])["user"]
    who = f"{provider}/{user['username']}"
    if "onboarding_secret" in reply:
        secrets_by_user[who] = reply["onboarding_secret"]
    st.write_private("key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    st.write_private("cert.pem", reply["certificate"].encode())
    state = {"url": url, "provider": provider, "username": user["username"], "sid": reply["sid"],
             "claims": reply["claims_token"], "sites": reply["sites"], "onboarding": secrets_by_user,
             "expires_at": reply["expires_at"]}
    state.update(fetch_entitlements(st, state))
    st.save(state)
    return state


def fetch_entitlements(st: ClientState, state: dict) -> dict:
    ctl = Controller(state["url"], str(st.path("relay-ca.pem")), str(st.path("cert.pem")), str(st.path("key.pem")))
    r = ctl.call("POST", "/entitlements", {}, token=state["claims"])
    return {"entitlements": r["entitlement_tokens"], "sites": r["sites"]}


def renew(st: ClientState, state: dict) -> dict:
    """New certificate (same key: the gateway sees the same key on its live
    connection) and tokens for the same session."""
    key = serialization.load_pem_private_key(st.path("key.pem").read_bytes(), None)
    _, csr = new_key_and_csr(key)
    ctl = Controller(state["url"], str(st.path("relay-ca.pem")), str(st.path("cert.pem")), str(st.path("key.pem")))
    r = ctl.call("POST", "/renew", {"csr": csr}, token=state["claims"])
    st.write_private("cert.pem", r["certificate"].encode())
    state = dict(state, claims=r["claims_token"], sites=r["sites"], expires_at=r["expires_at"])
    state.update(fetch_entitlements(st, state))
    st.save(state)
    return state


#: How long `relayd login` waits for the provider's redirect (a person signs in).
SIGN_IN_WAIT = 300.0


def open_browser(url: str) -> None:
    """The system's browser (``BROWSER`` names another) on ``url``; the URL
    is printed too, to open by hand."""
    import webbrowser

    print(f"Opening the browser to sign in; if it does not open, visit:\n  {url}", flush=True)
    webbrowser.open(url)


def oidc_code(ctl: Controller, provider: str, browser=None, *, fresh: bool = False,
              wait: float = SIGN_IN_WAIT) -> dict:
    """The Authorization Code flow with PKCE through a loopback redirect
    (RFC 8252): the code, its verifier, the redirect and the nonce.
    ``browser(url)`` shows the provider's pages (default: the system
    browser); the loopback listener serves while it runs, since a browser
    may return only when it is closed (a terminal browser does). ``fresh``
    asks the provider for the password again (``prompt=login``,
    ``max_age=0``: a step-up)."""
    import http.server
    import threading

    info = ctl.call("GET", "/providers").get(provider)
    if not info or info.get("type") != "oidc" or "authorization_endpoint" not in info:
        raise ZtClientError("unknown_provider", f"the controller has no OpenID Connect provider {provider!r}"
                            + (f" ({info['error']})" if info and info.get("error") else ""))
    verifier = _b64url(secrets.token_bytes(32))
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    got: dict = {}
    done = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            u = urllib.parse.urlsplit(self.path)
            if u.path != "/callback" or done.is_set():
                self.send_error(404)
                return
            got.update({k: v[0] for k, v in urllib.parse.parse_qs(u.query).items()})
            done.set()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"relayd: you can close this page.\n")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    redirect = f"http://127.0.0.1:{srv.server_address[1]}/callback"
    params = {"response_type": "code", "client_id": info["client_id"], "redirect_uri": redirect,
              "scope": info["scopes"], "state": state, "nonce": nonce,
              "code_challenge": _b64url(hashlib.sha256(verifier.encode()).digest()), "code_challenge_method": "S256"}
    if fresh:
        params.update(prompt="login", max_age="0")
    url = info["authorization_endpoint"] + ("&" if "?" in info["authorization_endpoint"] else "?") \
        + urllib.parse.urlencode(params)
    threading.Thread(target=srv.serve_forever, args=(0.2,), daemon=True).start()
    try:
        (browser or open_browser)(url)
        if not done.wait(wait):
            raise ZtClientError("timeout", f"the provider did not send the browser back within {wait:.0f} s")
    finally:
        srv.shutdown()
        srv.server_close()
    if got.get("state") != state:
        raise ZtClientError("bad_state", "the provider's redirect did not carry our state: refused")
    if "iss" in got and got["iss"] != info.get("issuer"):
        # RFC 9207: an answer from another provider than the one asked (mix-up)
        raise ZtClientError("bad_issuer", f"the redirect comes from {got['iss'][:100]!r}, not {provider}'s issuer")
    if "code" not in got:
        raise ZtClientError("no_code", f"the provider answered {got.get('error', 'no code')}"
                            + (f": {got['error_description'][:200]}" if got.get("error_description") else ""))
    return {"code": got["code"], "code_verifier": verifier, "redirect_uri": redirect, "nonce": nonce}


def collect_device_claims() -> dict:
    """What this device says about itself (untrusted at the gateway)."""
    import platform

    return {"os": {"family": platform.system().lower(), "version": platform.release()},
            "hostname": platform.node()[:64]}


# -- prompts --------------------------------------------------------------------------------


class Prompter:
    """How a user answers interactions; the default asks in the terminal."""

    async def otp(self, message: str) -> str | None:
        return await asyncio.to_thread(_ask, f"{message or 'One-time code'}: ")

    async def password(self, message: str) -> str | None:
        import getpass

        return await asyncio.to_thread(getpass.getpass, f"{message or 'Password'}: ")

    async def reason(self, message: str) -> str | None:
        return await asyncio.to_thread(_ask, f"{message or 'Reason'}: ")

    async def message(self, kind: str, message: str) -> None:
        print(f"relayd: {message}", flush=True)

    def browser(self, url: str) -> None:
        """Show an external provider's sign-in page (a step-up through it);
        called in a worker thread."""
        open_browser(url)

    def device_claims(self) -> dict:
        """The device's report collected again (after a fix-it message)."""
        return collect_device_claims()

    async def closed(self, site: str, reason: str, message: str) -> None:
        print(f"relayd: site {site}: session closed: {message} ({reason})", flush=True)


def format_gateway(hp) -> str:
    return f"{hp[0]}:{hp[1]}" if hp else "?"


def _ask(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


# -- sessions ----------------------------------------------------------------------------


#: Why a gateway closes a session for good: reconnecting cannot help (the
#: user signs in again, or another connection of the session took over).
FINAL_CLOSE = frozenset({"revoked", "expired", "replaced", "locked", "bad_hello", "bad_message", "session_mismatch",
                         "rollback", "bad_certificate", "wrong_site", "no_site"})


class SiteSession:
    """One site's session: the mux over the gateway's WebSocket, to the
    first gateway of the site that answers; ``keep`` connects again (the
    next gateway first) when the session drops for a reason that is not
    final."""

    def __init__(self, connector: "Connector", site: dict) -> None:
        self.c = connector
        self.site = site
        self.mux: MuxConnection | None = None
        self.control: MuxStream | None = None
        self.closed_reason: tuple[str, str] | None = None
        self.waiters: dict[str, asyncio.Future] = {}
        self.task: asyncio.Task | None = None
        self.welcome: dict | None = None
        self.last: dict = {}
        self.gw_index = 0  # the gateway tried first
        self.connected_to: tuple[str, int] | None = None
        self.reconnects = 0

    def gateways(self) -> list[tuple[str, int]]:
        """The site's gateways in the policy's order; none listed: the
        controller's relay."""
        out = []
        for g in self.site.get("gateways") or []:
            host, _, port = g.rpartition(":")
            out.append((host.strip("[]"), int(port)))
        if not out:
            u = urllib.parse.urlsplit(self.c.state["url"])
            out.append((u.hostname, u.port or 443))
        return out

    async def connect(self) -> dict:
        """A session at the first gateway that answers, from ``gw_index``
        on; a refusal of the tokens is final (another gateway of the site
        would refuse them too), unless the gateway cannot check them now."""
        gws = self.gateways()
        errors = []
        for i in range(len(gws)):
            k = (self.gw_index + i) % len(gws)
            host, port = gws[k]
            try:
                msg = await self._connect_to(host, port)
            except ZtClientError as exc:
                if exc.reason in FINAL_CLOSE:
                    raise
                errors.append(f"{host}:{port}: {exc}")
            except (OSError, RelaydError, asyncio.TimeoutError) as exc:
                errors.append(f"{host}:{port}: {exc or type(exc).__name__}")
            else:
                self.gw_index, self.connected_to = k, (host, port)
                return msg
        raise ZtClientError("unreachable", f"no gateway of site {self.site['id']} answers: " + "; ".join(errors))

    async def _connect_to(self, host: str, port: int) -> dict:
        st = self.c.st
        ctx = tls.relay_client_context(str(st.path("relay-ca.pem")), cert_file=str(st.path("cert.pem")),
                                 key_file=str(st.path("key.pem")))
        mux = MuxConnection(True, name="zt-" + self.site["id"])
        up = ClientUpgrade(mux, f"{host}:{port}", path=SESSION_PATH)
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: up, host, port, ssl=ctx, server_hostname=host)
        try:
            await asyncio.wait_for(up.done, 15)
        except BaseException:
            mux.abort()
            raise
        self.mux = mux
        self.closed_reason = None
        self.control = await mux.open_stream()
        s = self.c.state
        await self.control.write(encode_message({
            "type": "hello", "claims": s["claims"], "entitlements": s["entitlements"].get(self.site["id"], ""),
            "device": self.c.device_claims, "reasons": self.c.cached_reasons(), "client": "relayd"},
            512 * 1024))
        try:
            msg = await asyncio.wait_for(self.control.read_message(1 << 20), 15)
        except BaseException:
            mux.abort()
            raise
        if msg.get("type") != "welcome":
            mux.abort()
            raise ZtClientError(msg.get("reason", "refused"), msg.get("message", "the gateway refused the session"))
        self.welcome = msg
        self.task = loop.create_task(self._control_loop())
        return msg

    async def keep(self) -> str:
        """Connect again whenever the session drops, until a gateway closes
        it for good; returns that reason. The next gateway of the site is
        tried first, then each in turn with backoff (0.5 s doubling to 30 s)."""
        while True:
            await asyncio.shield(self.mux.closed_future)
            if self.task is not None:
                await asyncio.gather(self.task, return_exceptions=True)  # the last messages, "closed" among them
            if self.closed_reason and self.closed_reason[0] in FINAL_CLOSE:
                return self.closed_reason[0]
            log.warning("site %s: session to %s lost (%s): connecting again", self.site["id"],
                        format_gateway(self.connected_to), self.closed_reason[0] if self.closed_reason else "link lost")
            self.gw_index += 1
            delay = 0.5
            while True:
                await asyncio.sleep(delay)
                try:
                    await self.connect()
                    break
                except ZtClientError as exc:
                    if exc.reason in FINAL_CLOSE:
                        self.closed_reason = (exc.reason, str(exc))
                        await self.c.prompter.closed(self.site["id"], exc.reason, str(exc))
                        return exc.reason
                    log.warning("site %s: %s", self.site["id"], exc)
                except (OSError, RelaydError, asyncio.TimeoutError) as exc:
                    log.warning("site %s: %s", self.site["id"], exc or type(exc).__name__)
                delay = min(delay * 2, 30.0)
            self.reconnects += 1
            log.warning("site %s: connected again, to %s", self.site["id"], format_gateway(self.connected_to))
            if self.c.tun_name is not None:
                try:
                    await self.c.tun_site(self)
                except RelaydError as exc:
                    log.warning("site %s: TUN mode not restored: %s", self.site["id"], exc)

    async def _control_loop(self) -> None:
        try:
            while True:
                msg = await self.control.read_message(1 << 20)
                self.last = msg
                t = msg.get("type")
                if t == "interaction":
                    asyncio.get_running_loop().create_task(self.c.interact(self, msg))
                elif t == "interaction_done":
                    w = self.waiters.pop(msg.get("id"), None)
                    if w is not None and not w.done():
                        w.set_result(msg.get("result"))
                elif t == "renew":
                    asyncio.get_running_loop().create_task(self.c.renew(jitter=min(30.0, max(
                        0.0, msg.get("deadline", 0) - time.time()) / 4)))
                elif t == "closed":
                    self.closed_reason = (msg.get("reason", "closed"), msg.get("message", ""))
                    await self.c.prompter.closed(self.site["id"], *self.closed_reason)
                elif t == "error":
                    log.warning("gateway: %s", msg.get("message"))
        except (RelaydError, asyncio.IncompleteReadError, ConnectionError):
            pass
        for w in self.waiters.values():
            if not w.done():
                w.set_result("closed")

    async def send(self, msg: dict) -> None:
        await self.control.write(encode_message(msg, 512 * 1024))

    async def open_flow(self, host: str, port: int) -> tuple[MuxStream | None, dict]:
        if self.mux is None or self.mux.closed:
            return None, {"r": "unreachable", "why": "the session to the gateway is down: connecting again"}
        st = await self.mux.open_stream()
        await st.write(encode_message({"proto": "tcp", "host": host, "port": port}))
        try:
            reply = await asyncio.wait_for(st.read_message(4096), 30)
        except (RelaydError, asyncio.IncompleteReadError, ConnectionError):
            st.reset()
            return None, {"r": "closed"}
        if reply.get("r") != "ok":
            st.reset()
            return None, reply
        return st, reply


class Connector:
    """`relayd connect`: a session per site, flows on demand."""

    def __init__(self, data: Path, prompter: Prompter | None = None, device_claims: dict | None = None) -> None:
        self.st = ClientState(data)
        self.state = self.st.load()
        self.prompter = prompter or Prompter()
        self.device_claims = device_claims if device_claims is not None else collect_device_claims()
        self.sessions: dict[str, SiteSession] = {}
        self.reasons: dict = {}  # suffix -> (at, text)
        self.servers: list[asyncio.AbstractServer] = []
        self.tuns: list = []  # (TunDevice, its link's task)
        self._renew_task: asyncio.Task | None = None
        self._renewing: asyncio.Lock | None = None
        self.keepers: dict[str, asyncio.Task] = {}
        self.tun_name: str | None = None  # TUN mode asked for: its device name

    def cached_reasons(self) -> list:
        return [{"suffix": s, "text": t, "at": at} for s, (at, t) in self.reasons.items()]

    async def start(self) -> None:
        self._renewing = asyncio.Lock()
        for site in self.state["sites"]:
            if site["id"] not in self.state.get("entitlements", {}):
                continue
            s = SiteSession(self, site)
            await s.connect()
            self.sessions[site["id"]] = s
        if not self.sessions:
            raise ZtClientError("no_sites", "no site grants this user anything")
        loop = asyncio.get_running_loop()
        self._renew_task = loop.create_task(self._renew_loop())
        self.keepers = {sid: loop.create_task(s.keep()) for sid, s in self.sessions.items()}

    async def wait_closed(self) -> dict:
        """Until every site's session is closed for good: site -> reason."""
        reasons = await asyncio.gather(*self.keepers.values())
        return dict(zip(self.keepers, reasons))

    async def close(self) -> None:
        if self._renew_task is not None:
            self._renew_task.cancel()
        for t in self.keepers.values():
            t.cancel()
        for srv in self.servers:
            srv.close()
        for dev, task in self.tuns:
            task.cancel()
            dev.close()
        for s in self.sessions.values():
            if s.mux is not None:
                s.mux.abort()

    async def _renew_loop(self) -> None:
        while True:
            p = token_payload(self.state["claims"])
            ends = [p["exp"]] + [token_payload(t)["exp"] for t in self.state["entitlements"].values()]
            iat = p["iat"]
            at = iat + (min(ends) - iat) * 0.75
            await asyncio.sleep(max(1.0, at - time.time()))
            try:
                await self.renew()
            except RelaydError as exc:
                log.warning("renewal failed: %s", exc)
                await asyncio.sleep(10)

    async def renew(self, jitter: float = 0.0) -> None:
        if jitter:
            await asyncio.sleep(secrets.randbelow(int(jitter * 1000) + 1) / 1000)
        async with self._renewing:
            self.state = await asyncio.to_thread(renew, self.st, self.state)
            cert = self.st.path("cert.pem").read_text()
            for sid, s in self.sessions.items():
                if sid in self.state["entitlements"]:
                    await s.send({"type": "tokens", "certificate": cert, "claims": self.state["claims"],
                                  "entitlements": self.state["entitlements"][sid]})

    def site_for(self, host: str) -> SiteSession | None:
        try:
            a = ipaddress.ip_address(host)
        except ValueError:
            a = None
        for sid, s in self.sessions.items():
            if a is not None:
                if any(a in ipaddress.ip_network(n) for n in s.site.get("networks", [])):
                    return s
            else:
                ents = token_payload(self.state["entitlements"][sid]).get("entitlements", [])
                if any(host.lower() == h.lower() for e in ents for act in e["actions"] for h in act["hosts"]):
                    return s
        return next(iter(self.sessions.values()), None) if len(self.sessions) == 1 else None

    async def open_flow(self, host: str, port: int) -> tuple[MuxStream | None, dict]:
        """A flow to ``host:port``; a step-up asked on the way is answered
        through the prompter and the flow tried once more."""
        s = self.site_for(host)
        if s is None:
            return None, {"r": "denied", "why": "no site for this destination"}
        stream, reply = await s.open_flow(host, port)
        if reply.get("r") == "stepup_required" and reply.get("interaction"):
            w = s.waiters.setdefault(reply["interaction"], asyncio.get_running_loop().create_future())
            try:
                result = await asyncio.wait_for(asyncio.shield(w), 120)
            except asyncio.TimeoutError:
                result = None
            if result == "granted":
                stream, reply = await s.open_flow(host, port)
        return stream, reply

    async def interact(self, s: SiteSession, msg: dict) -> None:
        """Answer one interaction: the remedies in order until one is done
        (any) or every one (all)."""
        w = s.waiters.setdefault(msg["id"], asyncio.get_running_loop().create_future())
        done_any = False
        for r in msg.get("remedies", []):
            done = await self._remedy(s, r, msg["id"])
            done_any = done_any or done
            if done and msg.get("logic") != "all":
                break
        if not done_any and not w.done():
            w.set_result("not_granted")  # nothing the user can do now: the flow stays refused

    async def _remedy(self, s: SiteSession, r: dict, interaction: str) -> bool:
        t = r.get("type")
        p = self.prompter
        if t in ("otp", "password"):
            ctl = Controller(self.state["url"], str(self.st.path("relay-ca.pem")), str(self.st.path("cert.pem")),
                             str(self.st.path("key.pem")))
            if t == "password" and r.get("provider") not in (None, "local"):
                # An external provider's password: a fresh sign-in there.
                await p.message("info", r.get("message") or f"Sign in again at {r['provider']}")
                try:
                    cred = await asyncio.to_thread(oidc_code, ctl, r["provider"], p.browser, fresh=True)
                except ZtClientError as exc:
                    await p.message("info", f"step-up refused: {exc}")
                    return False
            else:
                cred = await (p.otp(r.get("message", "")) if t == "otp" else p.password(r.get("message", "")))
            if cred is None:
                return False
            try:
                reply = await asyncio.to_thread(ctl.call, "POST", "/stepup", {
                    "method": t, "suffix": r["suffix"], "provider": r.get("provider"), "credential": cred},
                    self.state["claims"])
            except ZtClientError as exc:
                await p.message("info", f"step-up refused: {exc}")
                return False
            self.state = dict(self.state, claims=reply["claims_token"])
            self.st.save(self.state)
            for other in self.sessions.values():
                await other.send({"type": "claims", "claims": self.state["claims"]})
            return True
        if t == "reason":
            text = await p.reason(r.get("message", ""))
            if text is None:
                return False
            self.reasons[r["suffix"]] = (int(time.time()), text)
            await s.send({"type": "reason", "interaction": interaction, "suffix": r["suffix"], "text": text})
            return True
        if t == "message":
            await p.message(r.get("kind", "info"), r.get("message", ""))
            if r.get("kind") == "fix":
                self.device_claims = p.device_claims()
                await s.send({"type": "device", "claims": self.device_claims})
                return True
        return False

    # -- local access -------------------------------------------------------------------------

    async def tun(self, name: str = "relayd%d") -> dict:
        """TUN mode: a TUN device per site, its address from the gateway,
        routes to the site's networks through it (made again after a
        reconnect). Returns site -> (device, address, networks)."""
        self.tun_name = name
        return {sid: await self.tun_site(s) for sid, s in self.sessions.items()}

    async def tun_site(self, s: SiteSession) -> tuple[str, str, list]:
        sid = s.site["id"]
        st = await s.mux.open_stream()
        await st.write(encode_message({"proto": "ip"}))
        try:
            reply = await asyncio.wait_for(st.read_message(4096), 30)
        except (RelaydError, asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            st.reset()
            raise ZtClientError("tun_refused", f"site {sid}: the gateway did not answer the TUN request") from None
        if reply.get("r") != "ok":
            st.reset()
            raise ZtClientError("tun_refused", f"site {sid}: TUN mode refused ({reply.get('why') or reply.get('r')})")
        dev = TunDevice(self.tun_name)
        try:
            dev.configure(f"{reply['address']}/32", int(reply["mtu"]), s.site.get("networks", []))
        except RelaydError:
            dev.close()
            st.reset()
            raise
        link = PacketLink(st, dev.write, "tun-" + sid)

        def pump():
            for pkt in dev.read_batch():
                link.send(pkt)

        loop = asyncio.get_running_loop()
        loop.add_reader(dev.fd, pump)
        task = loop.create_task(link.run())
        task.add_done_callback(lambda _t: dev.close())
        self.tuns = [(d, t) for d, t in self.tuns if not t.done()] + [(dev, task)]
        return dev.name, reply["address"], list(s.site.get("networks", []))

    async def forward(self, local: tuple[str, int], host: str, port: int) -> asyncio.AbstractServer:
        """``-L LOCALPORT:HOST:PORT``."""

        async def client(reader, writer):
            stream, reply = await self.open_flow(host, port)
            if stream is None:
                log.warning("flow to %s:%d refused: %s", host, port, reply.get("why") or reply.get("r"))
                writer.close()
                return
            await _splice(stream, reader, writer)

        srv = await asyncio.start_server(client, *local)
        self.servers.append(srv)
        return srv

    async def socks(self, local: tuple[str, int]) -> asyncio.AbstractServer:
        """A SOCKS5 proxy (RFC 1928: no authentication, CONNECT only)."""

        async def client(reader, writer):
            try:
                target = await _socks_handshake(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.TimeoutError):
                writer.close()
                return
            if target is None:
                return
            host, port = target
            stream, reply = await self.open_flow(host, port)
            code = 0 if stream is not None else (2 if reply.get("r") in ("denied", "stepup_required") else 4)
            writer.write(b"\x05" + bytes([code]) + b"\x00\x01\x00\x00\x00\x00\x00\x00")
            if stream is None:
                await writer.drain()
                writer.close()
                return
            await _splice(stream, reader, writer)

        srv = await asyncio.start_server(client, *local)
        self.servers.append(srv)
        return srv


async def _socks_handshake(reader, writer) -> tuple[str, int] | None:
    async with asyncio.timeout(10):
        ver, n = await reader.readexactly(2)
        methods = await reader.readexactly(n)
        if ver != 5 or 0 not in methods:
            writer.write(b"\x05\xff")
            writer.close()
            return None
        writer.write(b"\x05\x00")
        ver, cmd, _, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        elif atyp == 3:
            (ln,) = await reader.readexactly(1)
            host = (await reader.readexactly(ln)).decode("idna")
        else:
            raise ValueError("address type")
        (port,) = struct.unpack(">H", await reader.readexactly(2))
        if cmd != 1:
            writer.write(b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00")  # command not supported
            writer.close()
            return None
        return host, port


async def _splice(stream: MuxStream, reader, writer) -> None:
    async def up():
        try:
            while data := await reader.read(256 * 1024):
                await stream.write(data)
            stream.write_eof()
        except (RelaydError, ConnectionError):
            stream.reset()

    async def down():
        try:
            while data := await stream.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (RelaydError, ConnectionError, asyncio.IncompleteReadError):
            writer.transport.abort()

    try:
        await asyncio.gather(up(), down())
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
