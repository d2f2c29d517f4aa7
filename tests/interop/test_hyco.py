"""Microsoft's own Hybrid Connections clients, unmodified, against a relayd
node: the npm package hyco-ws (pinned in tests/interop/hyco/package.json,
installed by the test command) as listener and as sender, with each other
and with an independent WebSocket client (the `websockets` package). Their
helpers hard-code port 443, so the node listens on 127.0.0.1:443 (the tests
run as root) with the namespace `localhost`; Node trusts the node's CA
through NODE_EXTRA_CA_CERTS, as any Node program would."""

import asyncio
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time

import pytest
from websockets.asyncio.client import connect

from relayd.control import sas
from relayd.control.hybrid import Catalog, HybridConnection
from relayd.net import run
from tests.tunnel.util import start_relay
from tests.waiting import until

pytestmark = pytest.mark.interop

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hyco")
NODE = shutil.which("node")
ROOT = sas.SasRule("RootManageSharedAccessKey", "cm9vdC1rZXktb2YtdGhlLW5vZGUtMTIzNA==",
                   rights=frozenset({"listen", "send", "manage"}))
LISTEN = sas.SasRule("hyco-listen", "aHljby1saXN0ZW4ta2V5LTEyMzQ=", rights=frozenset({"listen"}))
CATALOG = Catalog.of([HybridConnection("hyco", rules=(LISTEN,))], [ROOT])


def port_443_free() -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the relay binds it
        try:
            s.bind(("127.0.0.1", 443))
            return True
        except OSError:
            return False


def need_npm_clients() -> None:
    """The test command (scripts/test.sh) installs node and the pinned npm
    clients: their absence is a broken setup, not a reason to skip."""
    if NODE is None or not os.path.isdir(os.path.join(HERE, "node_modules", "hyco-ws")):
        pytest.fail("node or the npm clients are missing: run the test command (scripts/test.sh), which installs "
                    "them from tests/interop/hyco/package-lock.json")


class NodePeer:
    """A hyco-ws process (ws_peer.js), stopped by its PID."""

    def __init__(self, relay, *args, env=None, node_args=()):
        env = dict(os.environ, NODE_EXTRA_CA_CERTS=str(relay.ca_path), **(env or {}))
        self.proc = subprocess.Popen([NODE, *node_args, os.path.join(HERE, "ws_peer.js"), *args], cwd=HERE, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []

    async def line(self, timeout=20) -> str:
        loop = asyncio.get_running_loop()
        text = await asyncio.wait_for(loop.run_in_executor(None, self.proc.stdout.readline), timeout)
        self.lines.append(text.strip())
        return text.strip()

    async def wait(self, timeout=30) -> int:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def expected(count: int, size: int) -> str:
    """The SHA-256 of what a ws_peer.js sender gets back from an echo."""
    h = hashlib.sha256()
    for i in range(count):
        piece = hashlib.sha256(str(i).encode()).hexdigest()
        h.update((piece * (size // 64 + 1))[:size].encode())
    h.update(b"the end")
    return h.hexdigest()


def with_node(tmp_path, body):
    need_npm_clients()
    if not port_443_free():
        pytest.fail("127.0.0.1:443 is in use: Microsoft's clients hard-code port 443, so these tests need it free")

    async def main():
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 443), hostname="localhost",
                                  hybrid=CATALOG)
        peers = []
        try:
            await body(relay, lambda *a, **kw: peers.append(NodePeer(relay, *a, **kw)) or peers[-1])
        finally:
            for p in peers:
                p.stop()
            await relay.stop()

    run(main())


def test_hyco_ws_listener_and_hyco_ws_sender(tmp_path):
    async def body(relay, node):
        listener = node("listen", "localhost", "hyco", LISTEN.name, LISTEN.primary_key)
        assert await listener.line() == "listening"
        sender = node("send", "localhost", "hyco", ROOT.name, ROOT.primary_key, "50", "20000", "proto.a")
        assert await sender.line() == "ok " + expected(50, 20000)
        assert await sender.wait() == 0
        assert await listener.line() == "accepted proto.a"

    with_node(tmp_path, body)


def test_hyco_ws_listener_with_an_independent_sender(tmp_path):
    async def body(relay, node):
        listener = node("listen", "localhost", "hyco", LISTEN.name, LISTEN.primary_key)
        assert await listener.line() == "listening"
        tok = sas.make_token("http://localhost/hyco", ROOT.name, ROOT.primary_key, int(time.time()) + 600)
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        async with connect("wss://localhost/$hc/hyco/app/x?q=1&sb-hc-action=connect", ssl=ctx,
                           additional_headers={"ServiceBusAuthorization": tok}, compression=None) as ws:
            for payload in (b"\x00" * 100_000, "text \u00e9", b""):
                await ws.send(payload)
                assert await ws.recv() == payload

    with_node(tmp_path, body)


def test_an_independent_listener_with_a_hyco_ws_sender(tmp_path):
    async def body(relay, node):
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        tok = sas.make_token("http://localhost/hyco", LISTEN.name, LISTEN.primary_key, int(time.time()) + 600)
        async with connect("wss://localhost/$hc/hyco?sb-hc-action=listen", ssl=ctx, compression=None,
                           additional_headers={"ServiceBusAuthorization": tok}) as listener:
            sender = node("send", "localhost", "hyco", ROOT.name, ROOT.primary_key, "5", "1000")
            accept = json.loads(await listener.recv())["accept"]
            assert accept["connectHeaders"]["Sec-WebSocket-Key"]
            async with connect(accept["address"], ssl=ctx, compression=None) as rv:
                for _ in range(6):
                    await rv.send(await rv.recv())
                assert await sender.line() == "ok " + expected(5, 1000)
            assert await sender.wait() == 0

    with_node(tmp_path, body)


@pytest.mark.parametrize("rule, key, status", [
    (ROOT.name, "d3Jvbmcta2V5LW9mLXRoZS1ub2Rl", 401),  # wrong key
    (LISTEN.name, LISTEN.primary_key, 403),  # no Send right
])
def test_hyco_ws_sender_refused(tmp_path, rule, key, status):
    async def body(relay, node):
        listener = node("listen", "localhost", "hyco", LISTEN.name, LISTEN.primary_key)
        assert await listener.line() == "listening"
        sender = node("send", "localhost", "hyco", rule, key, "1", "10")
        assert await sender.line() == f"refused {status}"
        assert await sender.wait() == 3

    with_node(tmp_path, body)


# -- hyco-https: the HTTP mode ----------------------------------------------------------------------

def https_listener(relay, node_peer_cls=None):
    env = dict(os.environ, NODE_EXTRA_CA_CERTS=str(relay.ca_path))
    return subprocess.Popen([NODE, os.path.join(HERE, "https_listener.js"), "localhost", "hyco", LISTEN.name,
                             LISTEN.primary_key], cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def curl(relay, *args) -> subprocess.CompletedProcess:
    tok = sas.make_token("http://localhost/hyco", ROOT.name, ROOT.primary_key, int(time.time()) + 600)
    return subprocess.run(["curl", "-sS", "--cacert", str(relay.ca_path), "-H", f"ServiceBusAuthorization: {tok}",
                           *args], capture_output=True, timeout=60)


NODE_SENDER = r"""
const https = require('https');
const [port, path, size, tok] = process.argv.slice(1);  // (node -e: no script name)
const body = Buffer.alloc(Number(size), 'n');
const req = https.request({hostname: 'localhost', port: Number(port), path, method: 'PUT',
                           headers: {ServiceBusAuthorization: tok, 'Content-Length': body.length}}, (res) => {
  let got = Buffer.alloc(0);
  res.on('data', (d) => { got = Buffer.concat([got, d]); });
  res.on('end', () => { console.log(res.statusCode + ' ' + res.headers['via'] + ' ' + got.toString()); });
});
req.on('error', (e) => { console.log('error ' + e.message); });
req.end(body);
"""


def test_hyco_https_listener_with_curl_and_nodes_https(tmp_path):
    async def body(relay, node):
        proc = https_listener(relay)
        try:
            loop = asyncio.get_running_loop()
            line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 20)
            assert line.strip() == "listening"

            def run_curl(*args):
                return loop.run_in_executor(None, lambda: curl(relay, *args))

            for size in (0, 1024, 1 << 20):
                payload = tmp_path / f"up{size}"
                payload.write_bytes(os.urandom(size))
                res = await run_curl("--data-binary", f"@{payload}", "https://localhost/hyco/a/b?q=1&sb-hc-id=x")
                want = f"POST /hyco/a/b?q=1 {size} {hashlib.sha256(payload.read_bytes()).hexdigest()}"
                assert res.stdout.decode() == want, res.stderr
            # A chunked upload, HEAD, a large download, a status and its description.
            chunked = await run_curl("-H", "Transfer-Encoding: chunked", "--data-binary", "@" + str(tmp_path / "up1024"),
                                     "https://localhost/hyco/chunked")
            assert chunked.stdout.decode().startswith("POST /hyco/chunked 1024 ")
            head = await run_curl("-I", "https://localhost/hyco/x")
            assert head.stdout.startswith(b"HTTP/1.1 200") and b"via: 1.1 localhost" in head.stdout.lower()
            for size in (0, 1024, 1 << 20):  # responses of 0 B, 1 KiB and 1 MiB
                got = await run_curl(f"https://localhost/hyco/big/{size}")
                assert got.stdout == b"x" * size
            made = await run_curl("-i", "https://localhost/hyco/created")
            assert made.stdout.startswith(b"HTTP/1.1 201 Created") and b"x-echo-len: 0" in made.stdout.lower()
            # Node's own https module as the sender, 1 MiB up.
            tok = sas.make_token("http://localhost/hyco", ROOT.name, ROOT.primary_key, int(time.time()) + 600)
            env = dict(os.environ, NODE_EXTRA_CA_CERTS=str(relay.ca_path))
            out = await loop.run_in_executor(None, lambda: subprocess.run(
                [NODE, "-e", NODE_SENDER, "443", "/hyco/node", str(1 << 20), tok], cwd=HERE, env=env,
                capture_output=True, text=True, timeout=60))
            want = hashlib.sha256(b"n" * (1 << 20)).hexdigest()
            assert out.stdout.strip() == f"200 1.1 localhost PUT /hyco/node {1 << 20} {want}", out.stderr
            # Refused as Azure refuses: no token, a wrong key.
            res = await loop.run_in_executor(None, lambda: subprocess.run(
                ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(relay.ca_path),
                 "https://localhost/hyco/x"], capture_output=True, text=True, timeout=30))
            assert res.stdout == "401"
        finally:
            proc.terminate()
            proc.wait(10)

    with_node(tmp_path, body)


def test_the_jest_tests_that_ship_inside_hyco_https(tmp_path):
    """Microsoft's own tests of hyco-https (tests/*.test.js in the package),
    run unchanged against the node: they need the hybrid connection `a2`."""
    copy = tmp_path / "hyco-https"
    shutil.copytree(os.path.join(HERE, "node_modules", "hyco-https"), copy)  # jest skips node_modules
    os.symlink(os.path.join(HERE, "node_modules"), copy / "node_modules")
    jest = os.path.join(HERE, "node_modules", ".bin", "jest")

    async def body(relay, node):
        relay.store.hc_create(HybridConnection("a2"))
        await relay.hybrid_catalog_changed()
        env = dict(os.environ, NODE_EXTRA_CA_CERTS=str(relay.ca_path), SB_HC_NAMESPACE="localhost",
                   SB_HC_PATH="a2", SB_HC_KEYRULE=ROOT.name, SB_HC_KEY=ROOT.primary_key)
        loop = asyncio.get_running_loop()
        res = await loop.run_in_executor(None, lambda: subprocess.run(
            [jest, "--rootDir", ".", "--ci"], cwd=copy, env=env, capture_output=True, text=True, timeout=300))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "Tests:" in res.stderr and "failed" not in res.stderr.split("Tests:")[1].split("\n")[0]

    with_node(tmp_path, body)


# -- relayd's Python client with Microsoft's clients ----------------------------------------------

def client_cs(rule=ROOT, path="hyco"):
    from relayd.client import hybrid

    return hybrid.parse_connection_string(f"Endpoint=sb://localhost/;SharedAccessKeyName={rule.name};"
                                          f"SharedAccessKey={rule.primary_key};EntityPath={path}")


def test_relayd_client_with_hyco_ws_in_both_roles(tmp_path):
    from relayd.client import hybrid

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async def body(relay, node):
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        # relayd's listener, hyco-ws's sender.
        listener = hybrid.Listener(client_cs(LISTEN), on_accept=echo, ssl=ctx)
        task = asyncio.ensure_future(listener.run())
        await asyncio.wait_for(listener.online.wait(), 10)
        sender = node("send", "localhost", "hyco", ROOT.name, ROOT.primary_key, "20", "5000", "proto.a")
        assert await sender.line() == "ok " + expected(20, 5000)
        assert await sender.wait() == 0
        await listener.close()
        await asyncio.wait_for(task, 10)
        # hyco-ws's listener, relayd's sender.
        hyco = node("listen", "localhost", "hyco", LISTEN.name, LISTEN.primary_key)
        assert await hyco.line() == "listening"
        async with await hybrid.connect(client_cs(), ssl=ctx, subprotocols=["proto.b"]) as ws:
            assert ws.subprotocol == "proto.b"
            await ws.send(b"z" * 70_000)
            assert await ws.recv() == b"z" * 70_000
        assert await hyco.line() == "accepted proto.b"

    with_node(tmp_path, body)


def test_relayd_client_http_mode_with_hyco_https_and_nodes_https(tmp_path):
    from relayd.client import hybrid

    async def answer(req):
        return hybrid.Response(200, {"content-type": "text/plain"}, b"%s %s %d" % (
            req.method.encode(), req.target.encode(), len(req.body)))

    async def body(relay, node):
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        loop = asyncio.get_running_loop()
        # hyco-https's listener, relayd's HTTP sender.
        proc = https_listener(relay)
        try:
            line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 20)
            assert line.strip() == "listening"
            data = b"q" * 100_000
            status, headers, got = await hybrid.request(client_cs(), "POST", "/up", data, ssl=ctx)
            assert status == 200 and got.decode() == f"POST /hyco/up 100000 {hashlib.sha256(data).hexdigest()}"
        finally:
            proc.terminate()
            proc.wait(10)
        # relayd's listener, Node's https as the sender.
        listener = hybrid.Listener(client_cs(LISTEN), on_request=answer, ssl=ctx)
        task = asyncio.ensure_future(listener.run())
        await asyncio.wait_for(listener.online.wait(), 10)
        tok = sas.make_token("http://localhost/hyco", ROOT.name, ROOT.primary_key, int(time.time()) + 600)
        env = dict(os.environ, NODE_EXTRA_CA_CERTS=str(relay.ca_path))
        out = await loop.run_in_executor(None, lambda: subprocess.run(
            [NODE, "-e", NODE_SENDER, "443", "/hyco/node", "5000", tok], cwd=HERE, env=env,
            capture_output=True, text=True, timeout=60))
        assert out.stdout.strip() == "200 1.1 localhost PUT /hyco/node 5000", out.stderr
        await listener.close()
        await asyncio.wait_for(task, 10)

    with_node(tmp_path, body)


def test_hyco_ws_sender_with_an_expired_token_is_refused(tmp_path):
    async def body(relay, node):
        listener = node("listen", "localhost", "hyco", LISTEN.name, LISTEN.primary_key)
        assert await listener.line() == "listening"
        sender = node("send", "localhost", "hyco", ROOT.name, ROOT.primary_key, "1", "10",
                      env={"HYCO_TOKEN_TTL": "-1000"})
        assert await sender.line() == "refused 401"

    with_node(tmp_path, body)


def test_hyco_ws_listener_renews_its_token(tmp_path):
    """hyco-ws renews hourly with renewToken; its hourly timer runs every
    second here (fast_renewal.js, preloaded), and the relay takes each new
    token: the listener's expiry moves on and its channel stays up."""

    async def body(relay, node):
        listener = node("listen", "localhost", "hyco", LISTEN.name, LISTEN.primary_key,
                        node_args=("--require", os.path.join(HERE, "fast_renewal.js")))
        assert await listener.line() == "listening"
        first = relay.hybrid.listeners["hyco"][0].expiry
        await until(lambda: relay.hybrid.listeners["hyco"][0].expiry >= first + 2, timeout=15)
        assert len(relay.hybrid.listeners["hyco"]) == 1

    with_node(tmp_path, body)
