"""Microbenchmarks of the yamux core, compiled build against the pure twin.

Parsing: data frames of 64 B, 16 KiB and 256 KiB, fed to ``receive_data`` in
1 MiB chunks (as a transport would deliver them) and dispatched the way
relayd.net does: every event is looked at, payload handed on, and each
stream's consumption reported back (``consume``), which emits the window
updates. Frames go round-robin over 8 streams so windows never run dry.

Building: ``send_data`` of the same sizes plus ``data_to_send``.

Run with bench/run_micro.sh; it writes bench/results/micro.json and the table
in bench/RESULTS.md. Not a test: nothing here asserts a speed.
"""

import importlib
import struct

import pytest

from relayd.core import _yamux_py as K
from relayd.core.config import MuxConfig

CHUNK = 1024 * 1024
STREAMS = 8
SIZES = {"64B": 64, "16KiB": 16 * 1024, "256KiB": 256 * 1024}
BUILDS = ["compiled", "pure"]


def load(build):
    return importlib.import_module("relayd.core._yamux_c" if build == "compiled" else "relayd.core._yamux_py")


def make_chunks(size):
    """1 MiB of data frames for streams 1,3,..; returns (chunks, frames per chunk)."""
    frames, raw, i = 0, bytearray(), 0
    payload = bytes(range(256)) * (size // 256) if size >= 256 else bytes(range(size))
    while len(raw) + 12 + size <= CHUNK or frames == 0:
        sid = 1 + 2 * (i % STREAMS)
        raw += struct.pack(">BBHII", 0, K.TYPE_DATA, 0, sid, size) + payload
        frames += 1
        i += 1
    return bytes(raw), frames


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("size", list(SIZES))
def test_parse_dispatch(benchmark, build, size):
    mod = load(build)
    DataReceived = mod.DataReceived
    s = mod.Session(False, MuxConfig(max_frame_payload=1 << 20))
    s.receive_data(b"".join(struct.pack(">BBHII", 0, K.TYPE_WINDOW_UPDATE, K.FLAG_SYN, 1 + 2 * i, 0) for i in range(STREAMS)))
    for i in range(STREAMS):
        s.accept_stream(1 + 2 * i)
    s.data_to_send()
    # 256 KiB frames: only 4 fit a 1 MiB chunk, each on its own stream and
    # within that stream's window.
    chunk, frames = make_chunks(SIZES[size])

    def run():
        got = {}
        for ev in s.receive_data(chunk):
            if type(ev) is DataReceived:
                sid = ev.stream_id
                got[sid] = got.get(sid, 0) + len(ev.data)
        for sid, n in got.items():
            s.consume(sid, n)
        s.data_to_send()

    benchmark.extra_info.update(build=build, size=size, frames_per_round=frames, bytes_per_round=len(chunk))
    benchmark(run)
    assert not s.failed


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("size", list(SIZES))
def test_parse(benchmark, build, size):
    """Bytes to events only: receive_data on 1 MiB chunks (plus one consume per
    stream per chunk, known in advance, so the windows never run dry)."""
    mod = load(build)
    s = mod.Session(False, MuxConfig(max_frame_payload=1 << 20))
    s.receive_data(b"".join(struct.pack(">BBHII", 0, K.TYPE_WINDOW_UPDATE, K.FLAG_SYN, 1 + 2 * i, 0) for i in range(STREAMS)))
    s.data_to_send()
    chunk, frames = make_chunks(SIZES[size])
    per_stream = {}
    for i in range(frames):
        sid = 1 + 2 * (i % STREAMS)
        per_stream[sid] = per_stream.get(sid, 0) + SIZES[size]
    per_stream = list(per_stream.items())
    receive, consume = s.receive_data, s.consume

    def run():
        events = receive(chunk)
        for sid, n in per_stream:
            consume(sid, n)
        s.data_to_send()
        return events

    benchmark.extra_info.update(build=build, size=size, frames_per_round=frames, bytes_per_round=len(chunk))
    events = benchmark(run)
    assert not s.failed and len(events) == frames


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("size", list(SIZES))
def test_build_frames(benchmark, build, size):
    mod = load(build)
    c = mod.Session(True)
    sids = [c.open_stream() for _ in range(STREAMS)]
    c.data_to_send()
    payload = bytes(SIZES[size])
    n_frames = max(1, CHUNK // (SIZES[size] + 12))
    # Give every stream a huge send window so only framing is measured.
    c.receive_data(b"".join(struct.pack(">BBHII", 0, K.TYPE_WINDOW_UPDATE, K.FLAG_ACK, sid, 0x7FFFFFFF) for sid in sids))
    send = c.send_data

    def run():
        for i in range(n_frames):
            send(sids[i & 7], payload)
        c.data_to_send()

    benchmark.extra_info.update(build=build, size=size, frames_per_round=n_frames, bytes_per_round=n_frames * (SIZES[size] + 12))
    benchmark.pedantic(run, rounds=20 if build == "pure" else 50, iterations=1, warmup_rounds=2)
