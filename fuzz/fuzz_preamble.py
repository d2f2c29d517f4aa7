"""Fuzz the link preamble: length-prefixed msgpack messages
(relayd/core/framing.py) and the two protocols that read them on the agent
port (relayd/net/preamble.py). Pure Python only: there is no compiled twin.

The wire bytes are what the other end sends, cut into reads by the steps.
Mode byte, bits 0-1:

0. ``MessageReader`` with its default limit, reading messages back to back
   (a fresh reader for what follows each message, as the next protocol
   would);
1. the same with a 64-byte limit;
2. ``ServerPreamble`` (the relay): the request goes to a handler that
   types it with ``wire.decode_request``, answers and closes;
3. ``ClientPreamble`` (the agent): the reply, read by ``wire.check_reply``;
   an ``ok`` reply of this link version hands the transport, and the bytes
   after the reply, to the next protocol.

Oracles: nothing but ``FramingError`` escapes ``feed``, ``data_received``
raises nothing, relayd logs no error of its own; a message comes exactly when its 4-byte length and body are
in, is a map of at most ``limit`` bytes whose decoded objects number no more
than its bytes, and the bytes after it are exactly the rest of the input so
far; a length above the limit is refused as soon as the length is in; the
server's handler runs at most once, and the client's next protocol gets
exactly the bytes after the reply; the typed decoders raise only
``WireError`` and ``Refusal``.

    python fuzz/fuzz_preamble.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import asyncio
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import FakeTransport, Finding, check

with harness.instrumented(__name__ == "__main__"):
    from relayd.core import wire
    from relayd.core.framing import MAX_MESSAGE, FramingError, MessageReader
    from relayd.net.preamble import ClientPreamble, ServerPreamble

REPLY = wire.ok_reply()


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    kind = script.mode & 3
    reads = [chunk for _, chunk, _ in script.reads()]
    harness.watch_errors()
    try:
        if kind < 2:
            read_messages(reads, MAX_MESSAGE if kind == 0 else 64)
        else:
            harness.run_in_loop((server if kind == 2 else client)(reads))
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"{type(exc).__name__} escaped: {exc}") from exc
    harness.check_no_error_logged()


def read_messages(reads, limit: int) -> None:
    reader = MessageReader(limit)
    fed = b""  # what the current reader was given
    for chunk in reads:
        while True:
            fed += chunk
            try:
                msg, rest = reader.feed(chunk)
            except FramingError:
                _check_refusal(fed, limit)
                return
            if msg is None:
                check(len(fed) < 4 or len(fed) < 4 + _length(fed), "a whole message was not returned")
                check(rest == b"", "bytes returned without a message")
                break
            _check_message(fed, msg, rest, limit)
            # What follows goes to a fresh reader, as to the next protocol.
            reader, fed, chunk = MessageReader(limit), b"", rest
            if not chunk:
                break


def _length(buf: bytes) -> int:
    return int.from_bytes(buf[:4], "big")


def _check_refusal(fed: bytes, limit: int) -> None:
    """A FramingError: the length was too large, or the whole body is in
    and is not a msgpack map."""
    check(len(fed) >= 4, "refused before the length was in")
    n = _length(fed)
    check(n > limit or len(fed) >= 4 + n, f"refused a message of {n} bytes before its body was in")


def _check_message(fed: bytes, msg, rest: bytes, limit: int) -> None:
    n = _length(fed)
    check(n <= limit, f"a message of {n} bytes passed the {limit}-byte limit")
    check(len(fed) >= 4 + n and rest == fed[4 + n:], "the bytes after a message are not the rest of the input")
    check(isinstance(msg, dict), f"a message that is a {type(msg).__name__}")
    check(_objects(msg, n + 1) <= n, f"a {n}-byte message decoded to more objects than bytes")


def _objects(obj, budget: int) -> int:
    """How many objects ``obj`` holds (counting stops past ``budget``)."""
    count = 0
    todo = [obj]
    while todo and count <= budget:
        o = todo.pop()
        count += 1
        if isinstance(o, dict):
            todo.extend(o.keys())
            todo.extend(o.values())
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
    return count


async def server(reads) -> None:
    requests = []

    async def handler(msg, transport):
        requests.append(msg)
        try:
            wire.decode_request(msg)
        except wire.WireError as exc:
            return wire.refusal_reply(exc.code if isinstance(exc, wire.VersionMismatch) else wire.BAD_REQUEST,
                                      str(exc)), None
        return REPLY, None

    log: list = []
    t = FakeTransport(log)
    pre = ServerPreamble(handler)
    pre.connection_made(t)
    for chunk in reads:
        if t.closing or not t.reading:
            break  # a transport delivers nothing more
        pre.data_received(chunk)
        await asyncio.sleep(0)  # the handler's task runs
        await asyncio.sleep(0)
    pre.connection_lost(None)
    check(len(requests) <= 1, f"the handler ran {len(requests)} times")
    check(all(isinstance(m, dict) for m in requests), "the handler got something other than a map")
    replies = [e for e in log if e[0] == "client <-"]
    check(len(replies) == len(requests), "a reply without a request, or a request without a reply")


class _Next(asyncio.Protocol):
    """The protocol that takes the agent's link over after an ok reply."""

    def __init__(self) -> None:
        self.got = b""

    def data_received(self, data: bytes) -> None:
        self.got += data


async def client(reads) -> None:
    nxt = _Next()
    t = FakeTransport([])
    pre = ClientPreamble(wire.TunnelRequest(("web",)), lambda reply: nxt)
    pre.connection_made(t)
    fed = b""
    done_at = None
    for chunk in reads:
        if t.closing:
            break
        if done_at is None:
            fed += chunk
        pre.data_received(chunk)
        if done_at is None and pre.reply.done():
            done_at = len(fed)
    pre.connection_lost(None)
    exc = pre.reply.exception()
    if exc is not None:
        check(isinstance(exc, (FramingError, ConnectionError)), f"the reply failed with {type(exc).__name__}")
        check(pre.protocol is None, "a failed reply handed the link over")
        return
    reply = pre.reply.result()
    n = _length(fed)
    _check_message(fed[:done_at], reply, fed[4 + n:done_at], MAX_MESSAGE)
    try:
        ok = wire.check_reply(reply) is reply
    except (wire.Refusal, wire.VersionMismatch):
        ok = False
    if ok:
        check(pre.protocol is nxt, "an ok reply did not hand the link over")
        check(nxt.got == fed[4 + n:done_at], "the next protocol did not get exactly the bytes after the reply")
    else:
        check(pre.protocol is None and nxt.got == b"", "a refusal handed the link over")


if __name__ == "__main__":
    harness.main(test_one_input)
