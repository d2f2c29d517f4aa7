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
import websockets
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


if NODE is None or not os.path.isdir(os.path.join(HERE, "node_modules", "hyco-ws")):
    pytest.skip("node and the npm clients are installed by the test command (scripts/test.sh)",
                allow_module_level=True)


class NodePeer:
    """A hyco-ws process (ws_peer.js), stopped by its PID."""

    def __init__(self, relay, *args):
        env = dict(os.environ, NODE_EXTRA_CA_CERTS=str(relay.ca_path))
        self.proc = subprocess.Popen([NODE, os.path.join(HERE, "ws_peer.js"), *args], cwd=HERE, env=env,
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
    if not port_443_free():
        pytest.skip("127.0.0.1:443 is in use")

    async def main():
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 443), hostname="localhost",
                                  hybrid=CATALOG)
        peers = []
        try:
            await body(relay, lambda *a: peers.append(NodePeer(relay, *a)) or peers[-1])
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
