"""The one stream-open seam, through a real relay and agent: HTTP endpoints
now count what TCP endpoints count (bytes as they flow, active streams, open
latency, sender connections) and honour the grace period; a client that
leaves while held for an agent leaves nothing behind."""

import asyncio
import hashlib
import os
import socket
import ssl


from relayd.net import run
from tests.tunnel.util import echo_service, join_token, start_agent, start_relay
from tests.metric import value
from tests.waiting import until


async def http_service():
    """A tiny HTTP/1.1 service: POST echoes the body's SHA-256, GET returns 1 MiB."""
    big = os.urandom(1 << 20)

    async def handle(r, w):
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                n = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":")[1])
                body = await r.readexactly(n)
                out = hashlib.sha256(body).hexdigest().encode() if head.startswith(b"POST") else big
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], big


async def https_request(relay, request: bytes) -> bytes:
    ctx = ssl.create_default_context(cafile=str(relay.ca_path))
    r, w = await asyncio.open_connection("127.0.0.1", relay.https_port, ssl=ctx, server_hostname="app.example")
    w.write(request)
    data = await asyncio.wait_for(r.read(), 15)
    w.close()
    return data


def test_http_endpoints_count_like_tcp_endpoints(tmp_path):
    async def main():
        srv, port, big = await http_service()
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 0), hostname="app.example",
                                  http={"seamweb": "app.example"})
        agent = await start_agent(tmp_path, "a1", join_token(relay), {"seamweb": ("127.0.0.1", port)})
        labels = {"endpoint": "seamweb"}
        before_in = value("relayd_bytes_total", direction="in", **labels)
        before_out = value("relayd_bytes_total", direction="out", **labels)
        before_lat = value("relayd_stream_open_seconds_count")
        body = os.urandom(300_000)
        got = await https_request(relay, b"POST /up HTTP/1.1\r\nHost: app.example\r\nContent-Length: %d\r\n\r\n"
                                  % len(body) + body + b"GET /down HTTP/1.1\r\nHost: app.example\r\n"
                                  b"Connection: close\r\n\r\n")
        assert hashlib.sha256(body).hexdigest().encode() in got and got.endswith(big)
        assert value("relayd_bytes_total", direction="in", **labels) - before_in >= len(body)
        assert value("relayd_bytes_total", direction="out", **labels) - before_out >= len(big)
        assert value("relayd_streams_opened_total", **labels) >= 1
        assert value("relayd_sender_connections_total", endpoint="seamweb", result="success") >= 1
        await until(lambda: value("relayd_stream_open_seconds_count") > before_lat, 5)
        # The stream ended with the client connection: not active any more.
        await until(lambda: value("relayd_streams_active", **labels) == 0, 5)
        await agent.stop()
        await relay.stop()
        srv.close()

    run(main())


def test_http_endpoints_honour_the_grace_period(tmp_path):
    async def main():
        srv, port, big = await http_service()
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 0), hostname="app.example",
                                  http={"graceweb": "app.example"}, grace=5.0)
        # The request arrives first; the agent connects a moment later.
        pending = asyncio.ensure_future(https_request(
            relay, b"GET /x HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n"))
        await until(lambda: relay.seam.held("graceweb") == 1, 10, "the request was not held for an agent")
        assert not pending.done()
        agent = await start_agent(tmp_path, "a1", join_token(relay), {"graceweb": ("127.0.0.1", port)})
        got = await asyncio.wait_for(pending, 10)
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(big)
        await agent.stop()
        await relay.stop()
        srv.close()

    run(main())


def test_no_agent_within_the_grace_period_is_a_503(tmp_path):
    async def main():
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 0), hostname="app.example",
                                  http={"nobody": "app.example"}, grace=0.5)
        before = value("relayd_streams_failed_total", endpoint="nobody", reason="no_agent")
        got = await https_request(relay, b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 503 ")
        assert value("relayd_streams_failed_total", endpoint="nobody", reason="no_agent") == before + 1
        await relay.stop()

    run(main())


def test_a_client_gone_while_held_leaves_nothing_behind(tmp_path):
    """Held for an agent, one client resets and another half-closes after
    its request. When the agent comes, no stream is opened for the one that
    left; the other gets its request through and the answer back."""

    async def main():
        relay = await start_relay(tmp_path, endpoints=("held",), grace=10.0)
        async with echo_service() as svc:
            port = relay.tcp_ports["held"]
            gone = socket.create_connection(("127.0.0.1", port))
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"request before any agent")
            w.write_eof()
            held = lambda: value("relayd_active_connections", endpoint="held")
            await until(lambda: held() == 2, 5, "the two clients were not held")
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            gone.close()
            await until(lambda: held() == 1, 5, "the relay did not see the client leave")
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"held": ("127.0.0.1", svc)})
            assert await asyncio.wait_for(r.read(), 10) == b"request before any agent"
            w.close()
            assert value("relayd_streams_opened_total", endpoint="held") == 1
            await agent.stop()
        await relay.stop()

    run(main())
