"""The WebSocket connection (relayd.core.wsframe.Connection) and the opening
handshake (relayd.core.wshandshake), on both builds."""

import importlib
import struct

import pytest

from relayd import errors
from relayd.core import _wsframe_py as P
from relayd.core import ws_events as E
from relayd.core import wshandshake as H
from relayd.core.wsconfig import WsConfig
from tests.conftest import BUILDS

KEY = b"\x11\x22\x33\x44"


def fixed_key(n):
    return KEY


@pytest.fixture(params=BUILDS)
def W(request):
    return importlib.import_module("relayd.core._wsframe_c" if request.param == "compiled"
                                   else "relayd.core._wsframe_py")


def pair(W, **kw):
    """(client, server) connections."""
    return W.Connection(True, random=fixed_key, **kw), W.Connection(False, **kw)


def deliver(src, dst):
    return dst.receive_data(src.data_to_send())


def test_messages_both_ways_assembled(W):
    c, s = pair(W)
    c.send_text("héllo")
    c.send_binary(b"\x00\xff" * 100)
    assert deliver(c, s) == [E.TextMessage("héllo"), E.BinaryMessage(b"\x00\xff" * 100)]
    s.send_text("wörld")
    s.send_binary([b"ab", bytearray(b"cd"), memoryview(b"ef")])  # one frame, by reference
    assert deliver(s, c) == [E.TextMessage("wörld"), E.BinaryMessage(b"abcdef")]


def test_fragments_with_a_ping_between_them(W):
    c, s = pair(W)
    euro = "€".encode()
    c.send_text(b"a" + euro[:1], fin=False)
    c.send_ping(b"are you there")
    c.send_continuation(euro[1:], fin=False)
    c.send_continuation(b"", fin=True)
    assert deliver(c, s) == [E.Ping(b"are you there"), E.TextMessage("a€")]
    assert deliver(s, c) == [E.Pong(b"are you there")]  # the automatic pong


def test_streaming_mode_hands_out_parts(W):
    c = W.Connection(True, random=fixed_key)
    s = W.Connection(False, assemble=False)
    c.send_binary(b"one", fin=False)
    c.send_continuation(b"two", fin=True)
    data = c.data_to_send()
    evs = s.receive_data(data[:7]) + s.receive_data(data[7:])
    assert b"".join(e.data for e in evs) == b"onetwo"
    assert all(type(e) is E.DataFrame and e.opcode == 2 for e in evs) and evs[-1].fin
    assert not any(e.fin for e in evs[:-1])


def test_peer_closes_we_echo(W):
    c, s = pair(W)
    c.send_close(4001, "done here")
    assert c.state == P.CLOSING and c.close_sent == 4001
    assert deliver(c, s) == [E.Close(4001, "done here")]
    assert s.state == P.CLOSED and s.close_code == 4001 and s.close_sent == 4001
    assert s.should_close_transport  # a server ends TCP at once
    assert deliver(s, c) == [E.Close(4001, "done here")]
    assert c.state == P.CLOSED and not c.should_close_transport  # a client waits for the server
    c.receive_eof()
    assert c.close_code == 4001  # the clean close is what counts


def test_close_without_code_is_echoed_empty(W):
    c, s = pair(W)
    evs = s.receive_data(W.encode_frame(P.OP_CLOSE, b"", True, KEY))
    assert evs == [E.Close(1005, "")] and s.close_code == 1005
    assert s.data_to_send() == W.encode_frame(P.OP_CLOSE, b"")


def test_input_after_the_close_is_discarded(W):
    c, s = pair(W)
    c.send_close()
    c_bytes = c.data_to_send()
    junk = b"\xff" * 20
    assert s.receive_data(c_bytes + junk) == [E.Close(1000, "")]
    assert s.receive_data(W.encode_frame(P.OP_PING, b"x", True, KEY)) == []
    assert s.data_to_send() == W.encode_close(1000)  # no pong after the close


def test_data_still_arrives_while_our_close_waits(W):
    c, s = pair(W)
    s.send_close(1001, "going away")
    c.send_text("late")
    assert deliver(c, s) == [E.TextMessage("late")]
    assert s.state == P.CLOSING


@pytest.mark.parametrize("payload,code,err", [
    (struct.pack(">H", 999), 1002, errors.WebSocketError),
    (struct.pack(">H", 1004), 1002, errors.WebSocketError),
    (struct.pack(">H", 1005), 1002, errors.WebSocketError),
    (struct.pack(">H", 1006), 1002, errors.WebSocketError),
    (struct.pack(">H", 1015), 1002, errors.WebSocketError),
    (struct.pack(">H", 2999), 1002, errors.WebSocketError),
    (struct.pack(">H", 5000), 1002, errors.WebSocketError),
    (b"\x03", 1002, errors.WebSocketError),
    (struct.pack(">H", 1000) + b"\xc3", 1007, errors.InvalidUtf8),
])
def test_bad_close_frames_fail_the_connection(W, payload, code, err):
    s = W.Connection(False)
    evs = s.receive_data(W.encode_frame(P.OP_CLOSE, payload, True, KEY))
    assert type(evs[-1]) is E.WsProtocolError and type(evs[-1].error) is err and evs[-1].close_code == code
    assert s.state == P.CLOSED and s.failed and s.should_close_transport
    out = s.data_to_send()
    assert out[:4] == bytes((0x88, len(out) - 2)) + struct.pack(">H", code)


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999])
def test_allowed_close_codes(W, code):
    s = W.Connection(False)
    assert s.receive_data(W.encode_frame(P.OP_CLOSE, struct.pack(">H", code), True, KEY)) == [E.Close(code, "")]


def test_invalid_utf8_split_across_frames_is_1007(W):
    s = W.Connection(False)
    bad = "€".encode()[:2] + b"A"  # a lead byte, one continuation, then ASCII
    wire = W.encode_frame(P.OP_TEXT, bad[:1], False, KEY) + W.encode_frame(P.OP_CONTINUATION, bad[1:], True, KEY)
    evs = s.receive_data(wire)
    assert type(evs[-1].error) is errors.InvalidUtf8 and evs[-1].close_code == 1007
    assert s.data_to_send()[2:4] == struct.pack(">H", 1007)


def test_limits_close_with_1009(W):
    s = W.Connection(False, WsConfig(max_message=1000, max_frame=400))
    evs = s.receive_data(W.encode_frame(P.OP_BINARY, bytes(401), True, KEY))
    assert type(evs[-1].error) is errors.MessageTooBig and evs[-1].close_code == 1009
    s = W.Connection(False, WsConfig(max_message=1000, max_frame=400))
    wire = b"".join(W.encode_frame(op, bytes(300), fin, KEY) for op, fin in ((2, False), (0, False), (0, False), (0, True)))
    evs = s.receive_data(wire)
    assert evs[-1].close_code == 1009 and "message above 1000" in str(evs[-1].error)


def test_ping_flood_while_nobody_writes_is_1008(W):
    s = W.Connection(False, WsConfig(max_buffered=1000))
    ping = W.encode_frame(P.OP_PING, bytes(100), True, KEY)
    evs = s.receive_data(ping * 9)  # 9 pongs of 102 bytes fit
    assert len(evs) == 9 and not s.failed
    evs = s.receive_data(ping)
    assert type(evs[-1].error) is errors.WebSocketFlood and evs[-1].close_code == 1008
    s = W.Connection(False, WsConfig(max_buffered=1000))
    for _ in range(50):  # drained after every read: no limit is reached
        s.receive_data(ping)
        s.data_to_send()
    assert not s.failed


def test_eof_without_close_is_1006(W):
    c, s = pair(W)
    assert s.receive_eof() == [] and s.close_code == 1006 and s.state == P.CLOSED
    assert not s.should_close_transport and s.receive_data(b"\x81\x80") == []


def test_local_misuse_raises(W):
    c, s = pair(W)
    with pytest.raises(errors.WebSocketStateError):
        c.send_continuation(b"x", True)
    c.send_binary(b"x", fin=False)
    with pytest.raises(errors.WebSocketStateError):
        c.send_text("new message inside the fragmented one")
    c.send_continuation(b"y", True)
    for code in (999, 1004, 1005, 1006, 1015, 2000, 5000):
        with pytest.raises(ValueError):
            c.send_close(code)
    with pytest.raises(ValueError):
        c.send_close(1000, "x" * 124)
    with pytest.raises(ValueError):
        c.send_ping(bytes(126))
    c.send_close(1000)
    with pytest.raises(errors.SessionClosedError):
        c.send_binary(b"after the close")
    with pytest.raises(errors.SessionClosedError):
        c.send_close(1000)
    c.send_ping(b"still fine while closing")


def test_fail_cuts_a_long_reason_at_a_character(W):
    s = W.Connection(False)
    s.fail(1003, "é" * 100)
    out = s.data_to_send()
    reason = out[4:]
    assert len(reason) <= 123 and reason.decode() == "é" * 61
    assert s.state == P.CLOSED and s.should_close_transport
    assert W.encode_close(1000, "€" * 50)[4:].decode() == "€" * 41


def test_client_frames_are_masked_server_frames_not(W):
    c, s = pair(W)
    c.send_binary(b"abc")
    s.send_binary(b"abc")
    assert c.data_to_send() == bytes((0x82, 0x83)) + KEY + W.mask(b"abc", KEY)
    assert s.data_to_send() == b"\x82\x03abc"


def test_events_and_errors_are_one_class_for_both_builds():
    """relayd.core.ws_events and relayd.errors define them once: an
    isinstance or ``type(ev) is`` written against one build works for both."""
    from relayd.core import _wsframe_py

    mods = [_wsframe_py]
    if "compiled" in BUILDS:
        from relayd.core import _wsframe_c

        mods.append(_wsframe_c)
    seen = set()
    for mod in mods:
        s = mod.Connection(False)
        evs = s.receive_data(mod.encode_frame(P.OP_PING, b"p", True, KEY) + mod.encode_frame(P.OP_TEXT, b"\xff", True, KEY))
        assert type(evs[0]) is E.Ping and type(evs[1]) is E.WsProtocolError
        assert type(evs[1].error) is errors.InvalidUtf8 and isinstance(evs[1].error, errors.WebSocketError)
        seen.add((type(evs[0]), type(evs[1]), type(evs[1].error)))
    assert len(seen) == 1


# --- the opening handshake -------------------------------------------------------------------

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 1.3
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def upgrade(over=None):
    h = {b"Host": b"relay.example", b"Upgrade": b"websocket", b"Connection": b"keep-alive, Upgrade",
         b"Sec-WebSocket-Key": RFC_KEY.encode(), b"Sec-WebSocket-Version": b"13"}
    h.update(over or {})
    return [(k, v) for k, v in h.items() if v is not None]


def test_accept_key_of_the_rfc():
    assert H.accept_key(RFC_KEY) == RFC_ACCEPT


def test_server_accepts_a_good_upgrade():
    res = H.server_handshake(b"GET", b"/.relayd/agent?x=1", upgrade())
    assert isinstance(res, H.Accept) and res.key == RFC_KEY and res.subprotocol is None
    assert res.response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: " + RFC_ACCEPT.encode() + b"\r\n" in res.response
    assert res.response.endswith(b"\r\n\r\n")
    # str heads work too, and case does not matter in names and tokens.
    res = H.server_handshake("GET", "/", [(k.decode().lower(), v.decode().upper() if k == b"Upgrade" else v.decode())
                                           for k, v in upgrade()])
    assert isinstance(res, H.Accept)


@pytest.mark.parametrize("method,over,status", [
    (b"POST", {}, 400),
    (b"GET", {b"Host": None}, 400),
    (b"GET", {b"Upgrade": b"h2c"}, 400),
    (b"GET", {b"Connection": b"keep-alive"}, 400),
    (b"GET", {b"Sec-WebSocket-Key": None}, 400),
    (b"GET", {b"Sec-WebSocket-Key": b"c2hvcnQ="}, 400),
    (b"GET", {b"Sec-WebSocket-Key": b"not base64!!"}, 400),
    (b"GET", {b"Sec-WebSocket-Version": None}, 400),
    (b"GET", {b"Sec-WebSocket-Version": b"8"}, 426),
])
def test_server_refuses_bad_upgrades(method, over, status):
    res = H.server_handshake(method, b"/", upgrade(over))
    assert isinstance(res, H.Refuse) and res.status == status and res.reason
    if status == 426:
        assert (b"Sec-WebSocket-Version", b"13") in res.headers


def test_subprotocol_is_the_first_offered_that_we_speak():
    res = H.server_handshake(b"GET", b"/", upgrade({b"Sec-WebSocket-Protocol": b"x, b, a"}), subprotocols=("a", "b"))
    assert res.subprotocol == "b" and b"\r\nSec-WebSocket-Protocol: b\r\n" in res.response
    res = H.server_handshake(b"GET", b"/", upgrade({b"Sec-WebSocket-Protocol": b"x"}), subprotocols=("a",))
    assert res.subprotocol is None and b"Sec-WebSocket-Protocol" not in res.response


def test_client_request_and_check():
    hs = H.client_handshake("relay.example:8443", "/.relayd/agent", subprotocols=("a",), key=RFC_KEY)
    assert hs.request.startswith(b"GET /.relayd/agent HTTP/1.1\r\nHost: relay.example:8443\r\n")
    # Our own server accepts our own request (heads split by hand here).
    lines = hs.request.split(b"\r\n")[1:-2]
    headers = [tuple(x.strip() for x in ln.split(b":", 1)) for ln in lines]
    res = H.server_handshake(b"GET", b"/.relayd/agent", headers, subprotocols=("a",))
    assert isinstance(res, H.Accept)
    reply = [tuple(x.strip() for x in ln.split(b":", 1)) for ln in res.response.split(b"\r\n")[1:-2]]
    assert hs.check(101, reply) == "a"
    good = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", RFC_ACCEPT.encode())]
    assert hs.check(101, good) is None
    for status, headers in [(200, good), (101, good[:1] + good[2:]), (101, good[1:]),
                            (101, good[:2] + [(b"Sec-WebSocket-Accept", b"x")]),
                            (101, good + [(b"Sec-WebSocket-Extensions", b"permessage-deflate")]),
                            (101, good + [(b"Sec-WebSocket-Protocol", b"b")])]:
        with pytest.raises(errors.InvalidHandshake):
            hs.check(status, headers)
