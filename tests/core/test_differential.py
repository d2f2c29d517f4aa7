"""Both builds, one truth: random frame sequences, split at random byte
boundaries and interleaved with random local commands, must give the compiled
build and the pure twin identical events, identical outbound bytes and
identical errors. Also: split invariance and garbage input on each build."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.core import _yamux_py as K
from relayd.core.config import MuxConfig
from tests.conftest import BUILDS, yamux_build
from tests.core.frames import data, describe, frame, goaway, ping, wnd
from tests.core.splits import split_at

SIDS = st.sampled_from([1, 3, 5, 7, 9, 11, 2, 4, 0, 13, 15])
FLAGS = st.sampled_from([0, 0, 0, K.FLAG_SYN, K.FLAG_ACK, K.FLAG_FIN, K.FLAG_RST, K.FLAG_SYN | K.FLAG_FIN, 0x10])

peer_frame = st.one_of(
    st.tuples(st.just("data"), SIDS, st.integers(0, 70000), FLAGS),
    st.tuples(st.just("wnd"), SIDS, st.sampled_from([0, 1, 1000, 262144, 0xFFFFFFFF]), FLAGS),
    st.tuples(st.just("ping"), st.integers(0, 0xFFFFFFFF), st.sampled_from([K.FLAG_SYN, K.FLAG_ACK, 0, 3])),
    st.tuples(st.just("goaway"), st.sampled_from([0, 1, 2, 5])),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=20)),
    st.tuples(st.just("raw"), st.integers(0, 5), st.integers(0, 0xFFFF), SIDS, st.integers(0, 100)),
)

local_cmd = st.one_of(
    st.tuples(st.just("open")),
    st.tuples(st.just("send"), st.integers(0, 300000), st.booleans()),
    st.tuples(st.just("eof")),
    st.tuples(st.just("reset")),
    st.tuples(st.just("accept")),
    st.tuples(st.just("consume"), st.floats(0.0, 0.5)),
    st.tuples(st.just("ping")),
    st.tuples(st.just("goaway"), st.sampled_from([0, 1, 2])),
    st.tuples(st.just("rtt"), st.floats(0.0, 0.2)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("flushlist")),
)


def encode(op):
    kind = op[0]
    if kind == "data":
        _, sid, n, flags = op
        return frame(K.TYPE_DATA, flags, sid, n, bytes((sid + i) & 0xFF for i in range(min(n, 64))) * (n // 64 + 1))[: 12 + n]
    if kind == "wnd":
        return wnd(op[1], op[2], op[3])
    if kind == "ping":
        return ping(op[1], op[2])
    if kind == "goaway":
        return goaway(op[1])
    if kind == "garbage":
        return op[1]
    _, typ, flags, sid, ln = op
    return frame(typ, flags, sid, ln)


def run(build, client, cfg, chunks_and_cmds):
    """Drive one session; return its full transcript."""
    mod = yamux_build(build)
    s = mod.Session(client, cfg)
    transcript = []
    received = {}  # stream -> bytes received not yet consumed
    now = 0.0
    for chunk, cmds in chunks_and_cmds:
        evs = s.receive_data(chunk)
        transcript.append([describe(e) for e in evs])
        for e in evs:
            if type(e).__name__ == "DataReceived":
                received[e.stream_id] = received.get(e.stream_id, 0) + len(e.data)
        for cmd in cmds:
            sids = sorted(s.stream_ids())
            target = sids[len(sids) // 2] if sids else 1
            try:
                kind = cmd[0]
                if kind == "open":
                    res = s.open_stream(now)
                elif kind == "send":
                    res = s.send_data(target, bytes(cmd[1]), cmd[2])
                elif kind == "eof":
                    res = s.send_eof(target)
                elif kind == "reset":
                    res = s.reset_stream(target)
                elif kind == "accept":
                    res = s.accept_stream(target)
                elif kind == "consume":
                    now += cmd[1]
                    for sid, n in sorted(received.items()):
                        s.consume(sid, n, now)
                    received.clear()
                    res = None
                elif kind == "ping":
                    res = s.ping()
                elif kind == "goaway":
                    res = s.go_away(cmd[1])
                elif kind == "rtt":
                    res = s.set_rtt(cmd[1])
                elif kind == "flushlist":
                    res = b"".join(bytes(b) for b in s.data_to_send_list())
                else:
                    res = bytes(s.data_to_send())
            except Exception as exc:  # local misuse raises the same way in both
                res = ("raise", type(exc).__name__, str(exc))
            transcript.append((cmd[0], res))
        transcript.append(("state", s.failed, s.stream_count(), s.local_go_away, s.remote_go_away))
    transcript.append(("out", bytes(s.data_to_send())))
    return transcript


@st.composite
def scenario(draw):
    frames = draw(st.lists(peer_frame, min_size=1, max_size=25))
    raw = b"".join(encode(f) for f in frames)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(raw)), max_size=8))))
    pieces = split_at(raw, cuts)
    steps = [(p, draw(st.lists(local_cmd, max_size=4))) for p in pieces]
    client = draw(st.booleans())
    cfg = draw(st.sampled_from([
        None,
        MuxConfig(accept_backlog=2, max_streams=3, max_refused_streams=2, max_pending_pongs=2, reset_memory=1),
        MuxConfig(max_window=1 << 20, recv_budget=300 * 1024, node_recv_budget=300 * 1024),
    ]))
    return client, cfg, steps


@pytest.mark.skipif("compiled" not in BUILDS, reason="RELAYD_NO_EXTENSIONS=1: only the pure twin is built")
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario())
def test_compiled_and_pure_agree(sc):
    client, cfg, steps = sc
    assert run("compiled", client, cfg, steps) == run("pure", client, cfg, steps)


@pytest.mark.parametrize("build", BUILDS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(peer_frame, min_size=1, max_size=20), cut_seed=st.randoms())
def test_split_invariance(build, frames, cut_seed):
    """However the bytes are split, the same events (data coalesced) come out."""
    raw = b"".join(encode(f) for f in frames)
    mod = yamux_build(build)

    def feed(pieces):
        s = mod.Session(False)
        evs = []
        for p in pieces:
            evs.extend(s.receive_data(p))
        merged = []
        for e in evs:
            d = describe(e)
            if d[0] == "DataReceived" and merged and merged[-1][0] == "DataReceived" and merged[-1][1] == d[1]:
                merged[-1] = ("DataReceived", d[1], merged[-1][2] + d[2])
            else:
                merged.append(d)
        return merged, bytes(s.data_to_send())

    whole = feed([raw])
    cuts = sorted(cut_seed.sample(range(len(raw) + 1), min(len(raw) + 1, 6)))
    pieces = split_at(raw, cuts)
    assert feed(pieces) == whole


@pytest.mark.parametrize("build", BUILDS)
@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=400))
def test_garbage_never_raises(build, junk):
    mod = yamux_build(build)
    for client in (True, False):
        s = mod.Session(client)
        evs = s.receive_data(junk)
        for e in evs:
            assert type(e).__name__ in {t.__name__ for t in mod.EVENT_TYPES}
        if s.failed:
            assert type(evs[-1]).__name__ == "ProtocolErrorEvent"
            assert bytes(s.data_to_send())[-12:-4] == bytes([0, 3, 0, 0, 0, 0, 0, 0])
