"""Sign-in through a real OpenID Connect provider on loopback: panva's
oidc-provider (tests/interop/oidc, pinned; the test command installs it)
run by node, never a mock. A person at a browser is played by
tests/zerotrust/oidc_browser.py, which fills in the provider's own forms
and follows its redirects to the client's loopback listener.

Between relayd (and the browser) and the provider sits ``Wire``, a plain
HTTP forwarder: the provider's issuer names it, so that a test can make it
an attacker on the network path (the IdP mix-up of RFC 9207, a token
substitution) while the provider and relayd stay real. The provider runs a
second tenant that shares its signing keys, as the tenants of a
multi-tenant IdP do: only ``iss`` tells their ID tokens apart.

- `relayd login --provider corp` with BROWSER set: the groups from the
  provider select the policy; an entitled flow passes, another is denied.
- A password step-up through the provider (prompt=login, max_age=0) in a
  live session; a code the provider gave without asking again is refused.
- Hostile sign-ins: a wrong nonce, a wrong state or issuer in the redirect,
  a spent code, a wrong PKCE verifier, an ID token of another tenant or
  another client: each refused with its reason (and, at the controller,
  counted in relayd_token_rejections_total) while a bystander's session
  keeps its flows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import http.cookiejar
import http.server
import json
import os
import re
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from relayd.client import zerotrust as zc
from relayd.config import load_serve
from relayd.control.oidc import Provider
from relayd.errors import ConfigError
from relayd.control.policy import Policy
from relayd.control.ztstore import ZtStore
from relayd.net import run
from tests.metric import value
from tests.tunnel.processes import free_port, stop_pid
from tests.waiting import until
from tests.zerotrust import oidc_browser, stack
from tests.zerotrust.stack import ADDRS, echo_through, policy_doc, site

pytestmark = pytest.mark.interop

NODE = shutil.which("node")
PROVIDER_DIR = Path(__file__).resolve().parents[1] / "interop" / "oidc"
BROWSER = Path(oidc_browser.__file__).resolve()
WAIT = 30  # seconds: the bound of every step that involves the provider


class Wire:
    """The network path to the provider: each request passed on to it as
    it came (Host included), unless ``steer(method, path, headers, body)``
    returns ``(port, headers, body)`` to send it elsewhere."""

    def __init__(self) -> None:
        self.upstream = 0
        self.steer = None
        wire = self

        class Hop(http.server.BaseHTTPRequestHandler):
            def forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive", "content-length")}
                port = wire.upstream
                steered = wire.steer and wire.steer(self.command, self.path, headers, body)
                if steered:
                    port, headers, body = steered
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
                try:
                    conn.request(self.command, self.path, body if self.command == "POST" else None, headers)
                    r = conn.getresponse()
                    data = r.read()
                finally:
                    conn.close()
                self.send_response_only(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = forward

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hop)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, args=(0.1,), daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@dataclass
class Idp:
    issuer: str  # through the wire
    tenant: str  # the second tenant's issuer (direct)
    tenant_port: int
    clients: dict  # client_id -> secret
    accounts: dict  # username -> {password, email, groups}
    wire: Wire

    def provider(self, name: str = "corp") -> Provider:
        """relayd's [zerotrust.providers.corp]."""
        return Provider(name, self.issuer, "relayd", self.clients["relayd"], scopes="openid profile email groups",
                        username_claim="preferred_username")

    def browser(self, username: str, jar=None, log: list | None = None, **kw):
        """A browser callable for the client: signs in as ``username``."""
        jar = jar if jar is not None else http.cookiejar.CookieJar()

        def go(url: str) -> None:
            visit = oidc_browser.sign_in(url, username, self.accounts[username]["password"], jar=jar, **kw)
            if log is not None:
                log.append(visit)

        return go


@pytest.fixture(scope="module")
def idp():
    if NODE is None:
        pytest.skip("node is not installed")
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("the npm package oidc-provider is missing: run the test command (scripts/test.sh), which "
                    "installs it from tests/interop/oidc/package-lock.json")
    wire = Wire()
    port, tenant_port = free_port(), free_port()
    wire.upstream = port
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([NODE, "provider.mjs", str(port), "--issuer", wire.url, "--tenant", str(tenant_port)],
                            cwd=PROVIDER_DIR, stdout=subprocess.PIPE, stderr=err)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], WAIT)
        line = proc.stdout.readline() if ready else b""
        if not line:
            err.seek(0)
            pytest.fail(f"the provider did not start within {WAIT}s: {err.read()[-2000:].decode(errors='replace')}")
        info = json.loads(line)
        yield Idp(info["issuer"], info["tenant"], tenant_port,
                  {c["client_id"]: c["client_secret"] for c in info["clients"]},
                  {a["username"]: a for a in info["accounts"]}, wire)
    finally:
        stop_pid(proc)
        proc.stdout.close()
        err.close()
        wire.close()


@pytest.fixture
def wire(idp):
    yield idp.wire
    idp.wire.steer = None


def oidc_policy() -> dict:
    """The stack's policy and what the provider's users get: its group
    "engineering" selects p-eng; 127.0.0.6 also wants the password again at
    the provider within 10 minutes."""
    doc = policy_doc()
    doc["conditions"].append(
        {"id": "c-corp-pw", "criteria": [{"stepup": "password", "suffix": "corp", "provider": "corp",
                                          "max_age": "10m"}],
         "remedies": [{"type": "password", "provider": "corp", "suffix": "corp",
                       "message": "Sign in again at corp"}]})
    for eid, key, conds in (("e-eng", "open", []), ("e-eng-pw", "password", ["c-corp-pw"])):
        doc["entitlements"].append({"id": eid, "site": "s-lab", "conditions": conds, "tags": ["eng"], "actions": [
            {"action": "allow", "proto": "tcp", "hosts": [ADDRS[key]], "ports": ["1024-65535"]}]})
    doc["policies"].append({"id": "p-eng", "match": {"criteria": [{"claim": "user.groups", "op": "contains",
                                                                    "value": "engineering"}]},
                            "entitlement_tags": ["eng"]})
    return doc


@contextlib.asynccontextmanager
async def oidc_site(tmp: Path, idp: Idp):
    async with site(tmp, providers={"corp": idp.provider()}) as s:
        ZtStore(s.relay.store).import_policy(Policy.from_doc(oidc_policy()))
        yield s


class BrowserPrompter(stack.TestPrompter):
    """The tests' prompter with a browser for step-ups at the provider."""

    def __init__(self, s, browser) -> None:
        super().__init__(s)
        self.browse = browser

    def browser(self, url: str) -> None:
        self.asked.append(("browser", url.split("?")[0]))
        self.browse(url)


async def connect(s, data: str, browser=None) -> zc.Connector:
    c = zc.Connector(s.tmp / data, BrowserPrompter(s, browser), device_claims={"os": {"family": "linux"}})
    await c.start()
    return c


def sign_in(s, idp: Idp, username: str, data: str, jar=None, log=None) -> dict:
    return zc.login(s.tmp / data, s.url, provider="corp", ca_file=str(s.relay.ca_path),
                    browser=idp.browser(username, jar, log), device_claims={"os": {"family": "linux"}})


def login_body(extra: dict) -> dict:
    """A /login request of a new device, with an OpenID Connect answer."""
    _, csr = zc.new_key_and_csr()
    return {"provider": "corp", "device_id": secrets.token_hex(16), "csr": csr, "device_claims": {}, **extra}


def refused_login(s, body: dict, reason: str) -> zc.ZtClientError:
    """POST /login is refused with ``reason``, counted once."""
    before = value("relayd_token_rejections_total", reason=reason)
    with pytest.raises(zc.ZtClientError) as e:
        zc.Controller(s.url, str(s.relay.ca_path)).call("POST", "/login", body)
    assert e.value.reason == reason, str(e.value)
    assert value("relayd_token_rejections_total", reason=reason) == before + 1
    return e.value


def authorize(issuer: str, client_id: str, browser) -> dict:
    """A code from ``issuer`` for ``client_id`` (as a client of it would
    get one), with what relayd's /login wants beside it."""
    verifier, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(16)
    redirect = f"http://127.0.0.1:{free_port()}/callback"
    url = f"{issuer}/auth?" + urllib.parse.urlencode({
        "response_type": "code", "client_id": client_id, "redirect_uri": redirect, "state": "s",
        "scope": "openid profile email groups", "nonce": nonce, "code_challenge_method": "S256",
        "code_challenge": base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")})
    visit = oidc_browser.sign_in(url, *browser, follow=False)
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(visit.redirect).query)["code"][0]
    return {"code": code, "code_verifier": verifier, "redirect_uri": redirect, "nonce": nonce}


def _basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(
        f"{urllib.parse.quote(client_id)}:{urllib.parse.quote(secret)}".encode()).decode()


# -- sign-in and access ------------------------------------------------------------------------


def test_relayd_login_through_the_provider_then_access_by_its_groups(tmp_path, idp):
    """`relayd login --provider corp` opens BROWSER on the provider's page;
    the browser signs in and lands on the client's loopback listener; the
    controller exchanges the code (PKCE, client secret) and takes the
    groups from the provider's UserInfo. The group selects p-eng: its flow
    passes, a flow nothing allows is denied. bob (sales) signs in too, and
    no site grants him anything."""
    script = tmp_path / "browser"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{BROWSER}" "$@"\n')
    script.chmod(0o755)

    def relayd_login(s, username: str, data: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, BROWSER=str(script), RELAYD_TEST_OIDC_USER=username,
                   RELAYD_TEST_OIDC_PASSWORD=idp.accounts[username]["password"],
                   RELAYD_TEST_OIDC_LOG=str(tmp_path / f"{data}.pages"))
        return subprocess.run([sys.executable, "-m", "relayd.cli", "login", s.url, "--provider", "corp",
                               "--ca", str(s.relay.ca_path), "--data", str(tmp_path / data)],
                              env=env, capture_output=True, text=True, timeout=WAIT)

    async def main():
        async with oidc_site(tmp_path, idp) as s:
            logins = value("relayd_zt_logins_total", provider="oidc", result="success")
            r = await asyncio.to_thread(relayd_login, s, "alice", "alice")
            assert r.returncode == 0, r.stderr
            assert "signed in as alice (corp); sites: s-lab" in r.stdout
            # The browser filled in the provider's form and was answered by
            # the client's loopback listener (while `relayd login` waited on it).
            pages = (tmp_path / "alice.pages").read_text().splitlines()
            assert any(p.startswith("POST ") and p.endswith("/login 303") for p in pages), pages
            assert re.fullmatch(r"GET http://127\.0\.0\.1:\d+/callback 200", pages[-1]), pages
            assert value("relayd_zt_logins_total", provider="oidc", result="success") == logins + 1
            state = json.loads((tmp_path / "alice" / "session.json").read_text())
            user = zc.token_payload(state["claims"])["user"]
            assert user == {"username": "alice", "provider": "corp", "groups": ["engineering"],
                            "email": "alice@example.com"}
            c = await connect(s, "alice")
            try:
                assert await echo_through(c, "open", s)
                stream, reply = await c.open_flow(ADDRS["none"], s.ports["none"])
                assert stream is None and reply["r"] == "denied"
            finally:
                await c.close()
            r = await asyncio.to_thread(relayd_login, s, "bob", "bob")
            assert r.returncode == 0, r.stderr
            assert "signed in as bob (corp); sites: none" in r.stdout
            with pytest.raises(zc.ZtClientError) as e:
                await connect(s, "bob")
            assert e.value.reason == "no_sites"

    run(main())


# -- step-up -----------------------------------------------------------------------------------


async def _after_sign_in_second(state: dict) -> None:
    # Times are whole seconds: a fresh authentication counts when it is
    # later than the sign-in's second (as a person's always is).
    at = zc.token_payload(state["claims"])["auth"]["time"]
    await until(lambda: int(time.time()) > at, 3, "the clock did not pass the sign-in's second")


def test_password_step_up_at_the_provider_in_the_same_session(tmp_path, idp):
    """A flow whose entitlement wants the password again at the provider:
    the gateway asks, the client opens the provider with prompt=login and
    max_age=0; although the browser still has its session there, the
    provider asks for the password; the controller checks the new
    auth_time; the flow passes in the same session, and the next one
    without asking."""

    async def main():
        async with oidc_site(tmp_path, idp) as s:
            jar = http.cookiejar.CookieJar()
            visits: list = []
            state = await asyncio.to_thread(sign_in, s, idp, "alice", "client", jar, visits)
            assert visits[0].logins == 1
            await _after_sign_in_second(state)
            c = await connect(s, "client", idp.browser("alice", jar, visits))
            try:
                mux = c.sessions["s-lab"].mux
                stepups = value("relayd_zt_stepups_total", method="password", result="success")
                assert await asyncio.wait_for(echo_through(c, "password", s), WAIT)
                assert [a[0] for a in c.prompter.asked] == ["message", "browser"]
                assert c.prompter.asked[0] == ("message", "info", "Sign in again at corp")
                assert len(visits) == 2 and visits[1].logins == 1, "the provider did not ask the password again"
                assert value("relayd_zt_stepups_total", method="password", result="success") == stepups + 1
                claims = zc.token_payload(c.state["claims"])
                assert claims["stepup"]["password:corp"]["p"] == "corp"
                assert c.sessions["s-lab"].mux is mux and not mux.closed
                assert await echo_through(c, "password", s)
                assert len(c.prompter.asked) == 2 and len(visits) == 2
            finally:
                await c.close()

    run(main())


def test_step_up_without_a_fresh_password_is_refused(tmp_path, idp):
    """A client that leaves out prompt=login gets a code from the browser's
    session at the provider without a password: its auth_time is the
    sign-in's, and the controller refuses the step-up (counted). The
    session itself is unharmed."""

    async def main():
        async with oidc_site(tmp_path, idp) as s:
            jar = http.cookiejar.CookieJar()
            visits: list = []
            state = await asyncio.to_thread(sign_in, s, idp, "alice", "client", jar, visits)
            await _after_sign_in_second(state)
            st = zc.ClientState(tmp_path / "client")
            ctl = zc.Controller(s.url, str(st.path("relay-ca.pem")), str(st.path("cert.pem")), str(st.path("key.pem")))
            cred = await asyncio.to_thread(zc.oidc_code, ctl, "corp", idp.browser("alice", jar, visits))
            assert visits[1].logins == 0  # the provider's session answered
            before = value("relayd_token_rejections_total", reason="stepup_failed")
            with pytest.raises(zc.ZtClientError) as e:
                await asyncio.to_thread(ctl.call, "POST", "/stepup", {
                    "method": "password", "suffix": "corp", "provider": "corp", "credential": cred}, state["claims"])
            assert e.value.reason == "stepup_failed" and "password again" in str(e.value)
            assert value("relayd_token_rejections_total", reason="stepup_failed") == before + 1
            c = await connect(s, "client")
            try:
                assert await echo_through(c, "open", s)
            finally:
                await c.close()

    run(main())


# -- hostile sign-ins --------------------------------------------------------------------------


def test_hostile_sign_ins_are_refused_while_a_bystander_keeps_working(tmp_path, idp, wire):
    async def main():
        async with oidc_site(tmp_path, idp) as s:
            await asyncio.to_thread(sign_in, s, idp, "alice", "bystander")
            c = await connect(s, "bystander")
            stream, reply = await c.open_flow(ADDRS["open"], s.ports["open"])
            assert reply["r"] == "ok"

            async def bystander_ok():
                await stream.write(b"still here")
                assert await asyncio.wait_for(stream.read(10), 5) == b"still here"

            ctl = zc.Controller(s.url, str(s.relay.ca_path))
            alice = ("alice", idp.accounts["alice"]["password"])

            async def code(**kw) -> dict:
                return await asyncio.to_thread(zc.oidc_code, ctl, "corp", idp.browser("alice", **kw))

            try:
                # The ID token's nonce is not the one this sign-in sent.
                body = await code()
                e = await asyncio.to_thread(refused_login, s, login_body(dict(body, nonce="another")), "bad_id_token")
                assert "wrong nonce" in str(e)
                await bystander_ok()

                # A redirect that is not the answer to this client's request
                # (another state: login CSRF; another issuer: mix-up,
                # RFC 9207) is refused by the client before the controller
                # sees the code.
                logins = value("relayd_zt_logins_total", provider="oidc", result="success")
                for key, bad, reason in (("state", "forged", "bad_state"), ("iss", idp.tenant, "bad_issuer")):
                    def tamper(url, key=key, bad=bad):
                        u = urllib.parse.urlsplit(url)
                        q = dict(urllib.parse.parse_qsl(u.query), **{key: bad})
                        return u._replace(query=urllib.parse.urlencode(q)).geturl()

                    with pytest.raises(zc.ZtClientError) as e:
                        await code(tamper=tamper)
                    assert e.value.reason == reason
                assert value("relayd_zt_logins_total", provider="oidc", result="success") == logins
                await bystander_ok()

                # A code is spent by its first use; its PKCE verifier is its own.
                body = await code()
                await asyncio.to_thread(ctl.call, "POST", "/login", login_body(body))
                e = await asyncio.to_thread(refused_login, s, login_body(body), "bad_code")
                assert "invalid_grant" in str(e)
                body = await code()
                e = await asyncio.to_thread(refused_login, s, login_body(
                    dict(body, code_verifier=secrets.token_urlsafe(32))), "bad_code")
                await bystander_ok()

                # The network answers the token request with another
                # tenant's ID token (same keys, same client): the issuer
                # tells. Then with one the provider made for another of its
                # clients (the attacker's "portal"): the audience tells.
                body = await asyncio.to_thread(authorize, idp.tenant, "relayd", alice)
                wire.steer = lambda m, path, h, b: (idp.tenant_port, h, b) if path == "/token" else None
                e = await asyncio.to_thread(refused_login, s, login_body(body), "bad_id_token")
                assert "wrong issuer" in str(e)
                body = await asyncio.to_thread(authorize, idp.issuer, "portal", alice)
                wire.steer = lambda m, path, h, b: (wire.upstream, dict(
                    h, Authorization=_basic("portal", idp.clients["portal"])), b) if path == "/token" else None
                e = await asyncio.to_thread(refused_login, s, login_body(body), "bad_id_token")
                assert "not for this client" in str(e)
                wire.steer = None
                await bystander_ok()
                assert await echo_through(c, "open", s)
            finally:
                await c.close()

    run(main())


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("issuer, ok", [
    ("https://idp.example.com/realms/corp", True), ("http://127.0.0.1:9000", True), ("http://[::1]:9000/t", True),
    ("http://localhost:9000", True), ("http://idp.example.com", False), ("http://10.0.0.1:9000", False),
    ("http://127.0.0.1.nip.io", False), ("ftp://127.0.0.1", False), ("idp.example.com", False)])
def test_a_provider_is_reached_over_https_or_on_loopback(tmp_path, issuer, ok):
    conf = tmp_path / "relayd.toml"
    conf.write_text(f'[zerotrust.providers.corp]\nissuer = "{issuer}"\nclient_id = "relayd"\nclient_secret = "x"\n')
    if ok:
        assert load_serve(conf).zerotrust.providers["corp"].issuer == issuer
    else:
        with pytest.raises(ConfigError, match="https:// is required"):
            load_serve(conf)
