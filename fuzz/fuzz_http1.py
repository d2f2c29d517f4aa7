"""Fuzz the one HTTP/1 head parser (relayd/core/http1.py). Pure Python
only: there is no compiled twin.

The wire bytes are what a client (mode bit 0 clear) or a server (set) sends,
cut into reads by the steps; for requests they are gathered as the HTTPS
ingress does (``find_request_head`` after each read), then the whole head
is parsed; for responses the head ends where ``head_end`` says. Mode bit 1
selects small limits (1024-byte heads, 8 fields).

Oracles:

* nothing but ``HeadError`` escapes, and its status is 400 or 431;
* the outcome is the same whatever the reads: the input at once gives the
  same head, or is refused too (the status may differ between 400 and 431:
  a first line longer than ``max_head`` is too large while it has no end,
  and a bad request line once it has one);
* a parsed head is within the limits, its fields are tokens with values
  without control characters (HTAB aside), and written out again (request line, fields, empty
  line) it parses to the same head;
* for responses, the parser and ``RESPONSE_HEAD`` (the ingress's C-speed
  syntax check) agree on every head the limits admit.

    python fuzz/fuzz_http1.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import os
import re
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import Finding, check

with harness.instrumented(__name__ == "__main__"):
    from relayd.core import http1

SMALL = http1.HttpLimits(max_head=1024, max_headers=8)
# Written out again, a head may grow (one space after each colon): read it
# back without the size limit it passed.
ROOMY = http1.HttpLimits(max_head=1024 * 1024, max_headers=1000)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    limits = SMALL if script.mode & 2 else http1.LIMITS
    reads = [chunk for _, chunk, _ in script.reads()]
    try:
        if script.mode & 1:
            response(b"".join(reads), limits)
        else:
            request(reads, limits)
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"{type(exc).__name__} escaped: {exc}") from exc


def _gather(reads, limits):
    """Read by read as the ingress does: (head bytes, None) once whole, or
    (None, status) refused, or (None, None) not whole at the end."""
    buf = b""
    for chunk in reads:
        buf += chunk
        try:
            end = http1.find_request_head(buf, limits.max_head)
        except http1.HeadError as exc:
            check(exc.status in (400, 431), f"HeadError with status {exc.status}")
            return None, exc.status
        if end >= 0:
            return buf[:end], None
    return None, None


def _outcome(reads, limits):
    head, refused = _gather(reads, limits)
    if head is None:
        return refused, None
    try:
        return None, http1.parse_request_head(head, limits)
    except http1.HeadError as exc:
        check(exc.status in (400, 431), f"HeadError with status {exc.status}")
        return exc.status, None


def request(reads, limits) -> None:
    status, head = _outcome(reads, limits)
    whole_status, whole = _outcome([b"".join(reads)], limits)
    if status is not None or head is not None:  # decided before the input ran out
        check((status is None) == (whole_status is None) and (head is None) == (whole is None)
              and (head is None or (head.method, head.target, head.headers)
                   == (whole.method, whole.target, whole.headers)),
              "the outcome depends on how the reads were cut")
    if head is None:
        return
    _check_fields(head, limits)
    check(_TOKEN.match(head.method) is not None, "a method that is not a token")
    again = http1.parse_request_head(b"%s %s HTTP/%s\r\n" % (head.method, head.target, head.version)
                                     + _fields(head), ROOMY)
    check((again.method, again.target, again.version, again.headers)
          == (head.method, head.target, head.version, head.headers), "written out again, the head parses otherwise")


def response(wire: bytes, limits) -> None:
    end = http1.head_end(wire)
    if end < 0:
        return
    raw = wire[:end]
    try:
        head = http1.parse_response_head(raw, limits)
    except http1.HeadError as exc:
        check(exc.status in (400, 431), f"HeadError with status {exc.status}")
        if exc.status == 400:
            check(http1.RESPONSE_HEAD.match(raw) is None, "the ingress's check admits a head the parser refuses")
        return
    check(http1.RESPONSE_HEAD.match(raw) is not None, "the ingress's check refuses a head the parser admits")
    _check_fields(head, limits)
    check(100 <= head.status <= 999, f"status {head.status}")
    again = http1.parse_response_head(b"HTTP/%s %d %s\r\n" % (head.version, head.status, head.reason)
                                      + _fields(head), ROOMY)
    check((again.status, again.reason, again.headers) == (head.status, head.reason, head.headers),
          "written out again, the head parses otherwise")


def _fields(head) -> bytes:
    return b"".join(n + b": " + v + b"\r\n" for n, v in head.headers) + b"\r\n"


def _check_fields(head, limits) -> None:
    check(len(head.headers) <= limits.max_headers, "more fields than the limit")
    for name, value in head.headers:
        check(_TOKEN.match(name) is not None, "a field name that is not a token")
        check(not any(c < 32 and c != 9 or c == 127 for c in value), "a control character in a field value")
        check(value == value.strip(b" \t"), "a value with whitespace around it")


if __name__ == "__main__":
    harness.main(test_one_input)
