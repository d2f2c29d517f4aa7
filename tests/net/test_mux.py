"""MuxConnection over real loopback sockets on uvloop."""

import asyncio
import hashlib
import os
import socket

import pytest

from relayd.core import yamux
from relayd.core.config import INITIAL_WINDOW, MuxConfig
from relayd.errors import SessionClosedError, StreamResetError
from relayd.net import mux, run
from tests.waiting import until


async def _pair(config=None, server_config=None, keepalive=True):
    got = asyncio.get_running_loop().create_future()
    server = await mux.serve("127.0.0.1", 0, got.set_result, config=server_config or config, keepalive=keepalive)
    port = server.sockets[0].getsockname()[1]
    client = await mux.connect("127.0.0.1", port, config=config, keepalive=keepalive)
    srv = await asyncio.wait_for(got, 5)
    return server, client, srv


def test_echo_many_streams_both_directions():
    async def main():
        server, c, s = await _pair()

        async def echo(conn, count):
            for _ in range(count):
                st = await conn.accept_stream()
                asyncio.get_running_loop().create_task(_echo(st))

        async def _echo(st):
            h = hashlib.sha256()
            while True:
                d = await st.read()
                if not d:
                    break
                h.update(d)
            await st.write(h.digest())
            st.write_eof()

        async def one(conn, i):
            st = await conn.open_stream()
            payload = os.urandom(1000 + 997 * i)
            await st.write(payload)
            st.write_eof()
            got = b""
            while True:
                d = await st.read()
                if not d:
                    break
                got += d
            assert got == hashlib.sha256(payload).digest()

        tasks = [echo(s, 60), echo(c, 60)]
        tasks += [one(c, i) for i in range(60)] + [one(s, i) for i in range(60)]
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert await c.drained(5) and await s.drained(5)
        assert c.session.stream_count() == 0 and s.session.stream_count() == 0
        await c.close()
        server.close()

    run(main())


def test_slow_reader_bounds_buffering():
    """A reader that does not read stalls the writer after one window."""

    async def main():
        server, c, s = await _pair()
        st = await c.open_stream()
        writer = asyncio.ensure_future(st.write(bytes(8 * 1024 * 1024)))
        peer = await asyncio.wait_for(s.accept_stream(), 5)
        await until(lambda: c.session.send_window(st.stream_id) == 0, 5, "the writer never ran out of window")
        assert not writer.done()
        # The peer was sent one window, no more (plus frame headers).
        assert s.bytes_in < INITIAL_WINDOW + 16 * 1024
        # Now read it all; the writer finishes.
        total = 0
        while total < 8 * 1024 * 1024:
            total += len(await peer.read())
        await asyncio.wait_for(writer, 10)
        await c.close()
        server.close()

    run(main())


def test_ping_and_window_growth_on_fast_consumer():
    async def main():
        server, c, s = await _pair()
        rtt = await c.ping(timeout=5)
        assert 0 < rtt < 1
        await s.ping(timeout=5)
        st = await c.open_stream()
        peer_task = asyncio.ensure_future(s.accept_stream())
        blob = bytes(32 * 1024 * 1024)

        async def drain(p):
            n = 0
            while True:
                d = await p.read(1 << 20)
                if not d:
                    return n
                n += len(d)

        async def send():
            await st.write(blob)
            st.write_eof()

        peer = await peer_task
        sent, n = await asyncio.wait_for(asyncio.gather(send(), drain(peer)), 30)
        assert n == len(blob)
        await c.close()
        server.close()

    run(main())


def test_protocol_error_closes_only_that_connection():
    async def main():
        server, c, s = await _pair()
        errs = []
        # A second, raw client speaking garbage.
        loop = asyncio.get_running_loop()
        port = server.sockets[0].getsockname()[1]
        bad = await loop.sock_connect(sock := socket.socket(), ("127.0.0.1", port)) or sock
        sock.setblocking(False)
        await loop.sock_sendall(sock, b"\x07" * 24)
        reply = await asyncio.wait_for(loop.sock_recv(sock, 100), 5)
        # GoAway with protocol-error code, then close.
        assert reply[:12] == yamux.encode_header(yamux.TYPE_GO_AWAY, 0, 0, yamux.GO_AWAY_PROTOCOL_ERROR)
        assert await asyncio.wait_for(loop.sock_recv(sock, 100), 5) == b""
        sock.close()
        # The good connection is untouched.
        st = await c.open_stream()
        await st.write(b"still fine")
        st.write_eof()
        peer = await s.accept_stream()
        assert await peer.read() == b"still fine"
        await c.close()
        server.close()

    run(main())


def test_keepalive_detects_dead_peer():
    async def main():
        # A "peer" that accepts TCP and then never answers anything.
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        cfg = MuxConfig(ping_interval=0.2, ping_timeout=0.5)
        c = await mux.connect("127.0.0.1", port, config=cfg)
        await asyncio.wait_for(asyncio.shield(c.closed_future), 5)
        assert isinstance(c.error, SessionClosedError)
        silent.close()

    run(main())


def test_reset_reaches_reader_and_writer():
    async def main():
        server, c, s = await _pair()
        st = await c.open_stream()
        await st.write(b"x")
        peer = await s.accept_stream()
        peer.reset()
        with pytest.raises(StreamResetError):
            await asyncio.wait_for(st.read(), 5)  # returns when the RST arrives
        with pytest.raises(StreamResetError):
            await st.write(b"more")
        await c.close()
        server.close()

    run(main())


def test_go_away_then_close():
    async def main():
        server, c, s = await _pair()
        s.go_away()
        await until(lambda: not c.accepting_streams, 5, "the GoAway never arrived")
        with pytest.raises(SessionClosedError):
            await c.open_stream()
        await s.close()
        await asyncio.wait_for(asyncio.shield(c.closed_future), 5)
        server.close()

    run(main())
