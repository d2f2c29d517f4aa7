"""Fuzz the TUN-mode packet path: the packet stream's framing
(relayd.core.framing.PacketSplitter) and the flow filter's packet reader
and reply check (relayd/core/_flowfilter_py.py ``parse_packet``,
``ConnTrack.answers``), compiled against pure.

The wire bytes are a packet stream as a client (or an agent) sends it,
cut into reads by the steps. Each whole packet is parsed, checked against
a small fixed rule set through connection tracking (as the gateway does
for the client's packets) and asked whether it answers an admitted flow
(as for the site's).

Oracles:

* only ``FramingError`` escapes the splitter, and only for a zero length;
  the packets it yields are the input's frames, whatever the reads;
* nothing escapes ``parse_packet``, ``check`` or ``answers``; a parsed flow
  is a 6-tuple of ints in range (protocol < 256, bits 32 or 128, addresses
  below 2**bits, ports and types below 65536) and parsing is a pure function;
* both builds give identical transcripts.

    python fuzz/fuzz_ippacket.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import check

with harness.instrumented(__name__ == "__main__"):
    from relayd.core import _flowfilter_py  # noqa: F401  (the instrumented twin)
    from relayd.core.framing import FramingError, PacketSplitter

#: 100.96.0.2 (a client) may reach 10.78.0.0/24 over TCP 1-1024, UDP 53 and ICMP echo.
CLIENT, SITE = (100 << 24) | (96 << 16) | 2, (10 << 24) | (78 << 16)


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    splitter = PacketSplitter()
    packets = []
    try:
        for _, chunk, _ in script.reads():
            packets += splitter.feed(chunk)
    except FramingError:
        check(_has_zero_frame(script.wire), "FramingError without a zero-length frame")
    except harness.Finding:
        raise
    except Exception as exc:
        raise harness.Finding(f"{type(exc).__name__} escaped PacketSplitter.feed: {exc}") from exc
    check(packets == _frames(script.wire)[: len(packets)], "the splitter's packets are not the input's frames")
    harness.agree(harness.each_build("flowfilter", drive, packets))


def _frames(wire: bytes) -> list:
    out, i = [], 0
    while len(wire) - i >= 2:
        n = int.from_bytes(wire[i:i + 2], "big")
        if n == 0 or len(wire) - i - 2 < n:
            break
        out.append(wire[i + 2:i + 2 + n])
        i += 2 + n
    return out


def _has_zero_frame(wire: bytes) -> bool:
    i = 0
    while len(wire) - i >= 2:
        n = int.from_bytes(wire[i:i + 2], "big")
        if n == 0:
            return True
        i += 2 + n
    return False


def drive(mod, packets: list) -> list:
    rules = mod.RuleSet([mod.Rule(6, 32, SITE, 24, 1, 1024, 1, "e#0"), mod.Rule(17, 32, SITE, 24, 53, 53, 1, "e#1"),
                         mod.Rule(1, 32, SITE, 24, 8, 8, 1, "e#2"), mod.Rule(6, 32, SITE | 9, 32, 22, 22, 2, "e#3")], 1)
    ct = mod.ConnTrack(64)
    out = []
    for pkt in packets:
        flow = mod.parse_packet(pkt)
        check(flow == mod.parse_packet(pkt), "parse_packet is not a function of its input")
        if flow is not None:
            proto, bits, src, sport, dst, dport = flow
            check(0 <= proto < 256 and bits in (32, 128) and 0 <= src < 1 << bits and 0 <= dst < 1 << bits
                  and 0 <= sport < 65536 and 0 <= dport < 65536, f"flow out of range: {flow}")
            if bits == 32 and src == CLIENT:
                out.append(("check", flow, ct.check(rules, *flow)))
        out.append(("answers", flow, ct.answers(rules, pkt)))
    return out


if __name__ == "__main__":
    harness.main(test_one_input)
