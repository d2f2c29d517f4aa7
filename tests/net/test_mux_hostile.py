"""A yamux peer that breaks the rules in one write must never take the link
down by an exception in the event loop: events for streams that are already
gone are dropped, protocol errors end with GoAway and a counted metric, and a
stream handler or sink that raises costs only its own stream.

The peer here is a raw socket writing hand-made frames, so that SYN, data,
RST and protocol errors arrive in one ``data_received`` call (the way a
relay's single write of SYN + request + RST reaches an agent)."""

import asyncio
import socket
import struct

import pytest

from relayd.core import _yamux_py as K
from relayd.net import mux, run
from tests.core.frames import data, frame, parse_frames, syn, wnd
from tests.metric import value
from tests.waiting import until

BYSTANDER = 1  # the raw peer is the client: odd stream ids


class RawPeer:
    """The client end of a link: a plain socket writing raw frames."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    async def send(self, blob: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, blob)

    async def read_frames(self, until, timeout: float = 5.0) -> list:
        """Frames from the server until ``until(frames)`` holds (or EOF)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frames = parse_frames(self.buf) if _whole(self.buf) else []
            if frames and until(frames):
                return frames
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"frames not seen in time: {frames}")
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), left)
            if not chunk:
                return parse_frames(self.buf) if _whole(self.buf) else []
            self.buf += chunk

    async def echo_data(self, sid: int, payload: bytes) -> bytes:
        """Send payload on ``sid`` and collect the echo (the handler echoes)."""
        start = len(self.buf)
        await self.send(data(sid, payload))

        def enough(frames):
            got = b"".join(f[4] for f in parse_frames(self.buf[start:]) if f[0] == K.TYPE_DATA and f[2] == sid) \
                if _whole(self.buf[start:]) else b""
            return len(got) >= len(payload)

        await self.read_frames(enough)
        return b"".join(f[4] for f in parse_frames(self.buf[start:]) if f[0] == K.TYPE_DATA and f[2] == sid)


def _whole(buf: bytes) -> bool:
    pos = 0
    while pos < len(buf):
        if len(buf) - pos < 12:
            return False
        _, t, _, _, ln = struct.unpack_from(">BBHII", buf, pos)
        pos += 12 + (ln if t == K.TYPE_DATA else 0)
    return pos == len(buf)


async def _echo(st) -> None:
    while True:
        d = await st.read()
        if not d:
            st.write_eof()
            return
        await st.write(d)


async def _server(handler=_echo):
    """A MuxConnection server (keepalive off) and a raw peer connected to it,
    with the bystander stream 1 open and echoing."""
    loop = asyncio.get_running_loop()
    got = loop.create_future()
    server = await mux.serve("127.0.0.1", 0, got.set_result, on_stream=handler, keepalive=False)
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", server.sockets[0].getsockname()[1]))
    conn = await asyncio.wait_for(got, 5)
    peer = RawPeer(sock)
    await peer.send(syn(BYSTANDER))
    assert await peer.echo_data(BYSTANDER, b"before") == b"before"
    return server, conn, peer


def _loop_errors():
    errors = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    return errors


def test_syn_data_rst_in_one_read_keeps_the_link():
    """The relay opens a stream, sends the request and resets it in one
    write (a refused HTTPS request): the agent drops the stream quietly."""

    async def main():
        errors = _loop_errors()
        server, conn, peer = await _server()
        await peer.send(syn(3) + data(3, b"GET / HTTP/1.1\r\n") + wnd(3, 0, K.FLAG_RST))
        # And the same for many streams in one write.
        burst = b"".join(syn(s) + data(s, b"x" * 100) + wnd(s, 0, K.FLAG_RST) for s in range(5, 405, 2))
        await peer.send(burst)
        assert await peer.echo_data(BYSTANDER, b"after") == b"after"
        assert not conn.closed and not errors
        assert conn.stream_count() == 1
        peer.sock.close()
        server.close()

    run(main())


def test_syn_data_rst_in_one_read_with_accept_queue():
    """Without a handler (accept queue), a stream the peer reset in the read
    that opened it is never handed out, and the link lives on."""

    async def main():
        errors = _loop_errors()
        loop = asyncio.get_running_loop()
        got = loop.create_future()
        server = await mux.serve("127.0.0.1", 0, got.set_result, keepalive=False)
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", server.sockets[0].getsockname()[1]))
        conn = await asyncio.wait_for(got, 5)
        peer = RawPeer(sock)
        await peer.send(syn(1) + data(1, b"x") + wnd(1, 0, K.FLAG_RST) + syn(3) + data(3, b"ok", K.FLAG_FIN))
        # Stream 1 was gone before anyone could take it: never handed out.
        second = await asyncio.wait_for(conn.accept_stream(), 5)
        assert second.stream_id == 3
        assert await second.read() == b"ok" and await second.read() == b""
        assert not conn.closed and not errors
        sock.close()
        server.close()

    run(main())


@pytest.mark.parametrize("case", ["window", "reused_id", "unexpected_ack", "syn_flood"])
def test_syn_then_protocol_error_ends_with_goaway_and_metric(case):
    """A SYN followed in the same read by a protocol error: GoAway with the
    protocol-error code, the link closed, a counted metric, nothing raised
    into the event loop."""
    bad = {
        # data beyond the 256 KiB window, riding on the SYN's stream
        "window": syn(3) + frame(K.TYPE_DATA, 0, 3, K.INITIAL_WINDOW + 1, b"x" * 64),
        "reused_id": syn(3) + syn(3),
        "unexpected_ack": syn(3) + wnd(3, 0, K.FLAG_ACK),
        "syn_flood": b"".join(syn(s) for s in range(3, 3 + 2 * 5000, 2)),
    }[case]
    kind = {"window": "FlowControlError", "reused_id": "StreamIdError", "unexpected_ack": "InvalidFlags",
            "syn_flood": "FloodError"}[case]

    async def main():
        errors = _loop_errors()
        server, conn, peer = await _server()
        before = value("relayd_protocol_errors_total", kind=kind)
        await peer.send(bad)
        frames = await peer.read_frames(lambda fs: any(f[0] == K.TYPE_GO_AWAY for f in fs))
        goaways = [f for f in frames if f[0] == K.TYPE_GO_AWAY]
        assert goaways[-1][3] == K.GO_AWAY_PROTOCOL_ERROR
        await asyncio.wait_for(asyncio.shield(conn.closed_future), 5)
        assert value("relayd_protocol_errors_total", kind=kind) == before + 1
        assert not errors, errors
        peer.sock.close()
        server.close()

    run(main())


def test_sink_that_raises_costs_only_its_stream():
    """A stream sink whose callback raises (a bug, or a parser error that
    slipped through): that stream is reset, the others go on."""

    class Boom:
        def __init__(self, st):
            self.st = st
            self.reset = False

        def stream_data(self, d):
            raise RuntimeError("sink bug")

        def stream_eof(self):
            pass

        def stream_window(self):
            pass

        def stream_reset(self):
            self.reset = True

    sinks = []

    async def handler(st):
        if st.stream_id == BYSTANDER:
            return await _echo(st)
        sink = Boom(st)
        sinks.append(sink)
        st.attach(sink)

    async def main():
        errors = _loop_errors()
        server, conn, peer = await _server(handler)
        before = value("relayd_internal_errors_total", where="mux_event")
        await peer.send(syn(3))
        await until(lambda: sinks, 5, "stream 3 never reached its handler")
        start = len(peer.buf)
        await peer.send(data(3, b"boom") + data(BYSTANDER, b"same read"))
        frames = await peer.read_frames(
            lambda fs: any(f[2] == 3 and f[1] & K.FLAG_RST for f in parse_frames(peer.buf[start:]))
            and b"same read" in b"".join(f[4] for f in parse_frames(peer.buf[start:])))
        assert frames
        assert sinks and sinks[0].reset
        assert value("relayd_internal_errors_total", where="mux_event") == before + 1
        assert await peer.echo_data(BYSTANDER, b"still") == b"still"
        assert not conn.closed and not errors
        peer.sock.close()
        server.close()

    run(main())
