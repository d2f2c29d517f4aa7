"""Fuzz the yamux session (relayd/core/_yamux_py.py), compiled against pure.

The wire bytes are what the peer sends; the steps cut them into reads and run
a local command after each read (accept, consume, send, reset, open, ping,
flush ...), so the session's state moves between frames as on a real link.

Oracles:

* nothing escapes ``receive_data``; a peer's violation is a
  ``ProtocolErrorEvent`` and the last event of its read, never an
  ``InternalError`` (relayd's own code raised); a failed session stays failed
  and says nothing more;
* both builds give identical events, command results and outbound bytes;
* every outbound buffer is whole, valid frames, data frames no longer than
  ``max_send_frame``;
* limits hold: open streams <= ``max_streams``, and in the pure twin (whose
  state is visible) un-accepted streams, id gaps, remembered resets and a
  held header stay within their bounds;
* without commands, the fuzzer's reads and one read of the whole input give
  the same events (data coalesced) and the same outbound bytes.

Mode byte: bit 0 = this side dialed (client), bit 1 = tiny limits.

    python fuzz/fuzz_yamux.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import os
import struct
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import Finding, check, describe

with harness.instrumented(__name__ == "__main__"):
    from relayd.core import _yamux_py  # noqa: F401  (the instrumented twin)
    from relayd.core.config import MuxConfig

DEFAULT = MuxConfig()
TINY = MuxConfig(accept_backlog=2, max_streams=3, max_refused_streams=2, max_pending_pongs=2, reset_memory=1)
#: What a step's command (high nibble) does, by number; ``target`` is one of
#: the open streams, picked by the step's position.
COMMANDS = (None, "accept", "consume", "consume-half", "send", "send-big", "send-eof-bytearray", "send-view",
            "eof", "reset", "open", "ping", "flush", "flush-list", "go-away", "rtt")
SMALL = b"seventeen bytes!!"
BIG = bytes(range(256)) * 1200  # more than one initial window: sent in part, by reference


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    results = harness.each_build("yamux", drive, script)
    harness.agree(results)
    harness.each_build("yamux", split_invariance, script)


def drive(mod, script: harness.Script) -> list:
    client = bool(script.mode & 1)
    cfg = TINY if script.mode & 2 else DEFAULT
    s = mod.Session(client, cfg)
    names = {t.__name__ for t in mod.EVENT_TYPES}
    out = []
    run = _Run(s, client, cfg)
    for i, chunk, cmd in script.reads():
        failed = s.failed
        evs = s.receive_data(chunk)
        _check_events(s, evs, names, failed)
        out.append([describe(e) for e in evs])
        run.track(evs)
        if cmd:
            out.append(run.command(cmd, i))
        _check_limits(s, cfg)
        run.now += 0.01
    out.append(("end", s.failed, s.stream_count(), s.local_go_away, s.remote_go_away, sorted(s.stream_ids())))
    out.append(("out", run.flush(s.data_to_send())))
    return out


class _Run:
    """The application's side of one session: what it received and has not
    consumed yet, which streams wait to be accepted, the clock."""

    def __init__(self, s, client: bool, cfg) -> None:
        self.s = s
        self.client = client
        self.cfg = cfg
        self.received: dict = {}
        self.opened: list = []
        self.now = 0.0

    def track(self, evs) -> None:
        for e in evs:
            name = type(e).__name__
            if name == "DataReceived":
                self.received[e.stream_id] = self.received.get(e.stream_id, 0) + len(e.data)
            elif name == "StreamOpened":
                self.opened.append(e.stream_id)
            elif name == "StreamReset":
                self.received.pop(e.stream_id, None)

    def flush(self, buf) -> bytes:
        buf = bytes(buf)
        _check_frames(buf, self.cfg)
        return buf

    def command(self, cmd: int, i: int):
        s = self.s
        sids = sorted(s.stream_ids())
        target = sids[i % len(sids)] if sids else (1 if self.client else 2)
        name = COMMANDS[cmd]
        try:
            if name == "accept":
                res = s.accept_stream(self.opened.pop(0)) if self.opened else None
            elif name == "consume":
                for sid, n in sorted(self.received.items()):
                    s.consume(sid, n, self.now)
                self.received.clear()
                res = None
            elif name == "consume-half":
                n = self.received.get(target, 0) // 2
                self.received[target] = self.received.get(target, 0) - n
                res = s.consume(target, n, self.now)
            elif name == "send":
                res = s.send_data(target, SMALL)
            elif name == "send-big":
                res = s.send_data(target, BIG)
            elif name == "send-eof-bytearray":
                res = s.send_data(target, bytearray(BIG[:20000]), True)
            elif name == "send-view":
                res = s.send_data(target, memoryview(BIG)[:40000])
            elif name == "eof":
                res = s.send_eof(target)
            elif name == "reset":
                res = s.reset_stream(target)
            elif name == "open":
                res = s.open_stream(self.now)
            elif name == "ping":
                res = s.ping()
            elif name == "flush":
                res = self.flush(s.data_to_send())
            elif name == "flush-list":
                res = self.flush(b"".join(bytes(b) for b in s.data_to_send_list()))
            elif name == "go-away":
                res = s.go_away(0)
            else:
                res = s.set_rtt(0.001)
        except Finding:
            raise
        except Exception as exc:  # a local command used wrongly raises, the same way in both builds
            res = ("raise", type(exc).__name__, str(exc))
        return ("cmd", name, res)


def _check_events(s, evs, names, failed_before: bool) -> None:
    err = harness.check_events(evs, names, "ProtocolErrorEvent", failed_before, s.failed)
    if err is not None:
        check(type(err.error).__name__ != "InternalError", f"the session's own code raised: {err.error}")


def _check_limits(s, cfg) -> None:
    if s.stream_count() > cfg.max_streams:
        raise Finding(f"{s.stream_count()} streams open, limit {cfg.max_streams}")
    # The pure twin's state is visible (the compiled one's is C fields).
    if type(s).__module__.endswith("_py") and (
            s._unaccepted > cfg.accept_backlog or len(s._peer_gaps) > cfg.max_streams
            or len(s._recently_reset) > cfg.reset_memory or len(s._hdr) > 11):
        raise Finding(f"state beyond its bounds: {s._unaccepted} streams to accept, {len(s._peer_gaps)} id gaps, "
                      f"{len(s._recently_reset)} resets remembered, {len(s._hdr)} header bytes held")


_HEADER = struct.Struct(">BBHII")


def _check_frames(buf: bytes, cfg) -> None:
    """``buf`` is whole, valid yamux frames."""
    pos = 0
    end = len(buf)
    while pos < end:
        check(end - pos >= 12, f"outbound bytes end inside a frame header ({end - pos} bytes)")
        version, typ, flags, _sid, length = _HEADER.unpack_from(buf, pos)
        check(version == 0 and typ <= 3 and not flags & ~15,
              f"outbound frame header {buf[pos:pos + 12].hex()} is not valid yamux")
        pos += 12
        if typ == 0:
            check(length <= cfg.max_send_frame, f"outbound data frame of {length} bytes")
            check(end - pos >= length, "outbound bytes end inside a data frame")
            pos += length


def split_invariance(mod, script: harness.Script) -> None:
    """The same bytes in other reads: the same events and outbound bytes."""
    client = bool(script.mode & 1)
    cfg = TINY if script.mode & 2 else DEFAULT
    cut = _feed(mod, client, cfg, [chunk for _, chunk, _ in script.reads()])
    whole = _feed(mod, client, cfg, [script.wire])
    if cut != whole:
        harness.agree([("reads as cut", cut), ("one read", whole)])


def _feed(mod, client: bool, cfg, pieces) -> list:
    s = mod.Session(client, cfg)
    merged = []
    for p in pieces:
        for e in s.receive_data(p):
            d = describe(e)
            last = merged[-1] if merged else None
            if d[0] == "DataReceived" and last is not None and last[0] == "DataReceived" and last[1] == d[1]:
                merged[-1] = (d[0], d[1], last[2] + d[2])
            else:
                merged.append(d)
    merged.append(("out", bytes(s.data_to_send())))
    return merged


if __name__ == "__main__":
    harness.main(test_one_input)
