"""Fuzz the WebSocket frame codec (relayd/core/_wsframe_py.py), compiled
against pure.

The wire bytes are what the peer sends, cut into reads by the steps. A
step's command feeds its read as a bytearray or memoryview instead of bytes,
or also runs the encoder side on it (``mask`` at each key offset, and
``encode_frame``, whose output a parser of the other role must read back).

Oracles:

* nothing escapes ``FrameParser.feed``; a violation is a ``WsProtocolError``
  event, the last one, with close code 1002, 1007 or 1009 and an error from
  relayd's hierarchy; a failed parser says nothing more;
* both builds give identical events and encoder output;
* events are sane: data frames are text or binary, control payloads at most
  125 bytes, a finished text message is valid UTF-8, a message never exceeds
  ``max_message``; the pure twin holds at most a 14-byte header and a
  125-byte control payload;
* the fuzzer's reads and one read of the whole input give the same messages
  and control frames.

Mode byte: bit 0 = we are the server (the peer masks), bit 1 = a 1000-byte
message limit.

    python fuzz/fuzz_wsframe.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import check, describe

with harness.instrumented(__name__ == "__main__"):
    from relayd.core import _wsframe_py  # noqa: F401  (the instrumented twin)
    from relayd.errors import ProtocolError

#: What a step's command does (numbers past the table wrap around).
COMMANDS = (None, "feed-bytearray", "feed-view", "mask+0", "mask+1", "mask+2", "mask+3", "encode-text",
            "encode-binary")
KEY = b"\x37\xfa\x21\x3d"
SMALL_LIMIT = 1000
EVENTS = {"DataFrame", "Ping", "Pong", "Close", "WsProtocolError"}


def _settings(script: harness.Script) -> tuple[bool, int]:
    return bool(script.mode & 1), SMALL_LIMIT if script.mode & 2 else 16 * 1024 * 1024


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    harness.agree(harness.each_build("wsframe", drive, script))


def drive(mod, script: harness.Script) -> list:
    server, limit = _settings(script)
    p = mod.FrameParser(server, limit)
    out = []
    msg_size = 0
    text = None
    described = []  # every event, for the split check (no command changes the parser)
    for _, chunk, cmd in script.reads():
        failed = p.failed
        name = COMMANDS[cmd % len(COMMANDS)]
        if name == "feed-bytearray":
            evs = p.feed(bytearray(chunk))
        elif name == "feed-view":
            evs = p.feed(memoryview(chunk))
        else:
            evs = p.feed(chunk)
        _check_events(p, evs, failed)
        for e in evs:
            if type(e).__name__ == "DataFrame":
                msg_size += len(e.data)
                check(msg_size <= limit, f"a message of {msg_size} bytes passed the {limit}-byte limit")
                if e.opcode == 1:
                    text = (text or b"") + e.data
                if e.fin:
                    if text is not None:
                        try:
                            text.decode("utf-8")
                        except UnicodeDecodeError:
                            raise harness.Finding("a text message that is not UTF-8 was let through") from None
                    msg_size, text = 0, None
        d = [describe(e) for e in evs]
        described += d
        out.append(d)
        for attr, bound in (("_hdr", 14), ("_control", 125)):
            held = getattr(p, attr, None)  # the pure twin's state is visible
            if held is not None:
                check(len(held) <= bound, f"the parser holds {len(held)} bytes of {attr}, bound {bound}")
        if name is not None and name.startswith(("mask", "encode")):
            out.append(_encode(mod, chunk, name, server))
    # The same bytes in one read: the same messages and control frames.
    cut = _messages(described)
    whole = _messages(describe(e) for e in mod.FrameParser(server, limit).feed(script.wire))
    if cut != whole:
        harness.agree([("reads as cut", cut), ("one read", whole)])
    return out


def _check_events(p, evs, failed_before: bool) -> None:
    err = harness.check_events(evs, EVENTS, "WsProtocolError", failed_before, p.failed)
    if err is not None:
        check(err.close_code in (1002, 1007, 1009), f"close code {err.close_code}")
        check(isinstance(err.error, ProtocolError), f"error {type(err.error).__name__} outside relayd.errors")
    for e in evs:
        name = type(e).__name__
        if name == "DataFrame":
            check(e.opcode in (1, 2), f"a data frame event with opcode {e.opcode}")
        elif name in ("Ping", "Pong"):
            check(len(e.data) <= 125, "a control payload above 125 bytes")


def _encode(mod, chunk: bytes, name: str, server: bool):
    if name.startswith("mask"):
        return (name, mod.mask(chunk, KEY, int(name[-1])))
    # A frame as the peer of this parser's peer would send it: read it back.
    opcode = 1 if name == "encode-text" else 2
    payload = chunk.decode("utf-8", "replace").encode() if opcode == 1 else chunk
    frame = mod.encode_frame(opcode, payload, True, KEY if not server else None)
    back = mod.FrameParser(not server).feed(frame)
    data = b"".join(e.data for e in back if type(e).__name__ == "DataFrame")
    check(data == payload and bool(back) and back[-1].fin,
          f"encode_frame({opcode}, {len(payload)} bytes) does not read back: {back!r:.200}")
    return ("frame", frame)


def _messages(described) -> list:
    """Described events with each message's parts joined. A message cut
    short by an invalid-UTF-8 error is left out: how much of it came before
    the error depends on the reads."""
    out = []
    cur = None
    for d in described:
        if d[0] != "DataFrame":
            out.append(d)
            continue
        cur = (d[1], (cur[1] if cur else b"") + d[2])
        if d[3]:
            out.append(("message",) + cur)
            cur = None
    if cur is not None and not (out and out[-1][0] == "WsProtocolError" and out[-1][2] == 1007):
        out.append(("partial",) + cur)
    return out


if __name__ == "__main__":
    harness.main(test_one_input)
