"""The agent link as binary WebSocket messages over TLS on the relay's HTTPS
port (--transport wss / auto)."""

import asyncio
import ssl

import orjson
import pytest

from relayd.control.jointoken import JoinToken
from relayd.core import wire
from relayd.core.framing import MessageReader, encode_message
from relayd.net import run
from relayd.net.wslink import AGENT_PATH
from tests.tunnel.util import echo_ok, echo_service, join_token, start_agent, start_relay


def wss_token(relay, endpoints=()):
    token_id, secret = relay.store.create_join_token(list(endpoints), 900)
    return JoinToken(f"127.0.0.1:{relay.https_port}", relay.ca.pin, token_id, secret).encode()


def test_agent_over_wss_end_to_end(tmp_path):
    async def main():
        relay = await start_relay(tmp_path, https=("127.0.0.1", 0))
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", wss_token(relay), {"echo": ("127.0.0.1", svc)},
                                      transport="wss")
            # Really a WebSocket link: the agent knows no other address of the relay.
            assert agent.identity["relay"] is None and agent.identity["wss"].endswith(str(relay.https_port))
            assert agent.identity["agent_id"] in relay.sessions
            assert await echo_ok(relay.tcp_ports["echo"], 3_000_000)
            await agent.stop()
        await relay.stop()

    run(main())


def test_auto_falls_back_to_wss(tmp_path):
    async def main():
        relay = await start_relay(tmp_path, https=("127.0.0.1", 0))
        async with echo_service() as svc:
            # Enrolled over TLS; the relay told the agent its WebSocket address.
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            assert agent.identity["wss"] == f"127.0.0.1:{relay.https_port}"
            await agent.stop()
            # Now the agents port is unreachable from the agent's network.
            ident_file = tmp_path / "a1" / "identity.json"
            ident = orjson.loads(ident_file.read_bytes())
            ident["relay"] = "127.0.0.1:9"
            ident_file.write_bytes(orjson.dumps(ident))
            agent = await start_agent(tmp_path, "a1", None, {"echo": ("127.0.0.1", svc)}, transport="auto")
            assert agent.identity["agent_id"] in relay.sessions  # linked: over the WebSocket, the only way left
            assert await echo_ok(relay.tcp_ports["echo"])
            await agent.stop()
        await relay.stop()

    run(main())


def test_independent_websocket_client_speaks_to_the_agent_endpoint(tmp_path):
    """`websockets` (an independent RFC 6455 implementation) completes the
    upgrade and exchanges binary messages with the relay."""
    import websockets.asyncio.client as client

    async def main():
        relay = await start_relay(tmp_path, https=("127.0.0.1", 0))
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        async with client.connect(f"wss://127.0.0.1:{relay.https_port}{AGENT_PATH}", ssl=ctx) as conn:
            await conn.send(encode_message(wire.encode_request(wire.CaRequest())))
            reader = MessageReader()
            reply = None
            while reply is None:
                reply, _ = reader.feed(await asyncio.wait_for(conn.recv(), 5))
            assert reply["ok"] and reply["ca"].startswith("-----BEGIN CERTIFICATE-----")
            assert reply["wss"] == f"127.0.0.1:{relay.https_port}"
        await relay.stop()

    run(main())


async def _http(port, ca, raw):
    ctx = ssl.create_default_context(cafile=str(ca))
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
    w.write(raw)
    data = await asyncio.wait_for(r.read(-1), 5)
    w.close()
    return data


def test_https_port_refuses_what_it_does_not_serve(tmp_path):
    async def main():
        relay = await start_relay(tmp_path, https=("127.0.0.1", 0))
        ca, port = relay.ca_path, relay.https_port
        assert (await _http(port, ca, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 404")
        bad_upgrade = f"GET {AGENT_PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        assert (await _http(port, ca, bad_upgrade.encode())).startswith(b"HTTP/1.1 400")
        folded = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n"
        assert (await _http(port, ca, folded)).startswith(b"HTTP/1.1 400")
        assert (await _http(port, ca, b"\x16\x03garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        await relay.stop()

    run(main())


def test_text_message_on_agent_link_closes_it(tmp_path):
    import websockets.asyncio.client as client
    from websockets.exceptions import ConnectionClosed

    async def main():
        relay = await start_relay(tmp_path, https=("127.0.0.1", 0))
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        async with client.connect(f"wss://127.0.0.1:{relay.https_port}{AGENT_PATH}", ssl=ctx) as conn:
            await conn.send("not binary")
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(conn.recv(), 5)
            assert info.value.rcvd.code == 1003
        await relay.stop()

    run(main())


def test_admin_join_token_for_wss(tmp_path):
    import subprocess
    import sys

    async def main():
        relay = await start_relay(tmp_path, https=("127.0.0.1", 0))
        port = relay.https_port
        await relay.stop()
        return port

    port = run(main())
    out = subprocess.run([sys.executable, "-m", "relayd.cli", "admin", "join-token", "--data",
                          str(tmp_path / "relay"), "--transport", "wss"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert JoinToken.decode(out.stdout.strip()).address == f"127.0.0.1:{port}"
