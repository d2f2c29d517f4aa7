"""Fuzz the WebSocket connection (``Connection`` in relayd/core/_wsframe_py.py),
compiled against pure.

The wire bytes are what the peer sends, cut into reads by the steps; a
step's command is a local call on the connection after its read (send a
message or a part of one made from the read's bytes, ping, pong, close,
fail, drain the output, end of input), or feeds the read as a bytearray or
memoryview.

Oracles:

* nothing escapes ``receive_data``/``receive_eof``; local commands raise
  only what a caller's misuse earns (WebSocketStateError,
  SessionClosedError, ValueError);
* both builds give identical events, raises, bytes to send and state;
* the event contract: known types only; a ``WsProtocolError`` comes last,
  exactly when the connection fails, with 1002, 1007, 1008 or 1009; a
  connection that saw the peer's close or failed makes no more events;
* what we send is a valid frame stream of our role, read back by a parser
  of the peer's role: masked exactly when we are the client, at most one
  close frame and no data after it, a close frame whenever the peer's close
  came or the connection failed; assembled messages are within
  ``max_message``;
* with no commands, the reads and one read of the whole input give the same
  events and bytes (when messages are assembled).

Mode byte: bit 0 = we are the server (the peer masks), bit 1 = small limits
(300-byte messages, 200-byte frames, 300 bytes of pongs), bit 2 = messages
assembled (else handed out as they arrive).

    python fuzz/fuzz_wsconn.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import os
import struct
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import check

with harness.instrumented(__name__ == "__main__"):
    from relayd.core import _wsframe_py  # noqa: F401  (the instrumented twin)
    from relayd.core import ws_events as E
    from relayd.core.wsconfig import WsConfig
    from relayd.errors import ProtocolError, SessionClosedError, WebSocketStateError

#: What a step's command does (numbers past the table wrap around).
COMMANDS = (None, "text", "binary", "binary-part", "continue", "continue-last", "ping", "pong", "close",
            "fail", "drain", "drain-list", "eof", "feed-bytearray", "feed-view")
SMALL = WsConfig(max_message=300, max_frame=200, max_buffered=300)
CODES = (1000, 1001, 1003, 1008, 1011, 3000, 4999, 1005, 999)
LOCAL_ERRORS = (WebSocketStateError, SessionClosedError, ValueError)


def _settings(script: harness.Script):
    server = bool(script.mode & 1)
    return server, SMALL if script.mode & 2 else WsConfig(), bool(script.mode & 4)


def _keys():
    n = [0]

    def random(k):
        n[0] += 1
        return struct.pack(">I", (n[0] * 2654435761) & 0xFFFFFFFF)[:k]

    return random


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    harness.agree(harness.each_build("wsframe", drive, script))


def drive(mod, script: harness.Script) -> list:
    server, cfg, assemble = _settings(script)
    c = mod.Connection(not server, cfg, assemble, _keys())
    out = []
    sent = b""
    events = []
    only_reads = True
    for _, chunk, cmd in script.reads():
        name = COMMANDS[cmd % len(COMMANDS)]
        quiet, failed = c.failed or c.close_code != 0, c.failed
        if name == "feed-bytearray":
            evs = c.receive_data(bytearray(chunk))
        elif name == "feed-view":
            evs = c.receive_data(memoryview(chunk))
        else:
            evs = c.receive_data(chunk)
        _check_events(c, evs, quiet, failed, cfg, assemble)
        events += evs
        out.append(evs)
        if name is not None and not name.startswith("feed"):
            only_reads = False
            res = _command(c, name, chunk)
            if name.startswith("drain"):
                sent += res
            out.append((name, res))
        out.append((c.state, c.close_code, c.close_reason, c.close_sent, c.failed, c.should_close_transport))
    sent += c.data_to_send()
    _check_output(c, sent, server)
    out.append(sent)
    if only_reads and assemble:
        whole = mod.Connection(not server, cfg, assemble, _keys())
        one = (whole.receive_data(script.wire), whole.data_to_send())
        if one != (events, sent):
            harness.agree([("reads as cut", (events, sent)), ("one read", one)])
    return out


def _command(c, name: str, chunk: bytes):
    code = CODES[chunk[0] % len(CODES)] if chunk else 1000
    try:
        if name == "text":
            c.send_text(chunk.decode("utf-8", "replace"))
        elif name == "binary":
            c.send_binary(chunk)
        elif name == "binary-part":
            c.send_binary([chunk[:3], chunk[3:]], fin=False)
        elif name in ("continue", "continue-last"):
            c.send_continuation(chunk.decode("utf-8", "replace").encode(), name == "continue-last")
        elif name == "ping":
            c.send_ping(chunk[:125])
        elif name == "pong":
            c.send_pong(chunk[:125])
        elif name == "close":
            c.send_close(code, chunk[1:40].decode("utf-8", "replace"))
        elif name == "fail":
            c.fail(code, chunk.decode("utf-8", "replace"))
        elif name == "drain":
            return c.data_to_send()
        elif name == "drain-list":
            return b"".join(bytes(b) for b in c.data_to_send_list())
        else:
            return c.receive_eof()
    except LOCAL_ERRORS as exc:
        return ("raise", type(exc).__name__, str(exc))
    return None


def _check_events(c, evs: list, quiet_before: bool, failed_before: bool, cfg, assemble: bool) -> None:
    if quiet_before:
        check(not evs, f"events after the close or a failure: {evs!r:.200}")
        return
    for k, e in enumerate(evs):
        t = type(e)
        check(t in E.EVENT_TYPES, f"unknown event {t.__name__}")
        if t is E.WsProtocolError:
            check(k == len(evs) - 1, "events after a WsProtocolError")
            check(c.failed and c.state == 3 and c.close_sent != 0, "a WsProtocolError without failing")
            check(e.close_code in (1002, 1007, 1008, 1009), f"close code {e.close_code}")
            check(isinstance(e.error, ProtocolError), f"error {type(e.error).__name__} outside relayd.errors")
        elif t is E.Close:
            check(k == len(evs) - 1, "events after the peer's close")
            check(c.state == 3 and c.close_sent != 0, "the peer's close was not answered")
        elif t is E.DataFrame:
            check(not assemble and e.opcode in (1, 2), f"a DataFrame with opcode {e.opcode} (assemble={assemble})")
        elif t in (E.TextMessage, E.BinaryMessage):
            check(assemble, "a whole message from a connection that does not assemble")
            size = len(e.data.encode() if t is E.TextMessage else e.data)
            check(size <= cfg.max_message, f"a message of {size} bytes passed the limit")
    error_event = any(type(e) is E.WsProtocolError for e in evs)
    check(error_event == (c.failed and not failed_before), "failing and a WsProtocolError do not go together")


def _check_output(c, sent: bytes, server: bool) -> None:
    # The peer's parser: if we are the server, the peer is a client and
    # expects unmasked frames (FrameParser(server=False)).
    from relayd.core import _wsframe_py as P

    evs = P.FrameParser(not server, 1 << 40).feed(sent)
    check(not any(type(e) is E.WsProtocolError for e in evs), f"we sent an invalid frame stream: {evs[-1:]!r:.200}")
    closes = [k for k, e in enumerate(evs) if type(e) is E.Close]
    check(len(closes) <= 1, "more than one close frame sent")
    if closes:
        check(not any(type(e) is E.DataFrame for e in evs[closes[0] + 1 :]), "data sent after our close frame")
        check(c.close_sent == evs[closes[0]].code, "close_sent does not say what we sent")
    if c.failed or (c.close_code not in (0, 1006)):
        check(bool(closes), "no close frame after a failure or the peer's close")


if __name__ == "__main__":
    harness.main(test_one_input)
