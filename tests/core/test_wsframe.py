"""The WebSocket frame codec, on both builds, and against `websockets`."""

import importlib
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd import errors
from relayd.core import _wsframe_py as W
from tests.conftest import BUILDS

KEY = b"\x11\x22\x33\x44"


def wsbuild(name):
    return importlib.import_module("relayd.core._wsframe_c" if name == "compiled" else "relayd.core._wsframe_py")


@pytest.fixture(params=BUILDS)
def ws(request):
    return wsbuild(request.param)


def describe(ev):
    name = type(ev).__name__
    if name == "WsProtocolError":
        return (name, type(ev.error).__name__, str(ev.error), ev.close_code)
    if name == "DataFrame":
        return (name, ev.opcode, ev.data, ev.fin)
    if name == "Close":
        return (name, ev.code, ev.reason)
    return (name, ev.data)


def merged(events):
    out = []
    for e in map(describe, events):
        if e[0] == "DataFrame" and out and out[-1][0] == "DataFrame" and not out[-1][3]:
            prev = out.pop()
            e = ("DataFrame", prev[1], prev[2] + e[2], e[3])
        out.append(e)
    return out


def raw(first, second, ext=b"", key=b"", payload=b""):
    return bytes((first, second)) + ext + key + payload


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 200_000])
@pytest.mark.parametrize("client", [True, False])
def test_roundtrip_sizes(ws, n, client):
    payload = os.urandom(n)
    frame = ws.encode_frame(W.OP_BINARY, payload, True, KEY if client else None)
    p = ws.FrameParser(server=client)
    assert merged(p.feed(frame)) == [("DataFrame", W.OP_BINARY, payload, True)]


def test_mask_matches_naive_xor(ws):
    for n in (0, 1, 3, 7, 8, 9, 63, 64, 65, 1000):
        data = os.urandom(n)
        for off in range(4):
            want = bytes(b ^ KEY[(i + off) % 4] for i, b in enumerate(data))
            assert ws.mask(data, KEY, off) == want


def test_every_split_gives_the_same_events(ws):
    stream = (ws.encode_frame(W.OP_TEXT, "héllo ".encode(), False, KEY)
              + ws.encode_frame(W.OP_PING, b"p", True, KEY)
              + ws.encode_frame(W.OP_CONTINUATION, "wörld".encode(), True, KEY)
              + ws.encode_close(1000, "bye", KEY))
    whole = merged(ws.FrameParser(True).feed(stream))
    assert whole == [("DataFrame", 1, "héllo wörld".encode(), True), ("Ping", b"p"), ("Close", 1000, "bye")] or \
        whole == [("DataFrame", 1, "héllo ".encode(), False), ("Ping", b"p"),
                  ("DataFrame", 1, "wörld".encode(), True), ("Close", 1000, "bye")]
    for cut in range(1, len(stream)):
        p = ws.FrameParser(True)
        assert merged(p.feed(stream[:cut]) + p.feed(stream[cut:])) == whole


def test_control_frames_between_fragments(ws):
    p = ws.FrameParser(False)
    evs = p.feed(ws.encode_frame(W.OP_BINARY, b"ab", False) + ws.encode_frame(W.OP_PONG, b"x")
                 + ws.encode_frame(W.OP_CONTINUATION, b"cd", True))
    assert [describe(e) for e in evs] == [("DataFrame", 2, b"ab", False), ("Pong", b"x"),
                                          ("DataFrame", 2, b"cd", True)]


def test_close_without_code(ws):
    assert [describe(e) for e in ws.FrameParser(False).feed(ws.encode_frame(W.OP_CLOSE, b""))] == [("Close", 1005, "")]


BAD = [
    ("reserved bit", raw(0x82 | 0x40, 0x80, key=KEY), errors.InvalidFlags, 1002),
    ("unknown data opcode", raw(0x83, 0x80, key=KEY), W.WebSocketError, 1002),
    ("unknown control opcode", raw(0x8B, 0x80, key=KEY), W.WebSocketError, 1002),
    ("fragmented control", raw(0x09, 0x80, key=KEY), W.WebSocketError, 1002),
    ("control too long", raw(0x89, 0x80 | 126, struct.pack(">H", 126), KEY, bytes(126)), W.WebSocketError, 1002),
    ("unmasked from client", raw(0x82, 0x01, payload=b"x"), W.WebSocketError, 1002),
    ("non-shortest 16-bit", raw(0x82, 0x80 | 126, struct.pack(">H", 100), KEY), W.WebSocketError, 1002),
    ("non-shortest 64-bit", raw(0x82, 0x80 | 127, struct.pack(">Q", 1000), KEY), W.WebSocketError, 1002),
    ("length above 2**63", raw(0x82, 0x80 | 127, struct.pack(">Q", 1 << 63), KEY), W.WebSocketError, 1002),
    ("orphan continuation", raw(0x80, 0x80, key=KEY), W.WebSocketError, 1002),
    ("interleaved messages", raw(0x02, 0x80, key=KEY) + raw(0x82, 0x80, key=KEY), W.WebSocketError, 1002),
    ("bad utf-8 text", W.encode_frame(W.OP_TEXT, b"\xff\xfe", True, KEY), W.InvalidUtf8, 1007),
    ("1-byte close", W.encode_frame(W.OP_CLOSE, b"\x03", True, KEY), W.WebSocketError, 1002),
    ("close code 1005 on the wire", W.encode_frame(W.OP_CLOSE, struct.pack(">H", 1005), True, KEY), W.WebSocketError, 1002),
    ("close code 999", W.encode_frame(W.OP_CLOSE, struct.pack(">H", 999), True, KEY), W.WebSocketError, 1002),
    ("close reason not utf-8", W.encode_frame(W.OP_CLOSE, struct.pack(">H", 1000) + b"\xff", True, KEY), W.InvalidUtf8, 1007),
    ("message too big", raw(0x82, 0x80 | 127, struct.pack(">Q", 17 * 1024 * 1024), KEY), W.MessageTooBig, 1009),
]


@pytest.mark.parametrize("case,data,err,code", BAD, ids=[b[0] for b in BAD])
def test_bad_frames(ws, case, data, err, code):
    p = ws.FrameParser(server=True)
    evs = p.feed(data)
    last = evs[-1]
    assert type(last).__name__ == "WsProtocolError", case
    assert type(last.error) is err and last.close_code == code, (case, last)
    assert p.failed and p.feed(raw(0x89, 0x80, key=KEY)) == []


def test_masked_frame_from_server_refused(ws):
    evs = ws.FrameParser(server=False).feed(ws.encode_frame(W.OP_BINARY, b"x", True, KEY))
    assert describe(evs[-1])[:2] == ("WsProtocolError", "WebSocketError")


def test_utf8_split_across_fragments_is_fine(ws):
    text = "€".encode()  # 3 bytes, split 1 + 2
    p = ws.FrameParser(False)
    evs = p.feed(ws.encode_frame(W.OP_TEXT, text[:1], False) + ws.encode_frame(W.OP_CONTINUATION, text[1:], True))
    assert not p.failed and b"".join(e.data for e in evs) == text


def test_truncated_utf8_at_message_end_refused(ws):
    p = ws.FrameParser(False)
    evs = p.feed(ws.encode_frame(W.OP_TEXT, "€".encode()[:2], True))
    assert describe(evs[-1])[3] == 1007


# --- an independent implementation: the `websockets` package ------------------------------


def test_frames_from_websockets_parse_here(ws):
    import websockets.frames as frames
    for opcode, data, fin in [(frames.Opcode.BINARY, os.urandom(70000), True),
                              (frames.Opcode.TEXT, "ünïcode".encode(), False),
                              (frames.Opcode.CONT, b" more", True),
                              (frames.Opcode.PING, b"hi", True)]:
        wire = frames.Frame(opcode, data, fin).serialize(mask=True, extensions=[])
        evs = merged(ws.FrameParser(server=True).feed(wire)) if opcode != frames.Opcode.CONT else None
        if evs is None:
            continue
        if opcode == frames.Opcode.PING:
            assert evs == [("Ping", b"hi")]
        else:
            assert evs == [("DataFrame", int(opcode), data, fin)]


def test_frames_from_here_parse_in_websockets(ws):
    import websockets.frames as frames
    from websockets.streams import StreamReader

    for mask_key in (None, KEY):
        for payload in (b"", b"x" * 125, os.urandom(300), os.urandom(70000)):
            reader = StreamReader()
            reader.feed_data(ws.encode_frame(W.OP_BINARY, payload, True, mask_key))
            gen = frames.Frame.parse(reader.read_exact, mask=mask_key is not None, max_size=None, extensions=[])
            try:
                next(gen)
                raise AssertionError("websockets wanted more bytes")
            except StopIteration as stop:
                frame = stop.value
            assert frame.opcode == frames.Opcode.BINARY and frame.data == payload and frame.fin
    reader = StreamReader()
    reader.feed_data(ws.encode_close(1001, "going away"))
    gen = frames.Frame.parse(reader.read_exact, mask=False, max_size=None, extensions=[])
    try:
        next(gen)
    except StopIteration as stop:
        close = frames.Close.parse(stop.value.data)
    assert close.code == 1001 and close.reason == "going away"


# --- both builds, one truth -------------------------------------------------------------------

frame_st = st.one_of(
    st.tuples(st.sampled_from([0, 1, 2, 8, 9, 10, 3]), st.binary(max_size=300), st.booleans(), st.booleans()),
    st.tuples(st.just(-1), st.binary(min_size=1, max_size=16), st.booleans(), st.booleans()),
)


def build_stream(specs):
    out = b""
    for op, data, fin, masked in specs:
        if op == -1:
            out += data
            continue
        first = (0x80 if fin else 0) | op
        n = len(data)
        ext = b"" if n < 126 else struct.pack(">H", n)
        second = (0x80 if masked else 0) | (n if n < 126 else 126)
        out += bytes((first, second)) + ext + (KEY + W.mask(data, KEY) if masked else data)
    return out


@pytest.mark.skipif("compiled" not in BUILDS, reason="RELAYD_NO_EXTENSIONS=1: only the pure twin is built")
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(frame_st, max_size=12), server=st.booleans(), cuts=st.lists(st.integers(0, 4000), max_size=5))
def test_compiled_and_pure_agree(specs, server, cuts):
    stream = build_stream(specs)
    points = sorted(set(c for c in cuts if c <= len(stream)))
    pieces, last = [], 0
    for c in points + [len(stream)]:
        pieces.append(stream[last:c])
        last = c

    def run(mod):
        p = mod.FrameParser(server=server, max_message=1000)
        return [[describe(e) for e in p.feed(piece)] for piece in pieces]

    assert run(wsbuild("compiled")) == run(wsbuild("pure"))


@pytest.mark.skipif("compiled" not in BUILDS, reason="RELAYD_NO_EXTENSIONS=1: only the pure twin is built")
@given(data=st.binary(max_size=2000), key=st.binary(min_size=4, max_size=4), off=st.integers(0, 7))
def test_mask_builds_agree(data, key, off):
    assert wsbuild("compiled").mask(data, key, off) == wsbuild("pure").mask(data, key, off)


def test_both_builds_raise_the_same_error_classes(ws):
    """Errors live in relayd.errors, not in the compiled module: an except
    clause or isinstance written against one build works for the other."""
    from relayd import errors as E

    evs = ws.FrameParser(server=True).feed(raw(0x83, 0x80, key=KEY))
    assert isinstance(evs[-1].error, E.WebSocketError) and isinstance(evs[-1].error, W.WebSocketError)
    assert W.WebSocketError is E.WebSocketError and W.InvalidUtf8 is E.InvalidUtf8
    assert W.MessageTooBig is E.MessageTooBig
