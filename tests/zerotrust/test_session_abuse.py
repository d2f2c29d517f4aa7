"""Hostile input on the zero-trust gateway's session (issue 12; spec
sections 4.3, 7 and 10): storms of hellos with bad tokens, garbage on the
control stream, interaction floods, hostile reasons, an interaction id of
another session, a rollback to an older token inside a session, hostile
flow requests, and connections that never say hello.

A real relay (the gateway of site s-lab) and a real agent run as
processes; echo services listen on their own loopback addresses in this
process. Beside every attack a bystander (alice, with the real client in
a thread of its own) keeps a flow busy with checksummed data; after each
attack its flow has moved on, intact, and its session is still open.
Attackers (mallory and eve, signed in with the real client) speak the
session protocol by hand from 127.0.0.9, so they can say what the client
never would. Every refusal must come with a clear code and reason, a
metric, and a log line of the relay's that holds neither token nor
payload (each attack's text carries MARKER; the relay's log is checked
for it, for every token used here, and for one JSON object per line).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import socketserver
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import pyotp
import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from relayd.client import zerotrust as zc
from relayd.control import jws
from relayd.core.framing import encode_message
from relayd.gateway import ztmessages as zm
from relayd.net import run, tls
from relayd.net.mux import MuxConnection
from relayd.net.wslink import ClientUpgrade
from tests.adversarial.stack import EchoHandler
from tests.tunnel.processes import RELAYD, Proc, cli, free_port, wait_port
from tests.waiting import until_sync
from tests.zerotrust.stack import ADDRS, PASSWORD, policy_doc

MARKER = "PAYLOAD-7f3a9c"
ATTACKER = "127.0.0.9"
#: An address only the ops group may reach (eve loses it in the rollback test).
OPS = ADDRS["none"]


def _policy() -> dict:
    doc = policy_doc()
    doc["entitlements"].append({"id": "e-ops", "site": "s-lab", "conditions": [], "tags": [],
                                "actions": [{"action": "allow", "proto": "tcp", "hosts": [OPS],
                                             "ports": ["1024-65535"]}]})
    doc["policies"].append({"id": "p-ops", "match": {"criteria": [{"claim": "user.groups", "op": "contains",
                                                                   "value": "ops"}]},
                            "entitlements": ["e-ops"]})
    return doc


class _Echo(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class ZtStack:
    """`relayd serve --site s-lab` and `relayd agent --site s-lab=127.0.0.0/8`
    as processes, the users and the policy made with `relayd admin`, echo
    services in this process."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.echo = {k: _Echo((addr, 0), EchoHandler) for k, addr in ADDRS.items()}
        for srv in self.echo.values():
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.ports = {k: srv.server_address[1] for k, srv in self.echo.items()}
        self.net = {k: free_port() for k in ("agents", "https", "metrics")}
        self.data = tmp / "relay"
        self.url = f"https://127.0.0.1:{self.net['https']}"
        self.tokens: list[str] = []  # every token this module handles: none may reach a log
        self.totp: dict[str, pyotp.TOTP] = {}
        self._spent: dict[str, set] = {}
        self.agent = None
        self.relay = Proc(["serve", "--data", str(self.data), "--agents", f"127.0.0.1:{self.net['agents']}",
                           "--https", f"127.0.0.1:{self.net['https']}",
                           "--metrics", f"127.0.0.1:{self.net['metrics']}", "--site", "s-lab"])
        try:
            for p in self.net.values():
                wait_port(p)
            (tmp / "policy.json").write_text(json.dumps(_policy()))
            cli("admin", "policy", "import", str(tmp / "policy.json"), "--data", str(self.data))
            for name, groups, otp in (("alice", ["staff"], True), ("mallory", ["staff"], True),
                                      ("eve", ["staff", "ops"], False), ("trudy", ["staff"], True)):
                args = ["admin", "user", "add", name, "--password-stdin", "--data", str(self.data)]
                args += [a for g in groups for a in ("--group", g)] + (["--totp"] if otp else [])
                res = subprocess.run(RELAYD + args, input=PASSWORD + "\n", capture_output=True, text=True,
                                     timeout=60)
                assert res.returncode == 0, res.stderr
                if otp:
                    secret = res.stdout.split("authenticator secret: ", 1)[1].split()[0]
                    self.totp[name] = pyotp.TOTP(secret)
            token = cli("admin", "join-token", "--data", str(self.data)).stdout.strip()
            self.agent = Proc(["agent", "--data", str(tmp / "agent"), "--join", token,
                               "--site", "s-lab=127.0.0.0/8"])
            until_sync(lambda: self.metric("relayd_active_listeners") >= 1, 30, "the agent did not connect",
                       ignore=(OSError,))
        except BaseException:
            self.stop(check=False)
            raise

    # -- people ------------------------------------------------------------------------

    def code(self, user: str) -> str:
        """A TOTP code of ``user`` whose time step nobody used yet (the
        controller takes one step either side and each step once)."""
        spent = self._spent.setdefault(user, set())
        t = self.totp[user]

        def fresh():
            now = int(time.time()) // 30
            return next((s for s in (now - 1, now, now + 1) if s not in spent), None)

        step = until_sync(fresh, 35, f"no unused TOTP step for {user}", interval=0.5)
        spent.add(step)
        return t.at(step * 30)

    def login(self, user: str) -> dict:
        """Sign ``user`` in with the real client (data in tmp/<user>)."""
        state = zc.login(self.tmp / user, self.url, username=user, password=PASSWORD,
                         otp=self.code(user) if user in self.totp else None, ca_file=str(self.data / "ca" / "ca.crt"),
                         device_claims={"os": {"family": "linux"}})
        self.remember(state)
        return state

    def remember(self, state: dict) -> None:
        self.tokens.append(state["claims"])
        self.tokens += state["entitlements"].values()

    def controller(self, user: str) -> zc.Controller:
        st = zc.ClientState(self.tmp / user)
        return zc.Controller(self.url, str(st.path("relay-ca.pem")), str(st.path("cert.pem")), str(st.path("key.pem")))

    def signing_key(self):
        return serialization.load_pem_private_key((self.data / "zt-signing.key").read_bytes(), None)

    # -- observation -----------------------------------------------------------------------

    def metrics(self) -> dict:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.net['metrics']}/metrics", timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def metric(self, name: str, **labels) -> float:
        want = set(labels.items())
        return sum(v for (n, lab), v in self.metrics().items() if n == name and want <= set(lab))

    def bad_input(self, kind: str, where: str = "zt_session") -> float:
        return self.metric("relayd_bad_input_total", where=where, kind=kind)

    def rejections(self, reason: str) -> float:
        return self.metric("relayd_token_rejections_total", reason=reason)

    def log(self) -> str:
        """The relay's log so far (read through a file description of our
        own: the process's offset in its file is left alone)."""
        with open(f"/proc/self/fd/{self.relay.err.fileno()}", "rb") as f:
            return f.read().decode("utf-8", "replace")

    def logged(self, reason: str) -> list[dict]:
        """The relay's log lines that name ``reason``."""
        out = []
        for line in self.log().splitlines():
            rec = json.loads(line)
            if rec.get("reason") == reason or rec.get("msg", "").endswith(": " + reason):
                out.append(rec)
        return out

    def check_log(self) -> None:
        text = self.log()
        assert "Traceback" not in text, text[-3000:]
        assert MARKER not in text, "attack payload reached the relay's log"
        for tok in self.tokens:
            for part in {tok, tok.rsplit(".", 1)[-1]}:
                if len(part) > 20:
                    assert part not in text, "a token (or its signature) reached the relay's log"
        for line in text.splitlines():
            assert isinstance(json.loads(line), dict), line[:200]  # one record a line: nothing injected

    def stop(self, check: bool = True) -> None:
        """Stop the processes (by PID) and the services; then, with
        ``check``, the relay's log and the agent's."""
        errs = {}
        for name, p in (("agent", self.agent), ("relay", self.relay)):
            if p is not None:
                errs[name] = p.stop()[1]
        for srv in self.echo.values():
            srv.shutdown()
            srv.server_close()
        if check:
            self.check_log()
            assert "Traceback" not in errs.get("agent", ""), errs["agent"][-3000:]


class Bystander:
    """alice's session with the real client, in a thread with its own loop:
    one flow to the open echo service, 32 KiB at a time, each checked."""

    def __init__(self, stack: ZtStack) -> None:
        self.stack = stack
        self.bytes = 0
        self.errors: list[str] = []
        self.closed_with: list = []
        self.session = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: run(self._main()), daemon=True)
        self._thread.start()
        until_sync(lambda: self.bytes or self.errors, 20, "the bystander never got going")
        assert not self.errors, self.errors

    async def _main(self) -> None:
        outer = self

        class Prompter(zc.Prompter):
            async def closed(self, site, reason, message):
                outer.closed_with.append((reason, message))

        c = zc.Connector(self.stack.tmp / "alice", Prompter(), device_claims={"os": {"family": "linux"}})
        try:
            await c.start()
            self.session = c.sessions["s-lab"]
            stream, reply = await c.open_flow(ADDRS["open"], self.stack.ports["open"])
            assert reply["r"] == "ok", reply
            while not self._stop.is_set():
                chunk = os.urandom(32 * 1024)
                await stream.write(chunk)
                got = await asyncio.wait_for(stream.readexactly(len(chunk)), 10)
                if hashlib.sha256(got).digest() != hashlib.sha256(chunk).digest():
                    raise AssertionError("the bystander's flow corrupted data")
                self.bytes += len(chunk)
                await asyncio.sleep(0.005)
            stream.reset()
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            await c.close()

    def check(self) -> None:
        """Its flow moved on since the last check; its session is open."""
        b = self.bytes
        until_sync(lambda: self.bytes > b + 256 * 1024 or self.errors, 15, "the bystander's flow stalled")
        assert not self.errors, self.errors
        assert not self.closed_with, f"the bystander's session was closed: {self.closed_with}"
        assert self.session is not None and not self.session.mux.closed

    def stop(self) -> None:
        self.check()
        self._stop.set()
        self._thread.join(15)
        assert not self.errors, self.errors


@pytest.fixture(scope="module")
def zt(tmp_path_factory):
    st = ZtStack(tmp_path_factory.mktemp("session_abuse"))
    try:
        st.remember(st.login("alice"))
        st.mallory = st.login("mallory")
        st.eve = st.login("eve")
        st.bystander = Bystander(st)
    except BaseException:
        st.stop(check=False)
        raise
    yield st
    try:
        st.bystander.stop()
    finally:
        st.stop()


@pytest.fixture
def unharmed(zt):
    """The bystander's flow keeps moving and its session stays open; the
    relay process is alive."""
    yield zt
    zt.bystander.check()
    assert zt.relay.p.poll() is None, "the relay process died"


# -- an attacker's session, spoken by hand --------------------------------------------------


def hello_of(state: dict, **override) -> dict:
    hello = {"type": "hello", "claims": state["claims"], "entitlements": state["entitlements"]["s-lab"],
             "device": {"os": {"family": "linux"}}, "reasons": [], "client": "attacker"}
    hello.update(override)
    return hello


class Raw:
    """A session at the gateway with ``user``'s certificate; the control
    stream is written and read message by message."""

    def __init__(self, mux: MuxConnection, ws, control) -> None:
        self.mux = mux
        self.ws = ws
        self.control = control
        self.closed_msg: dict = {}  # the gateway's "closed", once read

    @classmethod
    async def open(cls, zt: ZtStack, user: str, *, stream: bool = True) -> "Raw":
        st = zc.ClientState(zt.tmp / user)
        ctx = tls.client_context(str(st.path("relay-ca.pem")), cert_file=str(st.path("cert.pem")),
                                 key_file=str(st.path("key.pem")))
        mux = MuxConnection(True, name="attacker")
        up = ClientUpgrade(mux, f"127.0.0.1:{zt.net['https']}", path=zc.SESSION_PATH)
        await asyncio.get_running_loop().create_connection(
            lambda: up, "127.0.0.1", zt.net["https"], ssl=ctx, server_hostname="127.0.0.1",
            local_addr=(ATTACKER, 0))
        ws = await asyncio.wait_for(up.done, 10)
        return cls(mux, ws, await mux.open_stream() if stream else None)

    @classmethod
    async def hello(cls, zt: ZtStack, user: str, state: dict | None = None, **override) -> "Raw":
        """A session that said hello with ``state``'s tokens (``user``'s by
        default) and got its welcome."""
        r = await cls.open(zt, user)
        msg = await r.say_hello(state or getattr(zt, user), **override)
        assert msg.get("type") == "welcome", msg
        return r

    async def say_hello(self, state: dict, **override) -> dict:
        """Send a hello; the gateway's answer."""
        await self.send(hello_of(state, **override))
        return await self.next()

    async def send(self, msg: dict) -> None:
        await self.send_raw(encode_message(msg, 64 << 20))

    async def send_raw(self, data: bytes) -> None:
        await asyncio.wait_for(self.control.write(data), 10)

    async def send_too_much(self, data: bytes) -> None:
        """Send ``data``, more than the gateway takes: it may close the
        session before all is sent."""
        with contextlib.suppress(zc.RelaydError, ConnectionError, asyncio.TimeoutError):
            await self.send_raw(data)

    async def cut_short(self, closes: tuple[int, str], timeout: float = 15) -> None:
        """Closed with ``closes`` (code, reason) while we were still
        sending: the gateway's socket had unread bytes, so its close may
        reach us as a reset that takes the ``closed`` message and the
        close frame with it; if they came, they must say ``closes``."""
        m, code = await self.closed(timeout)
        if m:
            assert (m["code"], m["reason"]) == closes, m
        assert code in (closes[0], 1006), code

    async def next(self, timeout: float = 10) -> dict:
        """The next control message ({} once the stream ended)."""
        try:
            m = await asyncio.wait_for(self.control.read_message(1 << 20), timeout)
        except (asyncio.IncompleteReadError, ConnectionError, zc.RelaydError):
            return {}
        if m.get("type") == "closed":
            self.closed_msg = m
        return m

    async def expect(self, kind: str, timeout: float = 10) -> dict:
        """The next message of type ``kind`` (interactions and pongs on the
        way are skipped); {} if the stream ends first."""
        async def go():
            while True:
                m = await self.next()
                if not m or m.get("type") == kind:
                    return m
        return await asyncio.wait_for(go(), timeout)

    async def closed(self, timeout: float = 15) -> tuple[dict, int]:
        """The gateway's ``closed`` message and the WebSocket close code."""
        m = self.closed_msg
        if not m and self.control is not None:
            m = await self.expect("closed", timeout)
        await asyncio.wait_for(asyncio.shield(self.mux.closed_future), timeout)
        return m, self.ws.conn.close_code

    async def alive(self) -> bool:
        """The session still answers on its control stream."""
        if self.mux.closed:
            return False
        await self.send({"type": "ping"})
        return (await self.expect("pong", 5)).get("type") == "pong"

    async def flow(self, req) -> dict:
        """A flow's reply ({"r": "reset"} if the stream was reset without one)."""
        st = await self.mux.open_stream()
        data = req if isinstance(req, bytes) else encode_message(req, 1 << 20)
        with contextlib.suppress(zc.RelaydError, ConnectionError):
            st.send_nowait(data)
        try:
            reply = await asyncio.wait_for(st.read_message(4096), 10)
        except (zc.RelaydError, asyncio.IncompleteReadError, ConnectionError):
            return {"r": "reset"}
        finally:
            st.reset()
        return reply

    async def flow_to(self, zt: ZtStack, key: str) -> dict:
        return await self.flow({"proto": "tcp", "host": ADDRS[key], "port": zt.ports[key]})

    def close(self) -> None:
        self.mux.abort()


def _refused_with(zt: ZtStack, kind: str, before: float, n: int = 1, where: str = "zt_session") -> None:
    """``kind`` counted ``n`` more times, and logged."""
    assert zt.bad_input(kind, where) == before + n, f"relayd_bad_input_total{{{where}, {kind}}}"
    until_sync(lambda: zt.logged(kind), 5, f"no log line of the relay names {kind}")


# -- hello storms -------------------------------------------------------------------------------


def _forged(zt: ZtStack) -> dict:
    """Hellos with bad tokens, by the rejection reason each must get."""
    m = zt.mallory
    claims, ents = m["claims"], m["entitlements"]["s-lab"]
    key = zt.signing_key()
    now = int(time.time())
    payload = zc.token_payload(claims)
    h, p, sig = claims.split(".")
    flip = "A" if sig[5] != "A" else "B"
    none_header = jws._b64(json.dumps({"alg": "none", "typ": jws.CLAIMS, "kid": h[:4]}).encode())
    cases = {
        "signature": {"claims": f"{h}.{p}.{sig[:5]}{flip}{sig[6:]}"},
        "alg": {"claims": f"{none_header}.{p}."},
        "malformed": {"claims": MARKER + ".x"},
        "expired": {"claims": jws.sign(dict(payload, iat=now - 7200, nbf=now - 7200, exp=now - 3600), jws.CLAIMS, key)},
        "dn_mismatch": {"claims": zt.eve["claims"]},
        "typ": {"entitlements": claims},
        "wrong_site": {"entitlements": jws.sign(dict(zc.token_payload(ents), aud="relayd:site:s-other",
                                                     site="s-other"), jws.ENTITLEMENTS, key)},
        "session_mismatch": {"entitlements": jws.sign(dict(zc.token_payload(ents), sid=secrets.token_hex(16)),
                                                      jws.ENTITLEMENTS, key)},
    }
    for over in cases.values():
        zt.tokens += [v for v in over.values() if len(v) > 40]
    return cases


def test_hello_storm_with_bad_tokens_is_refused_and_counted(unharmed):
    """200 sessions that say hello with forged, expired, foreign and
    swapped tokens: each is closed with 4401 and the reason of its token,
    counted by reason, logged without the token."""
    zt = unharmed
    cases = _forged(zt)
    before = {r: zt.rejections(r) for r in cases}
    seen: dict = {}

    async def one(reason: str, over: dict, gate: asyncio.Semaphore):
        async with gate:
            r = await Raw.open(zt, "mallory")
            try:
                await r.say_hello(zt.mallory, **over)
                closed, code = await r.closed()
            finally:
                r.close()
        seen.setdefault((closed.get("reason"), closed.get("code"), code), 0)
        seen[(closed.get("reason"), closed.get("code"), code)] += 1
        assert (closed.get("reason"), closed.get("code"), code) == (reason, 4401, 4401), (reason, closed, code)

    async def main():
        gate = asyncio.Semaphore(20)
        kinds = list(cases.items())
        await asyncio.gather(*(one(*kinds[i % len(kinds)], gate) for i in range(200)))

    t0 = time.monotonic()
    run(main())
    took = time.monotonic() - t0
    for i, reason in enumerate(cases):
        n = len(range(i, 200, len(cases)))
        assert zt.rejections(reason) == before[reason] + n, reason
        until_sync(lambda reason=reason: zt.logged(reason), 5, f"no log line names {reason}")
    assert took < 60, f"200 refusals took {took:.1f}s"


def test_no_certificate_is_refused_before_the_websocket(unharmed):
    zt = unharmed
    before = zt.rejections("no_certificate")

    async def main():
        ctx = tls.client_context(str(zt.data / "ca" / "ca.crt"))
        for _ in range(20):
            up = ClientUpgrade(MuxConnection(True, name="attacker"), "127.0.0.1", path=zc.SESSION_PATH)
            await asyncio.get_running_loop().create_connection(
                lambda: up, "127.0.0.1", zt.net["https"], ssl=ctx, server_hostname="127.0.0.1",
                local_addr=(ATTACKER, 0))
            with pytest.raises(ConnectionError, match="401"):
                await asyncio.wait_for(up.done, 10)

    run(main())
    assert zt.rejections("no_certificate") == before + 20


# -- garbage on the control stream ---------------------------------------------------------


def _msgpack_raw(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


#: name -> (say hello first, bytes or a message, kind counted, closed: (code, reason) or None = error reply)
GARBAGE = {
    "not-msgpack": (False, _msgpack_raw(b"\xc1" + MARKER.encode()), "bad_message", (4400, "bad_message")),
    "an-array": (False, _msgpack_raw(b"\x93\x01\x02\xa3abc"), "bad_message", (4400, "bad_message")),
    "length-4-GiB": (False, b"\xff\xff\xff\xff" + MARKER.encode(), "bad_message", (4400, "bad_message")),
    "ping-before-hello": (False, {"type": "ping", "x": MARKER}, "bad_hello", (4400, "bad_hello")),
    "hello-claims-a-number": (False, {"type": "hello", "claims": 5, "entitlements": MARKER}, "bad_hello",
                              (4400, "bad_hello")),
    "hello-device-a-list": (False, "device-list", "bad_hello", (4400, "bad_hello")),
    "hello-reasons-a-map": (False, "reasons-map", "bad_hello", (4400, "bad_hello")),
    "unknown-type": (True, {"type": MARKER}, "unknown_message", None),
    "type-a-list": (True, {"type": [MARKER]}, "unknown_message", None),
    "claims-a-list": (True, {"type": "claims", "claims": [MARKER]}, "bad_message", None),
    "device-a-string": (True, {"type": "device", "claims": MARKER}, "bad_message", None),
    "second-hello": (True, "hello", "unexpected_message", None),
    "after-hello-not-msgpack": (True, _msgpack_raw(b"\xc1" + MARKER.encode()), "bad_message", (4400, "bad_message")),
    "after-hello-over-the-limit": (True, "too-much", "bad_message", (4400, "bad_message")),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_on_the_control_stream(unharmed, case):
    """Bytes that are no message, messages of the wrong shape, unknown
    types, a message over the limit, a message before hello: an error
    reply (the session goes on) or the close of that one session, a
    metric and a log line either way."""
    zt = unharmed
    after_hello, what, kind, closes = GARBAGE[case]
    before = zt.bad_input(kind)

    async def main():
        r = await (Raw.hello(zt, "mallory") if after_hello else Raw.open(zt, "mallory"))
        try:
            if isinstance(what, bytes):
                await r.send_raw(what)
            elif what == "too-much":
                await r.send_too_much(encode_message({"type": "ping", "pad": MARKER * (zm.MAX_CONTROL // 14)},
                                                     1 << 20))
            elif what == "hello":
                await r.send(hello_of(zt.mallory))
            elif what in ("device-list", "reasons-map"):
                await r.say_hello(zt.mallory, **({"device": [MARKER]} if what == "device-list"
                                                 else {"reasons": {MARKER: 1}}))
            else:
                await r.send(what)
            if closes is None:
                err = await r.expect("error")
                assert err["reason"] == kind and MARKER not in err["message"], err
                assert await r.alive()
            elif case == "after-hello-over-the-limit":
                await r.cut_short(closes)
            else:
                closed, code = await r.closed()
                assert (closed.get("code"), closed.get("reason")) == closes, closed
                assert code == closes[0]
        finally:
            r.close()

    run(main())
    _refused_with(zt, kind, before)


def test_device_claims_that_are_not_json_are_refused(unharmed):
    """msgpack carries what JSON cannot (bytes, extension types, byte
    keys): device claims holding them are refused, 4401 in a hello and an
    error after it, and no handler of the relay raises."""
    zt = unharmed
    before = zt.rejections("bad_device_claims")
    bad = ({"serial": MARKER.encode()}, {"t": msgpack.ExtType(5, MARKER.encode())}, {MARKER.encode(): 1})

    async def main():
        for dev in bad:
            r = await Raw.open(zt, "mallory")
            try:
                await r.say_hello(zt.mallory, device=dev)
                closed, code = await r.closed()
                assert (closed.get("reason"), code) == ("bad_device_claims", 4401), closed
            finally:
                r.close()
        r = await Raw.hello(zt, "mallory")
        try:
            for dev in bad:
                await asyncio.sleep(1.05)  # device reports: at most one a second
                await r.send({"type": "device", "claims": dev})
                assert (await r.expect("error"))["reason"] == "bad_device_claims"
            assert await r.alive()
        finally:
            r.close()

    run(main())
    assert zt.rejections("bad_device_claims") == before + 6


# -- interaction floods ------------------------------------------------------------------------


async def _interaction(zt: ZtStack, r: Raw, key: str = "reason") -> str:
    """Ask for a flow that needs a reason; the interaction's id."""
    reply = await r.flow_to(zt, key)
    assert reply["r"] == "stepup_required" and reply["interaction"], reply
    inter = await r.expect("interaction")
    assert inter["id"] == reply["interaction"]
    return inter["id"]


def test_answers_to_interactions_never_sent_are_refused(unharmed):
    zt = unharmed
    before = zt.bad_input("unknown_interaction")

    async def main():
        r = await Raw.hello(zt, "mallory")
        try:
            await r.send({"type": "reason", "interaction": secrets.token_hex(16), "suffix": "why",
                          "text": "ticket " + MARKER})
            err = await r.expect("error")
            assert err["reason"] == "unknown_interaction"
            # Nothing was granted by it.
            assert (await r.flow_to(zt, "reason"))["r"] == "stepup_required"
            assert await r.alive()
        finally:
            r.close()

    run(main())
    _refused_with(zt, "unknown_interaction", before)


@pytest.mark.parametrize("what", ["reason", "claims", "ping"])
def test_a_flood_of_control_messages_is_limited_and_then_closed(unharmed, what):
    """Hundreds of reason answers, of step-up tokens pushed again, of
    pings: the first few are served, the rest refused as rate_limited or
    unknown_interaction, and after MAX_REFUSED refusals the session is
    closed; nobody else notices."""
    zt = unharmed
    before = zt.bad_input("rate_limited") + zt.bad_input("unknown_interaction")
    closes = zt.bad_input("too_many_errors")

    async def main():
        r = await Raw.hello(zt, "mallory")
        try:
            msg = {"type": what}
            if what == "reason":
                msg.update(interaction=await _interaction(zt, r), suffix="why", text="ticket OPS-7")
            elif what == "claims":
                msg["claims"] = zt.mallory["claims"]
            t0 = time.monotonic()
            data = encode_message(msg, 1 << 20) * 300
            with contextlib.suppress(zc.RelaydError, ConnectionError):
                await r.send_raw(data)
            closed, code = await r.closed()
            assert (closed.get("reason"), code) == ("too_many_errors", 4400), closed
            assert time.monotonic() - t0 < 10
        finally:
            r.close()

    run(main())
    assert zt.bad_input("rate_limited") + zt.bad_input("unknown_interaction") >= before + zm.MAX_REFUSED
    assert zt.bad_input("too_many_errors") == closes + 1
    until_sync(lambda: zt.logged("too_many_errors"), 5, "no log line names too_many_errors")


def test_a_flood_of_wrong_stepup_codes_is_stopped(unharmed):
    """Hundreds of wrong one-time codes for a step-up: after a few the
    controller refuses every answer for a while, the right code too (a
    6-digit code must not be guessable at the rate a client can ask)."""
    zt = unharmed
    trudy = zt.login("trudy")
    ctl = zt.controller("trudy")
    before = zt.rejections("too_many_attempts")
    body = {"method": "otp", "suffix": "lab", "provider": "totp"}
    good = zt.code("trudy")
    reasons = []
    for i in range(100):
        wrong = f"{(int(good) + 1 + i) % 1_000_000:06d}"
        with pytest.raises(zc.ZtClientError) as e:
            ctl.call("POST", "/stepup", dict(body, credential=wrong), trudy["claims"])
        reasons.append(e.value.reason)
    assert set(reasons) == {"bad_otp", "too_many_attempts"} and reasons[0] == "bad_otp"
    assert reasons.index("too_many_attempts") <= 10
    with pytest.raises(zc.ZtClientError) as e:
        ctl.call("POST", "/stepup", dict(body, credential=good), trudy["claims"])
    assert e.value.reason == "too_many_attempts"
    assert zt.rejections("too_many_attempts") >= before + 90
    until_sync(lambda: zt.logged("too_many_attempts"), 5, "no log line names too_many_attempts")


# -- hostile reasons ---------------------------------------------------------------------------


HOSTILE_REASONS = {
    "newline": ("ticket 1\n" + '{"level":"error","msg":"' + MARKER + '"}', "bad_reason"),
    "carriage-return": ("ticket 1\r" + MARKER, "bad_reason"),
    "nul": ("ticket\x00" + MARKER, "bad_reason"),
    "escape-sequence": ("\x1b[2J\x1b[31m" + MARKER, "bad_reason"),
    "c1-control": ("ticket \x9b31m" + MARKER, "bad_reason"),
    "line-separator": ("ticket\u2028" + MARKER, "bad_reason"),
    "tab": ("ticket\t" + MARKER, "bad_reason"),
    "long": (MARKER * 40, "reason_too_long"),
}


def test_hostile_reasons_are_refused_and_never_logged(unharmed):
    """Reasons with line breaks, control characters and escape sequences,
    or over 512 characters: refused with an error, the session kept and
    nothing granted; a reason of 10 MB closes that session (a message over
    the limit). A plain reason then passes."""
    zt = unharmed
    before = {k: zt.bad_input(k) for k in ("bad_reason", "reason_too_long", "bad_message")}

    async def main():
        r = await Raw.hello(zt, "mallory")
        try:
            iid = await _interaction(zt, r)
            for text, kind in HOSTILE_REASONS.values():
                await r.send({"type": "reason", "interaction": iid, "suffix": "why", "text": text})
                err = await r.expect("error")
                assert err["reason"] == kind, (text[:20], err)
            assert (await r.flow_to(zt, "reason"))["r"] == "stepup_required"
            await r.send_too_much(encode_message({"type": "reason", "interaction": iid, "suffix": "why",
                                                  "text": MARKER * 700_000}, 64 << 20))
            await r.cut_short((4400, "bad_message"))
        finally:
            r.close()
        r = await Raw.hello(zt, "mallory")
        try:
            iid = await _interaction(zt, r)
            await r.send({"type": "reason", "interaction": iid, "suffix": "why", "text": "restore backup, OPS-42"})
            done = await r.expect("interaction_done")
            assert done == {"type": "interaction_done", "id": iid, "result": "granted"}
            assert (await r.flow_to(zt, "reason"))["r"] == "ok"
        finally:
            r.close()

    run(main())
    counts = {}
    for _, kind in HOSTILE_REASONS.values():
        counts[kind] = counts.get(kind, 0) + 1
    for kind, n in counts.items():
        _refused_with(zt, kind, before[kind], n)
    assert zt.bad_input("bad_message") == before["bad_message"] + 1


# -- wrong session -----------------------------------------------------------------------------


def test_an_interaction_id_of_another_session_is_refused(unharmed):
    """eve answers the interaction the gateway opened for mallory: refused,
    neither session gets anything from it, and mallory's interaction is
    still hers to answer."""
    zt = unharmed
    before = zt.bad_input("unknown_interaction")

    async def main():
        a = await Raw.hello(zt, "mallory")
        b = await Raw.hello(zt, "eve")
        try:
            iid = await _interaction(zt, a)
            await b.send({"type": "reason", "interaction": iid, "suffix": "why", "text": "it is mine now"})
            assert (await b.expect("error"))["reason"] == "unknown_interaction"
            assert (await b.flow_to(zt, "reason"))["r"] == "stepup_required"
            assert (await a.flow_to(zt, "reason"))["r"] == "stepup_required"
            await a.send({"type": "reason", "interaction": iid, "suffix": "why", "text": "restore backup, OPS-42"})
            assert (await a.expect("interaction_done"))["result"] == "granted"
            assert (await a.flow_to(zt, "reason"))["r"] == "ok"
            assert await b.alive()
        finally:
            a.close()
            b.close()

    run(main())
    _refused_with(zt, "unknown_interaction", before)


# -- rollback in a session ---------------------------------------------------------------------


def _at_second_start() -> None:
    """Sleep to just after a whole second: what follows shares its second."""
    time.sleep(1.02 - time.time() % 1)


def test_rollback_to_the_claims_token_before_a_stepup_is_refused(unharmed):
    """The claims token from before a step-up, presented again on the
    control stream or in a new hello while the session lives, is refused
    (rollback), even when both were issued in the same second; the session
    keeps the newer token and its flows."""
    zt = unharmed
    before = zt.rejections("rollback")
    _at_second_start()
    old = zt.login("mallory")
    reply = zt.controller("mallory").call("POST", "/stepup", {"method": "otp", "suffix": "lab", "provider": "totp",
                                                               "credential": zt.code("mallory")}, old["claims"])
    new = dict(old, claims=reply["claims_token"])
    zt.remember(new)
    zt.mallory = new

    async def main():
        r = await Raw.hello(zt, "mallory", old)
        try:
            assert (await r.flow_to(zt, "otp"))["r"] == "stepup_required"
            await r.send({"type": "claims", "claims": new["claims"]})
            assert (await r.expect("accepted"))["what"] == "claims"
            assert (await r.flow_to(zt, "otp"))["r"] == "ok"
            await r.send({"type": "claims", "claims": old["claims"]})
            assert (await r.expect("error"))["reason"] == "rollback"
            assert (await r.flow_to(zt, "otp"))["r"] == "ok"
            # A new connection of the same session with the old token does
            # not replace the live one.
            r2 = await Raw.open(zt, "mallory")
            try:
                await r2.say_hello(old)
                closed, code = await r2.closed()
                assert (closed.get("reason"), code) == ("rollback", 4401)
            finally:
                r2.close()
            assert await r.alive()
            assert (await r.flow_to(zt, "otp"))["r"] == "ok"
            # The same, sure to be within one second: a token issued in the
            # second of the one held (here signed with the controller's
            # key) replaces it, and the one it replaced cannot come back.
            same_second = jws.sign(dict(zc.token_payload(new["claims"]), jti=secrets.token_hex(16)), jws.CLAIMS,
                                   zt.signing_key())
            zt.tokens.append(same_second)
            await r.send({"type": "claims", "claims": same_second})
            assert (await r.expect("accepted"))["what"] == "claims"
            await r.send({"type": "claims", "claims": new["claims"]})
            assert (await r.expect("error"))["reason"] == "rollback"
        finally:
            r.close()

    run(main())
    assert zt.rejections("rollback") == before + 3
    until_sync(lambda: zt.logged("rollback"), 5, "no log line names rollback")


def test_rollback_to_tokens_from_before_a_group_removal_is_refused(unharmed):
    """eve loses the ops group and renews; her live session takes the new
    tokens and certificate (ops is cut off). The tokens from before, with
    ops, are refused on the control stream (bound to the certificate the
    session left), and in a new hello with the old certificate, which is
    still valid: that connection does not replace the live one."""
    zt = unharmed
    before = zt.rejections("rollback")
    old = zt.eve
    keep = zt.tmp / "eve-before"
    keep.mkdir()
    for f in ("relay-ca.pem", "cert.pem", "key.pem"):
        (keep / f).write_bytes(zc.ClientState(zt.tmp / "eve").path(f).read_bytes())
    ops = {"proto": "tcp", "host": OPS, "port": zt.ports["none"]}

    def renew_without_ops() -> dict:
        cli("admin", "group", "rm", "eve", "ops", "--data", str(zt.data))
        try:
            return zc.renew(zc.ClientState(zt.tmp / "eve"), old)
        finally:
            cli("admin", "group", "add", "eve", "ops", "--data", str(zt.data))

    async def main():
        r = await Raw.hello(zt, "eve", old)
        try:
            assert (await r.flow(ops))["r"] == "ok"
            new = await asyncio.to_thread(renew_without_ops)
            zt.remember(new)
            zt.eve = new
            assert "ops" not in zc.token_payload(new["claims"])["user"]["groups"]
            cert = zc.ClientState(zt.tmp / "eve").path("cert.pem").read_text()
            await r.send({"type": "tokens", "certificate": cert, "claims": new["claims"],
                          "entitlements": new["entitlements"]["s-lab"]})
            assert (await r.expect("accepted"))["what"] == "tokens"
            assert (await r.flow(ops))["r"] == "denied"
            await r.send({"type": "tokens", "claims": old["claims"], "entitlements": old["entitlements"]["s-lab"]})
            assert (await r.expect("error"))["reason"] == "cnf_mismatch"
            r2 = await Raw.open(zt, "eve-before")
            try:
                await r2.say_hello(old)
                closed, code = await r2.closed()
                assert (closed.get("reason"), code) == ("rollback", 4401), closed
            finally:
                r2.close()
            assert await r.alive()
            assert (await r.flow(ops))["r"] == "denied"
        finally:
            r.close()

    run(main())
    assert zt.rejections("rollback") == before + 1


# -- hostile flow requests ---------------------------------------------------------------------


HOSTILE_FLOWS = {
    "empty-host": {"proto": "tcp", "host": "", "port": 80},
    "long-host": {"proto": "tcp", "host": "a" * 254, "port": 80},
    "host-with-space": {"proto": "tcp", "host": "db " + MARKER, "port": 80},
    "host-with-nul": {"proto": "tcp", "host": ADDRS["open"] + "\x00", "port": 80},
    "host-with-newline": {"proto": "tcp", "host": "db.lab\n" + MARKER, "port": 80},
    "scoped-ipv6": {"proto": "tcp", "host": "fe80::1%lo", "port": 80},
    "host-a-number": {"proto": "tcp", "host": 2130706434, "port": 80},
    "host-a-list": {"proto": "tcp", "host": [ADDRS["open"]], "port": 80},
    "port-0": {"proto": "tcp", "host": ADDRS["open"], "port": 0},
    "port-65536": {"proto": "tcp", "host": ADDRS["open"], "port": 65536},
    "port-negative": {"proto": "tcp", "host": ADDRS["open"], "port": -1},
    "port-a-string": {"proto": "tcp", "host": ADDRS["open"], "port": "80"},
    "port-true": {"proto": "tcp", "host": ADDRS["open"], "port": True},
    "port-a-float": {"proto": "tcp", "host": ADDRS["open"], "port": 80.0},
    "port-huge": {"proto": "tcp", "host": ADDRS["open"], "port": 2 ** 64 - 1},
    "proto-udp": {"proto": "udp", "host": ADDRS["open"], "port": 80},
    "proto-upper-case": {"proto": "TCP", "host": ADDRS["open"], "port": 80},
    "proto-missing": {"host": ADDRS["open"], "port": 80},
    "proto-a-map": {"proto": {"tcp": 1}, "host": ADDRS["open"], "port": 80},
    "no-map": _msgpack_raw(b"\x92\xa3tcp\x50"),
    "not-msgpack": _msgpack_raw(b"\xc1" + MARKER.encode()),
    "huge": {"proto": "tcp", "host": ADDRS["open"], "port": 80, "pad": MARKER * 1000},
}


def test_hostile_flow_requests_get_the_flows_error_and_the_session_goes_on(unharmed):
    zt = unharmed
    before = zt.bad_input("request", "zt_flow")

    async def main():
        r = await Raw.hello(zt, "mallory")
        try:
            for name, req in HOSTILE_FLOWS.items():
                reply = await r.flow(req)
                assert reply.get("r") == "bad_request", (name, reply)
                assert MARKER not in json.dumps(reply)
            # A name that does not resolve: denied, not a bad request.
            reply = await r.flow({"proto": "tcp", "host": "no-such-host.invalid", "port": 80})
            assert reply == {"r": "denied", "why": "unresolved"}
            assert (await r.flow_to(zt, "open"))["r"] == "ok"
            assert await r.alive()
        finally:
            r.close()

    run(main())
    assert zt.bad_input("request", "zt_flow") == before + len(HOSTILE_FLOWS)
    until_sync(lambda: zt.logged("bad_request"), 5, "no log line names bad_request")


# -- silence -------------------------------------------------------------------------------------


def test_sessions_that_never_say_hello_are_closed(unharmed):
    """A WebSocket with no stream, a control stream with nothing on it,
    and half a hello: each closed after HELLO_TIMEOUT, counted."""
    zt = unharmed
    before = zt.bad_input("hello_timeout")

    async def main():
        quiet = await Raw.open(zt, "mallory", stream=False)
        empty = await Raw.open(zt, "mallory")
        half = await Raw.open(zt, "mallory")
        await half.send_raw((1000).to_bytes(4, "big") + b"\x85")
        t0 = time.monotonic()
        try:
            for r in (quiet, empty, half):
                await asyncio.wait_for(asyncio.shield(r.mux.closed_future), zm.HELLO_TIMEOUT + 5)
            assert time.monotonic() - t0 >= zm.HELLO_TIMEOUT - 1
            for r in (empty, half):
                closed, code = await r.closed()
                assert (closed.get("reason"), code) == ("hello_timeout", 4400), closed
            assert quiet.ws.conn.close_code == 4400
        finally:
            for r in (quiet, empty, half):
                r.close()

    run(main())
    _refused_with(zt, "hello_timeout", before, 3)


@pytest.fixture(autouse=True)
def _bounded():
    """Every wait above has its own deadline; this is the backstop."""
    t0 = time.monotonic()
    yield
    assert time.monotonic() - t0 < 120


def test_the_log_holds_no_token_and_no_payload(unharmed):
    unharmed.check_log()

