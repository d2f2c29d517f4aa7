"""The yamux session core, on both builds (fixture ``ymx``)."""

import struct

import pytest

from relayd import errors
from relayd.core import _yamux_py as K
from relayd.core.config import INITIAL_WINDOW, MuxConfig
from tests.core.frames import data, describe, frame, goaway, parse_frames, ping, syn, wnd

GOAWAY_PROTO = frame(K.TYPE_GO_AWAY, 0, 0, K.GO_AWAY_PROTOCOL_ERROR)


def pair(ymx, config=None):
    return ymx.Session(True, config), ymx.Session(False, config)


def pump(src, dst):
    return dst.receive_data(src.data_to_send())


def names(events):
    return [type(e).__name__ for e in events]


# --- codec -------------------------------------------------------------------------


def test_header_layout_matches_spec(ymx):
    raw = ymx.encode_header(K.TYPE_WINDOW_UPDATE, K.FLAG_SYN | K.FLAG_ACK, 0x01020304, 0x0A0B0C0D)
    assert raw == bytes([0, 1, 0, 3, 1, 2, 3, 4, 10, 11, 12, 13])
    h = ymx.decode_header(raw + b"tail")
    assert (h.version, h.type, h.flags, h.stream_id, h.length) == (0, 1, 3, 0x01020304, 0x0A0B0C0D)
    with pytest.raises(ValueError):
        ymx.decode_header(raw[:11])


def test_frames_on_the_wire(ymx):
    c, s = pair(ymx)
    sid = c.open_stream()
    assert sid == 1 and c.open_stream() == 3
    assert parse_frames(c.data_to_send()) == [
        (K.TYPE_WINDOW_UPDATE, K.FLAG_SYN, 1, 0, b""),
        (K.TYPE_WINDOW_UPDATE, K.FLAG_SYN, 3, 0, b""),
    ]
    assert s.open_stream() == 2 and s.open_stream() == 4


# --- streams -----------------------------------------------------------------------


def test_open_accept_exchange_half_close(ymx):
    c, s = pair(ymx)
    sid = c.open_stream()
    assert c.send_data(sid, b"hello") == 5
    evs = pump(c, s)
    assert [describe(e) for e in evs] == [("StreamOpened", 1), ("DataReceived", 1, b"hello")]
    assert s.stream_state(1) == "open"
    s.accept_stream(1)
    assert [describe(e) for e in pump(s, c)] == [("StreamAccepted", 1)]
    c.send_eof(sid)
    assert c.stream_state(sid) == "local-closed"
    assert [describe(e) for e in pump(c, s)] == [("StreamEnded", 1)]
    assert s.stream_state(1) == "remote-closed"
    # The half-closed side can still send.
    assert s.send_data(1, b"reply", end_stream=True) == 5
    assert [describe(e) for e in pump(s, c)] == [("DataReceived", 1, b"reply"), ("StreamEnded", 1)]
    assert c.stream_count() == 0 and s.stream_count() == 0
    assert c.stream_state(sid) == "closed"


def test_first_frame_carries_ack_when_not_accepted_explicitly(ymx):
    c, s = pair(ymx)
    sid = c.open_stream()
    pump(c, s)
    s.send_data(sid, b"x")
    frames = parse_frames(s.data_to_send())
    assert frames == [(K.TYPE_DATA, K.FLAG_ACK, sid, 1, b"x")]


def test_local_misuse_raises(ymx):
    c, s = pair(ymx)
    sid = c.open_stream()
    c.send_eof(sid)
    with pytest.raises(errors.StreamError):
        c.send_data(sid, b"late")
    with pytest.raises(errors.StreamError):
        c.send_eof(sid)
    with pytest.raises(errors.StreamError):
        c.send_data(99, b"x")
    with pytest.raises(errors.StreamError):
        c.accept_stream(sid)
    c.reset_stream(12345)  # unknown ids are ignored


def test_reset_both_ways(ymx):
    c, s = pair(ymx)
    sid = c.open_stream()
    c.send_data(sid, b"abc")
    pump(c, s)
    s.reset_stream(sid)
    out = s.data_to_send()
    assert parse_frames(out) == [(K.TYPE_WINDOW_UPDATE, K.FLAG_ACK | K.FLAG_RST, sid, 0, b"")]
    assert [describe(e) for e in c.receive_data(out)] == [("StreamAccepted", 1), ("StreamReset", 1)]
    assert c.stream_count() == 0 and s.stream_count() == 0
    # and from the opening side
    sid = c.open_stream()
    pump(c, s)
    c.reset_stream(sid)
    assert [describe(e) for e in pump(c, s)] == [("StreamReset", sid)]
    assert s.stream_count() == 0


def test_data_in_flight_after_local_reset_is_dropped_quietly(ymx):
    c, s = pair(ymx)
    sid = c.open_stream()
    pump(c, s)
    s.accept_stream(sid)
    pump(s, c)
    c.send_data(sid, b"in flight")
    in_flight = c.data_to_send()
    s.reset_stream(sid)
    evs = s.receive_data(in_flight + wnd(sid, 10) + data(sid, b"", K.FLAG_FIN))
    assert evs == [] and not s.failed


def test_peer_reset_then_data_is_an_error(ymx):
    c, s = pair(ymx)
    sid = c.open_stream()
    pump(c, s)
    evs = s.receive_data(wnd(sid, 0, K.FLAG_RST) + data(sid, b"zombie"))
    assert describe(evs[0]) == ("StreamReset", 1)
    assert isinstance(evs[-1].error, errors.StreamClosedError)


# --- flow control ------------------------------------------------------------------------------


def test_send_is_bounded_by_peer_window(ymx):
    c, s = pair(ymx)
    sid = c.open_stream()
    big = bytes(INITIAL_WINDOW + 1000)
    assert c.send_window(sid) == INITIAL_WINDOW
    assert c.send_data(sid, big) == INITIAL_WINDOW
    assert c.send_window(sid) == 0
    assert c.send_data(sid, b"more") == 0
    evs = pump(c, s)
    got = b"".join(e.data for e in evs if type(e).__name__ == "DataReceived")
    assert len(got) == INITIAL_WINDOW
    # Nothing consumed: no credit comes back.
    assert s.data_to_send() == bytearray()
    s.consume(sid, INITIAL_WINDOW // 2 - 1)
    assert s.data_to_send() == bytearray()
    s.consume(sid, 1)
    out = s.data_to_send()
    assert parse_frames(out) == [(K.TYPE_WINDOW_UPDATE, K.FLAG_ACK, sid, INITIAL_WINDOW // 2, b"")]
    evs = c.receive_data(out)
    assert [describe(e) for e in evs] == [("StreamAccepted", sid), ("WindowUpdated", sid, INITIAL_WINDOW // 2)]
    assert c.send_window(sid) == INITIAL_WINDOW // 2


def test_outbound_frames_are_cut_at_max_send_frame(ymx):
    cfg = MuxConfig(max_send_frame=4096)
    c = ymx.Session(True, cfg)
    sid = c.open_stream()
    c.data_to_send()
    assert c.send_data(sid, bytes(10000), end_stream=True) == 10000
    frames = parse_frames(c.data_to_send())
    assert [(f[0], f[1], f[3]) for f in frames] == [
        (K.TYPE_DATA, 0, 4096),
        (K.TYPE_DATA, 0, 4096),
        (K.TYPE_DATA, 0, 1808),
        (K.TYPE_WINDOW_UPDATE, K.FLAG_FIN, 0),  # FIN alone: see the Go tail-loss note
    ]


def test_partial_send_does_not_fin(ymx):
    c, s = pair(ymx)
    sid = c.open_stream()
    assert c.send_data(sid, bytes(INITIAL_WINDOW + 1), end_stream=True) == INITIAL_WINDOW
    assert c.stream_state(sid) == "open"


def test_data_beyond_window_is_flow_control_error(ymx):
    s = ymx.Session(False)
    evs = s.receive_data(syn(1) + data(1, bytes(INITIAL_WINDOW)) + data(1, b"x"))
    assert isinstance(evs[-1].error, errors.FlowControlError)
    assert s.data_to_send().endswith(GOAWAY_PROTO)


def test_window_grows_when_window_bound(ymx):
    cfg = MuxConfig(max_window=1024 * 1024)
    c, s = pair(ymx, cfg)
    sid = c.open_stream(now=0.0)
    pump(c, s)
    s.accept_stream(sid)
    s.set_rtt(0.1)
    c.receive_data(s.data_to_send())
    now = 0.0
    targets = []
    for _ in range(12):
        n = c.send_data(sid, bytes(c.send_window(sid)))
        pump(c, s)
        now += 0.01  # consumed far faster than 4 RTT: the window limits
        s.consume(sid, n, now)
        pump(s, c)
        targets.append(s.recv_window(sid))
    assert targets[-1] == 1024 * 1024
    assert targets == sorted(targets) and targets[0] == 2 * INITIAL_WINDOW


def test_window_does_not_grow_for_slow_consumer(ymx):
    c, s = pair(ymx)
    sid = c.open_stream(now=0.0)
    pump(c, s)
    s.set_rtt(0.01)
    now = 0.0
    for _ in range(6):
        n = c.send_data(sid, bytes(c.send_window(sid)))
        pump(c, s)
        now += 10.0  # one window per 10 s: the reader, not the window, limits
        s.consume(sid, n, now)
        pump(s, c)
        assert s.recv_window(sid) == INITIAL_WINDOW


def test_window_update_overflow(ymx):
    c = ymx.Session(True)
    sid = c.open_stream()
    evs = c.receive_data(wnd(sid, 0xFFFFFFFF, K.FLAG_ACK))
    assert isinstance(evs[-1].error, errors.FlowControlError)


def test_consume_more_than_received_raises(ymx):
    c, s = pair(ymx)
    sid = c.open_stream()
    c.send_data(sid, b"abc")
    pump(c, s)
    with pytest.raises(errors.StreamError):
        s.consume(sid, 4)


# --- session-level ----------------------------------------------------------------------------


def test_ping_pong(ymx):
    c, s = pair(ymx)
    op = c.ping()
    evs = pump(c, s)
    assert [describe(e) for e in evs] == [("PingReceived", op)]
    evs = pump(s, c)
    assert [describe(e) for e in evs] == [("PongReceived", op)]
    # A pong nobody asked for is ignored.
    assert c.receive_data(ping(777, K.FLAG_ACK)) == []


def test_go_away_local_and_remote(ymx):
    c, s = pair(ymx)
    s.go_away()
    assert s.local_go_away == 0
    evs = pump(s, c)
    assert [describe(e) for e in evs] == [("GoAwayReceived", 0)]
    assert c.remote_go_away == 0
    with pytest.raises(errors.SessionClosedError):
        c.open_stream()
    with pytest.raises(errors.SessionClosedError):
        s.open_stream()
    # A SYN reaching a side that sent GoAway is refused with RST.
    assert s.receive_data(syn(1)) == []
    assert parse_frames(s.data_to_send()) == [(K.TYPE_WINDOW_UPDATE, K.FLAG_RST, 1, 0, b"")]


def test_existing_streams_survive_go_away(ymx):
    c, s = pair(ymx)
    sid = c.open_stream()
    pump(c, s)
    s.go_away()
    pump(s, c)
    assert c.send_data(sid, b"still here") == 10
    assert describe(pump(c, s)[0]) == ("DataReceived", sid, b"still here")


def test_out_of_order_syns_are_accepted(ymx):
    """Go allocates ids in order but its SYNs may arrive out of order."""
    s = ymx.Session(False)
    evs = s.receive_data(syn(9) + syn(3) + syn(1) + syn(7) + syn(5))
    assert [describe(e) for e in evs] == [("StreamOpened", i) for i in (9, 3, 1, 7, 5)]
    c = ymx.Session(True)
    evs = c.receive_data(syn(4) + syn(2))
    assert [describe(e) for e in evs] == [("StreamOpened", 4), ("StreamOpened", 2)]


def test_accept_backlog_refuses_with_rst(ymx):
    s = ymx.Session(False, MuxConfig(accept_backlog=2, max_streams=10))
    evs = s.receive_data(syn(1) + syn(3) + syn(5) + data(5, b"dropped"))
    assert [describe(e) for e in evs] == [("StreamOpened", 1), ("StreamOpened", 3)]
    assert parse_frames(s.data_to_send()) == [(K.TYPE_WINDOW_UPDATE, K.FLAG_RST, 5, 0, b"")]
    s.accept_stream(1)
    evs = s.receive_data(syn(7))
    assert [describe(e) for e in evs] == [("StreamOpened", 7)]


def test_max_streams_refuses(ymx):
    s = ymx.Session(False, MuxConfig(max_streams=2, accept_backlog=2))
    s.receive_data(syn(1) + syn(3))
    s.data_to_send()
    assert s.receive_data(syn(5)) == []
    assert parse_frames(s.data_to_send())[0][1] == K.FLAG_RST


def test_remote_refusal_surfaces_as_reset(ymx):
    c = ymx.Session(True)
    sid = c.open_stream()
    evs = c.receive_data(wnd(sid, 0, K.FLAG_RST))
    assert [describe(e) for e in evs] == [("StreamReset", sid)]
    assert c.stream_count() == 0


def test_payload_streams_out_without_buffering(ymx):
    """A large frame is handed out piece by piece as its bytes arrive."""
    s = ymx.Session(False, MuxConfig(max_window=16 * 1024 * 1024))
    s.receive_data(syn(1))
    raw = data(1, bytes(range(256)) * 1000)
    chunks = [raw[i : i + 7777] for i in range(0, len(raw), 7777)]
    got = []
    for ch in chunks:
        evs = s.receive_data(ch)
        # Every chunk after the header yields its bytes at once.
        got.extend(e.data for e in evs)
        if ch is not chunks[0]:
            assert sum(len(e.data) for e in evs) == len(ch)
    assert b"".join(got) == bytes(range(256)) * 1000


def test_header_split_anywhere(ymx):
    s = ymx.Session(False)
    raw = syn(1) + data(1, b"abcdef", K.FLAG_FIN) + ping(5)
    evs = []
    for b in raw:
        evs.extend(s.receive_data(bytes([b])))
    joined = b"".join(e.data for e in evs if type(e).__name__ == "DataReceived")
    assert joined == b"abcdef"
    assert [n for n in names(evs) if n != "DataReceived"] == ["StreamOpened", "StreamEnded", "PingReceived"]


def test_accepts_bytearray_and_memoryview(ymx):
    s = ymx.Session(False)
    evs = s.receive_data(memoryview(bytearray(syn(1) + data(1, b"mv"))))
    assert [describe(e) for e in evs] == [("StreamOpened", 1), ("DataReceived", 1, b"mv")]


# --- bad input: one specific error each, a GoAway, nothing else ---------------------------------

BAD_INPUT = [
    ("wrong version", bytes([1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]), errors.BadVersion),
    ("unknown type", frame(9, 0, 1, 0), errors.UnknownFrameType),
    ("unknown flag bits", syn(1) + frame(K.TYPE_DATA, 0x10, 1, 0), errors.InvalidFlags),
    ("SYN with ACK", wnd(1, 0, K.FLAG_SYN | K.FLAG_ACK), errors.InvalidFlags),
    ("SYN with RST", wnd(1, 0, K.FLAG_SYN | K.FLAG_RST), errors.InvalidFlags),
    ("ping without flags", ping(1, 0), errors.InvalidFlags),
    ("ping SYN+ACK", ping(1, K.FLAG_SYN | K.FLAG_ACK), errors.InvalidFlags),
    ("ping on a stream", frame(K.TYPE_PING, K.FLAG_SYN, 3, 1), errors.StreamIdError),
    ("go away with flags", frame(K.TYPE_GO_AWAY, K.FLAG_FIN, 0, 0), errors.InvalidFlags),
    ("go away on a stream", frame(K.TYPE_GO_AWAY, 0, 1, 0), errors.StreamIdError),
    ("go away unknown code", goaway(7), errors.ProtocolError),
    ("data on stream 0", data(0, b"x"), errors.StreamIdError),
    ("window update on stream 0", wnd(0, 5), errors.StreamIdError),
    ("wrong parity SYN", syn(2), errors.StreamIdError),
    ("reused stream id", syn(1) + wnd(1, 0, K.FLAG_RST) + syn(1), errors.StreamIdError),
    ("reused gap id", syn(5) + syn(1) + wnd(1, 0, K.FLAG_RST) + syn(1), errors.StreamIdError),
    ("stream id jump", syn(1) + syn(1 + 2 * 10000), errors.StreamIdError),
    ("data for a skipped id", syn(5) + data(3, b"x"), errors.UnknownStreamError),
    ("duplicate SYN", syn(1) + syn(1), errors.StreamIdError),
    ("data without SYN", data(1, b"x"), errors.UnknownStreamError),
    ("update for a stream never opened", wnd(5, 1), errors.UnknownStreamError),
    ("update for our never-opened stream", wnd(8, 1), errors.UnknownStreamError),
    ("data after FIN", syn(1) + data(1, b"", K.FLAG_FIN) + data(1, b"x"), errors.StreamClosedError),
    ("FIN after FIN", syn(1) + wnd(1, 0, K.FLAG_FIN) + wnd(1, 0, K.FLAG_FIN), errors.StreamClosedError),
    ("data on closed stream", syn(1) + wnd(1, 0, K.FLAG_RST) + data(1, b"x"), errors.StreamClosedError),
    ("unexpected ACK", syn(1) + wnd(1, 0, K.FLAG_ACK), errors.InvalidFlags),
    ("data beyond window", syn(1) + data(1, bytes(INITIAL_WINDOW + 1)), errors.FlowControlError),
    ("length above limit", syn(1) + frame(K.TYPE_DATA, 0, 1, 17 * 1024 * 1024), errors.FrameTooLarge),
    ("window overflow", syn(1) + wnd(1, 0xFFFFFFFF), errors.FlowControlError),
    ("ping flood", b"".join(ping(i) for i in range(300)), errors.FloodError),
]


@pytest.mark.parametrize("case,raw,err", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input(ymx, case, raw, err):
    s = ymx.Session(False)
    evs = s.receive_data(raw)
    last = evs[-1]
    assert type(last).__name__ == "ProtocolErrorEvent", case
    assert type(last.error) is err, (case, last.error)
    assert isinstance(last.error, errors.ProtocolError)
    assert str(last.error)
    assert s.failed
    assert s.data_to_send().endswith(GOAWAY_PROTO)
    # After the error nothing more is parsed and commands refuse.
    assert s.receive_data(ping(1)) == []
    with pytest.raises(errors.SessionClosedError):
        s.ping()


def test_syn_flood(ymx):
    s = ymx.Session(False, MuxConfig(accept_backlog=4, max_streams=4, max_refused_streams=50))
    evs = s.receive_data(b"".join(syn(i) for i in range(1, 200, 2)))
    assert isinstance(evs[-1].error, errors.FloodError)
    assert sum(1 for e in evs if type(e).__name__ == "StreamOpened") == 4


def test_refusals_below_flood_limit_are_fine_when_flushed(ymx):
    s = ymx.Session(False, MuxConfig(accept_backlog=1, max_streams=1, max_refused_streams=10))
    sid = 1
    for _ in range(10):
        s.receive_data(b"".join(syn(sid + 2 * i) for i in range(8)))
        sid += 16
        s.data_to_send()
    assert not s.failed


def test_pings_below_flood_limit_are_answered(ymx):
    s = ymx.Session(False)
    for round_ in range(5):
        evs = s.receive_data(b"".join(ping(i) for i in range(200)))
        assert len(evs) == 200
        assert len(parse_frames(s.data_to_send())) == 200


def test_error_messages_carry_no_payload(ymx):
    secret = b"password=hunter2"
    s = ymx.Session(False)
    evs = s.receive_data(syn(1) + data(1, b"", K.FLAG_FIN) + data(1, secret))
    assert b"hunter2".decode() not in str(evs[-1].error)


def test_config_validation():
    with pytest.raises(errors.ConfigError, match="max_window"):
        MuxConfig(max_window=1000)
    with pytest.raises(errors.ConfigError, match="accept_backlog"):
        MuxConfig(accept_backlog=0)
    with pytest.raises(errors.ConfigError, match="ping_timeout"):
        MuxConfig(ping_timeout=-1)


def test_stream_ids_exhaust_cleanly(ymx):
    c = ymx.Session(True, MuxConfig(max_streams=4, accept_backlog=4))
    for _ in range(4):
        c.open_stream()
    with pytest.raises(errors.StreamError, match="limit"):
        c.open_stream()


def test_many_streams_then_all_freed(ymx):
    c, s = pair(ymx, MuxConfig(accept_backlog=1000))
    sids = [c.open_stream() for _ in range(500)]
    for sid in sids:
        c.send_data(sid, struct.pack(">I", sid), end_stream=True)
    evs = pump(c, s)
    assert sum(1 for e in evs if type(e).__name__ == "StreamEnded") == 500
    for sid in sids:
        s.send_eof(sid)
    evs = pump(s, c)
    assert c.stream_count() == 0 and s.stream_count() == 0
    assert sum(1 for e in evs if type(e).__name__ == "StreamAccepted") == 500


def test_memory_flat_across_stream_churn(ymx):
    """Every per-stream structure is freed on close: 2 x 20k open/data/close
    cycles, the second batch must not grow the heap."""
    import tracemalloc

    s = ymx.Session(False)
    sid = 1

    def batch(n):
        nonlocal sid
        for _ in range(n):
            s.receive_data(syn(sid) + data(sid, b"abc") + wnd(sid, 0, K.FLAG_FIN))
            s.consume(sid, 3)
            if sid % 4 == 1:
                s.reset_stream(sid)  # half of them reset locally
            else:
                s.send_eof(sid)
            s.data_to_send()
            sid += 2

    tracemalloc.start()
    try:
        batch(20000)  # fills the bounded memories (reset ids) to their cap
        before = tracemalloc.get_traced_memory()[0]
        batch(20000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert s.stream_count() == 0 and not s.failed
    assert grown < 64 * 1024, grown


def test_large_immutable_payload_is_referenced_not_copied(ymx):
    c = ymx.Session(True, MuxConfig(max_send_frame=65536))
    sid = c.open_stream()
    big = bytes(range(256)) * 256  # 64 KiB of bytes: queued by reference
    c.send_data(sid, big)
    bufs = c.data_to_send_list()
    assert any(b is big for b in bufs)
    assert b"".join(bytes(b) for b in bufs) == ymx.encode_header(K.TYPE_WINDOW_UPDATE, K.FLAG_SYN, sid, 0) + \
        ymx.encode_header(K.TYPE_DATA, 0, sid, len(big)) + big
    # Split over frames: views into the same bytes, still no copy.
    part = bytes(100_000)
    c.send_data(sid, part)
    views = [b for b in c.data_to_send_list() if isinstance(b, memoryview)]
    assert views and all(v.obj is part for v in views)


def test_mutable_payload_is_copied(ymx):
    c = ymx.Session(True)
    sid = c.open_stream()
    c.data_to_send()
    buf = bytearray(b"a" * 40000)
    c.send_data(sid, buf)
    buf[:] = b"b" * 40000  # the caller reuses its buffer before the flush
    out = b"".join(bytes(b) for b in c.data_to_send_list())
    assert out[12:] == b"a" * 40000
    assert c.data_to_send() == b""


def test_accept_of_a_stream_already_gone_is_a_no_op(ymx):
    """SYN, data and RST in one read: by the time the application takes the
    StreamOpened event the stream is gone; accepting it is a race with the
    peer, not a caller's mistake, and must not raise."""
    s = ymx.Session(False)
    evs = s.receive_data(syn(3) + data(3, b"x") + wnd(3, 0, K.FLAG_RST))
    assert [describe(e) for e in evs] == [("StreamOpened", 3), ("DataReceived", 3, b"x"), ("StreamReset", 3)]
    assert s.accept_stream(3) is False
    s.consume(3, 1)  # credit for a gone stream: ignored too
    assert s.data_to_send() == b""
    # A session that ended on a protocol error: same answer, no raise.
    s2 = ymx.Session(False)
    evs = s2.receive_data(syn(1) + syn(1))
    assert describe(evs[-1])[0] == "ProtocolErrorEvent"
    assert s2.accept_stream(1) is False
    # A stream that exists but was not waiting is still the caller's bug.
    s3 = ymx.Session(False)
    s3.receive_data(syn(1))
    assert s3.accept_stream(1) is True
    with pytest.raises(errors.StreamError):
        s3.accept_stream(1)
