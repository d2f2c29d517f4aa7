"""The WebSocket core against an independent implementation, the
`websockets` package, over loopback, in both roles and on both builds:
relayd's connection as the server with a websockets client, and as the
client of a websockets server. A thin asyncio adapter (``Peer`` below) moves
the bytes; the heads are parsed by relayd.core.http1 and checked by
relayd.core.wshandshake."""

import asyncio
import importlib

import pytest

from relayd.core import http1
from relayd.core import ws_events as E
from relayd.core import wshandshake as H
from relayd.core.wsconfig import WsConfig
from relayd.net import run
from tests.conftest import BUILDS

import websockets
from websockets.asyncio.client import connect  # noqa: E402
from websockets.asyncio.server import serve  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402


@pytest.fixture(params=BUILDS)
def W(request):
    return importlib.import_module("relayd.core._wsframe_c" if request.param == "compiled"
                                   else "relayd.core._wsframe_py")


class Peer:
    """relayd's Connection on an asyncio stream pair: events in a queue
    (None when the transport ended), bytes written after every step."""

    def __init__(self, conn, reader, writer):
        self.conn, self.reader, self.writer = conn, reader, writer
        self.events = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self, first=b""):
        data = first
        while True:
            if data:
                for ev in self.conn.receive_data(data):
                    self.events.put_nowait(ev)
            self.flush()
            data = await self.reader.read(65536)
            if not data:
                self.conn.receive_eof()
                self.events.put_nowait(None)
                self.writer.close()
                return

    def flush(self):
        out = self.conn.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(out)
        if self.conn.should_close_transport:
            self.writer.close()

    async def next(self):
        return await asyncio.wait_for(self.events.get(), 10)

    async def until_closed(self):
        evs = []
        while (ev := await self.next()) is not None:
            evs.append(ev)
        return evs


async def read_head(reader):
    buf = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return buf


async def relayd_server(W, config=None):
    """A relayd-core WebSocket server; returns (port, queue of Peers)."""
    peers = asyncio.Queue()

    async def on_client(reader, writer):
        head = http1.parse_request_head(await read_head(reader))
        res = H.server_handshake(head.method, head.target, head.headers)
        if isinstance(res, H.Refuse):
            writer.write(http1.response(res.status, res.reason.encode(), headers=list(res.headers)))
            writer.close()
            return
        writer.write(res.response)
        peers.put_nowait(Peer(W.Connection(False, config), reader, writer))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], peers


async def relayd_client(W, port, config=None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hs = H.client_handshake(f"127.0.0.1:{port}", "/chat")
    writer.write(hs.request)
    head = http1.parse_response_head(await read_head(reader))
    hs.check(head.status, head.headers)
    return Peer(W.Connection(True, config), reader, writer)


# --- relayd's core as the server, websockets as the client ---------------------------------


def test_server_messages_fragments_ping_and_close(W):
    async def main():
        server, port, peers = await relayd_server(W)
        async with connect(f"ws://127.0.0.1:{port}/x") as ws:
            peer = await peers.get()
            await ws.send("héllo")
            assert await peer.next() == E.TextMessage("héllo")
            await ws.send(b"\x00\x01" * 40000)
            assert await peer.next() == E.BinaryMessage(b"\x00\x01" * 40000)
            await ws.send(["frag", "ment", "ed €"])  # one message in three frames
            assert await peer.next() == E.TextMessage("fragmented €")
            await ws.send([b"a", b"", b"bc"])
            assert await peer.next() == E.BinaryMessage(b"abc")
            pong = await ws.ping(b"ping!")
            assert await peer.next() == E.Ping(b"ping!")
            await asyncio.wait_for(pong, 10)  # the auto-pong reached websockets
            peer.conn.send_text("wörld")
            peer.conn.send_binary(b"x" * 70000)
            peer.conn.send_text("a", fin=False)
            peer.conn.send_continuation("b€".encode(), True)
            peer.conn.send_ping(b"from relayd")
            peer.flush()
            assert await ws.recv() == "wörld"
            assert await ws.recv() == b"x" * 70000
            assert await ws.recv() == "ab€"
            assert await peer.next() == E.Pong(b"from relayd")
            await ws.close(4000, "client says bye")
        assert await peer.until_closed() == [E.Close(4000, "client says bye")]
        assert peer.conn.close_code == 4000 and ws.close_code == 4000
        server.close()

    run(main())


def test_server_closes_with_a_code(W):
    async def main():
        server, port, peers = await relayd_server(W)
        async with connect(f"ws://127.0.0.1:{port}/") as ws:
            peer = await peers.get()
            peer.conn.send_close(4001, "server says bye")
            peer.flush()
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 4001 and info.value.rcvd.reason == "server says bye"
        assert await peer.until_closed() == [E.Close(4001, "server says bye")]
        assert peer.conn.state == 3
        server.close()

    run(main())


def test_server_closes_oversized_message_1009(W):
    async def main():
        server, port, peers = await relayd_server(W, WsConfig(max_message=1000, max_frame=1000))
        async with connect(f"ws://127.0.0.1:{port}/") as ws:
            peer = await peers.get()
            await ws.send(b"y" * 1001)
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1009
        evs = await peer.until_closed()
        assert type(evs[-1]) is E.WsProtocolError and evs[-1].close_code == 1009
        server.close()

    run(main())


def test_server_closes_invalid_utf8_1007(W):
    async def main():
        server, port, peers = await relayd_server(W)
        async with connect(f"ws://127.0.0.1:{port}/") as ws:
            peer = await peers.get()
            # websockets checks what it sends as str; its protocol object
            # sends raw bytes as text: a valid start, the bad byte in a
            # continuation frame.
            async with ws.send_context():
                ws.protocol.send_text("ok €".encode()[:4], fin=False)
                ws.protocol.send_continuation(b"\xff", fin=True)
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1007
        evs = await peer.until_closed()
        assert evs[-1].close_code == 1007 and type(evs[-1].error).__name__ == "InvalidUtf8"
        server.close()

    run(main())


def test_server_refuses_a_bad_version_with_426(W):
    async def main():
        server, port, peers = await relayd_server(W)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n")
        head = http1.parse_response_head(await read_head(reader))
        assert head.status == 426 and head.get(b"sec-websocket-version") == b"13"
        writer.close()
        server.close()

    run(main())


# --- websockets as the server, relayd's core as the client ----------------------------------


async def echo(ws):
    """Echo messages; a message "close:CODE" closes with that code."""
    async for msg in ws:
        if isinstance(msg, str) and msg.startswith("close:"):
            await ws.close(int(msg[6:]), "as asked")
            return
        await ws.send(msg)


def test_client_messages_fragments_ping_and_close(W):
    async def main():
        async with serve(echo, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            peer = await relayd_client(W, port)
            c = peer.conn
            c.send_text("héllo")
            c.send_binary(b"\x07" * 100000)
            c.send_text(b"frag", fin=False)
            c.send_ping(b"p1")
            c.send_continuation("ment €".encode(), fin=False)
            c.send_continuation(b"", fin=True)
            peer.flush()
            evs = [await peer.next() for _ in range(4)]
            # The pong is websockets' own answer: it may overtake the echoes.
            assert [e for e in evs if type(e) is not E.Pong] == [
                E.TextMessage("héllo"), E.BinaryMessage(b"\x07" * 100000), E.TextMessage("fragment €")]
            assert E.Pong(b"p1") in evs
            c.send_close(4003, "client done")
            peer.flush()
            assert await peer.until_closed() == [E.Close(4003, "client done")]
            assert c.close_code == 4003

    run(main())


def test_client_server_pings_and_closes(W):
    async def main():
        seen = asyncio.get_running_loop().create_future()

        async def handler(ws):
            await asyncio.wait_for(await ws.ping(b"srv"), 10)  # answered by the auto-pong
            seen.set_result(True)
            await echo(ws)

        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            peer = await relayd_client(W, port)
            assert await peer.next() == E.Ping(b"srv")
            await asyncio.wait_for(seen, 10)
            peer.conn.send_text("close:4004")
            peer.flush()
            assert await peer.until_closed() == [E.Close(4004, "as asked")]
            # The client echoed the code and waited for the server to end TCP.
            assert peer.conn.close_code == 4004 and peer.conn.close_sent == 4004

    run(main())


def test_client_oversized_message_both_ways_1009(W):
    async def main():
        async with serve(echo, "127.0.0.1", 0, max_size=1000) as server:
            port = server.sockets[0].getsockname()[1]
            peer = await relayd_client(W, port)
            peer.conn.send_binary(b"z" * 1001)  # websockets' limit
            peer.flush()
            evs = await peer.until_closed()
            assert [type(e) for e in evs] == [E.Close] and peer.conn.close_code == 1009
        async with serve(echo, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            peer = await relayd_client(W, port, WsConfig(max_message=500, max_frame=500))
            peer.conn.send_binary(b"z" * 501)  # echoed back above our limit
            peer.flush()
            evs = await peer.until_closed()
            assert type(evs[-1]) is E.WsProtocolError and evs[-1].close_code == 1009
            assert peer.conn.close_sent == 1009

    run(main())


def test_client_sends_invalid_utf8_websockets_closes_1007(W):
    async def main():
        async with serve(echo, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            peer = await relayd_client(W, port)
            peer.conn.send_text("€".encode()[:1], fin=False)  # bytes are trusted: the caller's promise broken
            peer.conn.send_continuation(b"A", fin=True)
            peer.flush()
            evs = await peer.until_closed()
            assert [type(e) for e in evs] == [E.Close] and evs[0].code == 1007

    run(main())
