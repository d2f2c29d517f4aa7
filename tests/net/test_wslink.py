"""The agent link's WebSocket adapter (relayd.net.wslink.WsProtocol) on a
fake transport: what reaches the inner protocol and what is written."""

import asyncio
import struct

from relayd.core import _wsframe_py as P
from relayd.core import wsframe as ws
from relayd.net.wslink import WsProtocol

KEY = b"\x01\x02\x03\x04"


class FakeTransport:
    def __init__(self):
        self.out = b""
        self.closed = False

    def write(self, data):
        self.out += bytes(data)

    def writelines(self, bufs):
        for b in bufs:
            self.write(b)

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def get_extra_info(self, name, default=None):
        return default


class Inner(asyncio.Protocol):
    def __init__(self):
        self.data = b""
        self.paused = 0

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data

    def pause_writing(self):
        self.paused += 1

    def resume_writing(self):
        self.paused -= 1


def server(config=None):
    inner, real = Inner(), FakeTransport()
    proto = WsProtocol(inner, client=False, **({"config": config} if config else {}))
    proto.connection_made(real)
    return proto, inner, real


def frames(data, client=False):
    """The frames in ``data`` as (opcode, payload)."""
    evs = ws.FrameParser(server=client).feed(data)
    return [(e.opcode if type(e) is ws.DataFrame else type(e).__name__,
             e.data if hasattr(e, "data") else (e.code, e.reason)) for e in evs]


def test_binary_payload_reaches_the_inner_protocol_and_writes_are_messages():
    proto, inner, real = server()
    proto.data_received(P.encode_frame(2, b"ab", False, KEY) + P.encode_frame(0, b"cd", True, KEY))
    assert inner.data == b"abcd"
    inner.transport.writelines([b"x", b"", bytearray(b"yz")])
    assert frames(real.out) == [(2, b"xyz")]


def test_pings_are_answered_but_wait_while_writing_is_paused():
    proto, inner, real = server(ws.WsConfig(max_message=1 << 20, max_frame=1 << 20, max_buffered=1000))
    proto.data_received(P.encode_frame(9, b"hi", True, KEY))
    assert frames(real.out) == [("Pong", b"hi")]
    real.out = b""
    proto.pause_writing()
    assert inner.paused == 1
    proto.data_received(P.encode_frame(9, b"p" * 100, True, KEY) * 5)
    assert real.out == b""  # held while the peer does not read
    proto.resume_writing()
    assert frames(real.out) == [("Pong", b"p" * 100)] * 5 and inner.paused == 0
    real.out = b""
    proto.pause_writing()
    proto.data_received(P.encode_frame(9, b"p" * 100, True, KEY) * 20)  # a flood: more than 1000 bytes held
    kind, (code, _) = frames(real.out)[-1]
    assert real.closed and kind == "Close" and code == 1008


def test_text_message_closes_the_link_1003():
    proto, inner, real = server()
    proto.data_received(P.encode_frame(1, b"text", True, KEY))
    assert real.closed and inner.data == b""
    assert frames(real.out) == [("Close", (1003, "the agent link carries binary messages only"))]
    inner.transport.write(b"after the close")  # dropped, not an error
    assert frames(real.out)[-1][0] == "Close"


def test_peer_close_is_echoed_and_ends_the_transport():
    proto, inner, real = server()
    proto.data_received(P.encode_frame(8, struct.pack(">H", 4000) + b"bye", True, KEY))
    assert real.closed and frames(real.out) == [("Close", (4000, "bye"))]


def test_local_close_sends_1000():
    proto, inner, real = server()
    inner.transport.close()
    assert real.closed and frames(real.out) == [("Close", (1000, ""))]
    assert inner.transport.is_closing()


def test_client_frames_are_masked():
    inner, real = Inner(), FakeTransport()
    proto = WsProtocol(inner, client=True)
    proto.connection_made(real)
    inner.transport.write(b"from the agent")
    assert real.out[1] & 0x80 and frames(real.out, client=True) == [(2, b"from the agent")]
    proto.data_received(P.encode_frame(2, b"from the relay", True))
    assert inner.data == b"from the relay"


def test_data_and_close_in_one_read_all_reach_the_inner_protocol_and_its_answer_is_dropped():
    """The relay's last message and its close frame in one read: the close
    is parsed with the data, so the connection is closing before the inner
    protocol sees the data. The inner protocol answering (a window update)
    is dropped, not an error that would lose the data with the link."""

    class Answering(Inner):
        def data_received(self, data):
            super().data_received(data)
            self.transport.write(b"window update")

    inner, real = Answering(), FakeTransport()
    proto = WsProtocol(inner, client=True)
    proto.connection_made(real)
    proto.data_received(P.encode_frame(2, b"closed: 4401", True) + P.encode_frame(8, struct.pack(">H", 4401), True))
    assert inner.data == b"closed: 4401"
    assert real.closed and [f[0] for f in frames(real.out, client=True)] == ["Close"]
