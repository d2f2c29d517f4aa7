"""Fuzz the HTTP ingress's response side (relayd/net/http_ingress.py over relayd/core/_h1proxy_py.py), compiled
against pure.

A canned request (chosen by the mode byte) opens a stream; the wire bytes
are then what the service sends back on it, cut into reads by the steps and
delivered through the stream's sink (``stream_data``). A step's command
closes or resets the stream from the service's side, grants send window,
pauses or resumes the client's transport, half-closes the client, lets the
gateway deadline pass, or has the client send another canned request
(keep-alive, pipelining, endpoint changes, upgrades).

Oracles: as fuzz_http_request.py (nothing escapes, no error logged by
relayd, identical client bytes, service bytes and calls in both builds,
window credit never above what was delivered).

Mode byte: bits 0-2 as ``harness.Ingress``; bits 3-5 pick the first request
from ``harness.REQUESTS``.

    python fuzz/fuzz_http_response.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import REQUESTS

with harness.instrumented(__name__ == "__main__"):
    from relayd.core import _h1proxy_py  # noqa: F401  (the instrumented twin)

COMMANDS = (None, ("service_eof",), ("service_reset",), ("grant",), ("pause_writing",), ("resume_writing",),
            ("client_eof",), ("expire",)) + tuple(("client", r) for r in REQUESTS)


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    opening = REQUESTS[(script.mode >> 3) & 7]
    harness.agree(harness.each_build("h1proxy", harness.drive_ingress, script, "service", COMMANDS, opening))


if __name__ == "__main__":
    harness.main(test_one_input)
