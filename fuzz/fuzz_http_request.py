"""Fuzz the HTTP ingress's request side (relayd/net/http_ingress.py over relayd/core/_h1proxy_py.py), compiled
against pure.

The wire bytes are what a client sends on the relay's HTTPS port (after
TLS), cut into reads by the steps. A step's command plays the other ends:
the service answers with one of a few canned responses (so pipelined
requests move on), closes or resets its stream, grants send window; the
client's transport pauses or resumes, the client half-closes; the gateway
deadline passes.

Oracles:

* nothing escapes ``HttpConnection.feed`` or the other entry points, and
  relayd logs no error of its own (a callback that raised);
* both builds send the same bytes to the service (stream by stream), the
  same bytes to the client, and make the same calls (close, abort,
  pause/resume reading, streams opened, reset, half-closed);
* no stream gets more window credit back than it delivered.

Mode byte: bits 0-2 as ``harness.Ingress`` (stream opener, small window).

    python fuzz/fuzz_http_request.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import RESPONSES

with harness.instrumented(__name__ == "__main__"):
    from relayd.core import _h1proxy_py  # noqa: F401  (the instrumented twin)

COMMANDS = (None,) + tuple(("service", r) for r in RESPONSES) + (
    ("service_eof",), ("service_reset",), ("grant",), ("pause_writing",), ("resume_writing",),
    ("client_eof",), ("expire",))


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    harness.agree(harness.each_build("h1proxy", harness.drive_ingress, script, "client", COMMANDS))


if __name__ == "__main__":
    harness.main(test_one_input)
