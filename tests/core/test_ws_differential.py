"""Both builds, one truth, for the WebSocket connection: random byte streams
from a peer (valid and invalid: fragments, control frames between them,
UTF-8 cut across frames or broken, oversized frames and messages, close
frames with good and bad codes, masking the wrong way round, garbage) split
at random points and interleaved with random local commands, must give the
compiled build and the pure twin identical events, identical bytes to send,
identical errors raised and identical state. Also split invariance and
garbage on each build.

Checked against an injected bug: with a one-line change compiled into the
compiled build only (``if cython.compiled: code += 1`` before the echo of
the peer's close code in ``Connection._close_received``), rebuilt, the
differential test failed on its first run (hypothesis shrank it to one
close frame echoed as 1001 against 1000); the change was then removed and
the build restored.
"""

import importlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.core import _wsframe_py as P
from relayd.core.wsconfig import WsConfig
from tests.conftest import BUILDS
from tests.core.splits import split_at

KEY = b"\x5a\xa5\x0f\xf0"

TEXT = st.sampled_from(["", "a", "héllo", "€uro", "日本語", "😀 emoji", "x" * 130]).map(str.encode)
BAD_UTF8 = st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b"])
PAYLOAD = st.one_of(TEXT, BAD_UTF8, st.binary(max_size=300))
CODES = st.sampled_from([1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999, 999, 1004, 1005, 1006, 1015, 2000, 5000])

valid_message = st.tuples(
    st.just("message"), st.sampled_from([1, 2]), st.lists(TEXT, min_size=1, max_size=4),
    st.lists(st.sampled_from([None, None, (9, b"ping"), (10, b""), (9, b"")]), min_size=4, max_size=4))
valid_control = st.tuples(st.just("frame"), st.sampled_from([9, 10]), st.binary(max_size=20), st.just(True),
                          st.just(True))

peer_frame = st.one_of(
    valid_message, valid_message, valid_message, valid_control,
    # (kind, opcode, payload, fin, mask flag as the peer's role wants it?)
    st.tuples(st.just("frame"), st.sampled_from([0, 1, 2, 0, 1, 2, 3, 11]), PAYLOAD, st.booleans(),
              st.sampled_from([True, True, True, False])),
    st.tuples(st.just("frame"), st.sampled_from([8, 9, 10]), st.binary(max_size=130), st.sampled_from([True, True, False]),
              st.sampled_from([True, True, False])),
    st.tuples(st.just("close"), CODES, st.sampled_from(["", "bye", "é" * 70, "\udc80"]),
              st.sampled_from([True, True, True, False])),
    st.tuples(st.just("cut-text"), st.sampled_from(["€", "😀", "日"]), st.integers(1, 3)),
    st.tuples(st.just("huge"), st.sampled_from([126, 500, 70000, 1 << 40])),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=12)),
)

local_sends = st.one_of(
    st.tuples(st.just("text"), TEXT, st.booleans()),
    st.tuples(st.just("binary"), st.binary(max_size=200), st.booleans()),
    st.tuples(st.just("cont"), st.binary(max_size=50), st.booleans()),
    st.tuples(st.just("drain")),
)
local_cmd = st.one_of(
    local_sends, local_sends, local_sends,
    st.tuples(st.just("text"), TEXT, st.booleans()),
    st.tuples(st.just("binary"), st.binary(max_size=200), st.booleans()),
    st.tuples(st.just("binary-list"), st.lists(st.binary(max_size=50), min_size=1, max_size=3), st.booleans()),
    st.tuples(st.just("cont"), st.binary(max_size=50), st.booleans()),
    st.tuples(st.just("ping"), st.binary(max_size=130)),
    st.tuples(st.just("pong"), st.binary(max_size=20)),
    st.tuples(st.just("close"), CODES, st.sampled_from(["", "done", "x" * 124])),
    st.tuples(st.just("fail"), CODES, st.sampled_from(["", "é" * 80])),
    st.tuples(st.just("drain")),
    st.tuples(st.just("drain-list")),
    st.tuples(st.just("eof")),
)


def encode(op, client_peer):
    """Wire bytes of one peer action; ``client_peer``: the peer is a client
    (so it should mask)."""
    kind = op[0]
    if kind == "frame":
        _, opcode, payload, fin, right = op
        masked = client_peer == right
        n = len(payload)
        ext = b"" if n < 126 else struct.pack(">H", n)
        head = bytes(((0x80 if fin else 0) | opcode, (0x80 if masked else 0) | (n if n < 126 else 126))) + ext
        return head + (KEY + P.mask(payload, KEY) if masked else payload)
    if kind == "message":
        # A valid message in fragments, control frames between them.
        _, opcode, parts, controls = op
        k = KEY if client_peer else None
        out = b""
        for i, part in enumerate(parts):
            out += P.encode_frame(opcode if i == 0 else 0, part, i == len(parts) - 1, k)
            if i < len(parts) - 1 and controls[i] is not None:
                out += P.encode_frame(controls[i][0], controls[i][1], True, k)
        return out
    if kind == "close":
        _, code, reason, right = op
        payload = struct.pack(">H", code) + reason.encode("utf-8", "surrogatepass")
        return P.encode_frame(P.OP_CLOSE, payload[:125], True, KEY if client_peer == right else None)
    if kind == "cut-text":
        _, ch, at = op
        b = ch.encode()
        at = min(at, len(b) - 1) or 1
        k = KEY if client_peer else None
        return P.encode_frame(P.OP_TEXT, b[:at], False, k) + P.encode_frame(P.OP_CONTINUATION, b[at:], True, k)
    if kind == "huge":
        n = op[1]
        ext = struct.pack(">H", n) if n < 65536 else struct.pack(">Q", n)
        first = 126 if n < 65536 else 127
        return bytes((0x82, (0x80 if client_peer else 0) | first)) + ext + (KEY if client_peer else b"")
    return op[1]


def keys():
    """Deterministic masking keys, the same sequence for each build."""
    state = [0]

    def random(n):
        state[0] += 1
        return struct.pack(">I", (state[0] * 2654435761) & 0xFFFFFFFF)[:n]

    return random


def mod_of(build):
    return importlib.import_module("relayd.core._wsframe_c" if build == "compiled" else "relayd.core._wsframe_py")


def snapshot(c):
    return ("state", c.state, c.close_code, c.close_reason, c.close_sent, c.failed, c.should_close_transport,
            c.error)


def run(build, client, cfg, assemble, steps):
    mod = mod_of(build)
    c = mod.Connection(client, cfg, assemble, keys())
    out = []
    for chunk, cmds in steps:
        out.append(("events", c.receive_data(chunk)))
        for cmd in cmds:
            kind = cmd[0]
            try:
                if kind == "text":
                    res = c.send_text(cmd[1], cmd[2])
                elif kind == "binary":
                    res = c.send_binary(cmd[1], cmd[2])
                elif kind == "binary-list":
                    res = c.send_binary(list(cmd[1]), cmd[2])
                elif kind == "cont":
                    res = c.send_continuation(cmd[1], cmd[2])
                elif kind == "ping":
                    res = c.send_ping(cmd[1])
                elif kind == "pong":
                    res = c.send_pong(cmd[1])
                elif kind == "close":
                    res = c.send_close(cmd[1], cmd[2])
                elif kind == "fail":
                    res = c.fail(cmd[1], cmd[2])
                elif kind == "drain":
                    res = c.data_to_send()
                elif kind == "drain-list":
                    res = b"".join(bytes(b) for b in c.data_to_send_list())
                else:
                    res = c.receive_eof()
            except Exception as exc:  # local misuse raises the same way in both
                res = ("raise", type(exc).__name__, str(exc))
            out.append((kind, res))
        out.append(snapshot(c))
    out.append(("out", c.data_to_send()))
    return out


@st.composite
def scenario(draw):
    client = draw(st.booleans())
    frames = draw(st.lists(peer_frame, min_size=1, max_size=14))
    raw = b"".join(encode(f, not client) for f in frames)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(raw)), max_size=8))))
    pieces = split_at(raw, cuts)
    steps = [(p, draw(st.lists(local_cmd, max_size=3))) for p in pieces]
    cfg = draw(st.sampled_from([None, WsConfig(max_message=300, max_frame=200, max_buffered=300)]))
    return client, cfg, draw(st.booleans()), steps


@pytest.mark.skipif("compiled" not in BUILDS, reason="RELAYD_NO_EXTENSIONS=1: only the pure twin is built")
@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario())
def test_compiled_and_pure_agree(sc):
    client, cfg, assemble, steps = sc
    assert run("compiled", client, cfg, assemble, steps) == run("pure", client, cfg, assemble, steps)


@pytest.mark.parametrize("build", BUILDS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(peer_frame, min_size=1, max_size=14), client=st.booleans(), cut_seed=st.randoms())
def test_split_invariance(build, frames, client, cut_seed):
    """A connection that assembles messages gives the same events and the
    same bytes to send however the peer's bytes are cut."""
    raw = b"".join(encode(f, not client) for f in frames)
    mod = mod_of(build)

    def feed(pieces):
        c = mod.Connection(client, None, True, keys())
        evs = []
        for p in pieces:
            evs.extend(c.receive_data(p))
        return evs, c.data_to_send(), snapshot(c)

    whole = feed([raw])
    cuts = sorted(cut_seed.sample(range(len(raw) + 1), min(len(raw) + 1, 6)))
    pieces = split_at(raw, cuts)
    assert feed(pieces) == whole


@pytest.mark.parametrize("build", BUILDS)
@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=400))
def test_garbage_never_raises(build, junk):
    from relayd.core.ws_events import EVENT_TYPES, WsProtocolError

    mod = mod_of(build)
    for client in (True, False):
        c = mod.Connection(client, None, False, keys())
        evs = c.receive_data(junk)
        assert all(type(e) in EVENT_TYPES for e in evs)
        if c.failed:
            assert type(evs[-1]) is WsProtocolError and c.state == P.CLOSED and c.should_close_transport
            # The close frame is queued (after pongs for pings before the error).
            assert c.close_sent == evs[-1].close_code and b"\x88" in c.data_to_send()
