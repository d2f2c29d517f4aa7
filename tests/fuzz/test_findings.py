"""Bugs the fuzz harnesses found, each as a minimal reproducer.

Each test states the correct behaviour. A new finding is added marked
``xfail(strict=True)`` until the bug is fixed: a fix makes it pass, strict
turns that into a failure, and whoever fixes the bug drops the marker, drops
the bug's entry from ``fuzz.harness.KNOWN`` if it has one, and adds the input
to the harness's corpus (docs/fuzzing.md). All found so far are fixed. The
first two were divergences of a compiled build (RELAYD_NO_EXTENSIONS=1 skips
them); the others were in the HTTP ingress's logic and hold for both builds.
"""

import struct

import httptools
import pytest

from fuzz import fuzz_http_request, fuzz_wsframe, harness
from relayd._build import extensions_disabled

needs_compiled = pytest.mark.skipif(extensions_disabled(), reason="RELAYD_NO_EXTENSIONS=1: no compiled build")

KEY = b"\x01\x02\x03\x04"


@needs_compiled
def test_ws_continuation_with_63_bit_length_is_too_big_in_both_builds():
    from relayd.core import _wsframe_c, _wsframe_py

    wire = (_wsframe_py.encode_frame(2, b"x", False, KEY)  # a first fragment of 1 byte
            + b"\x80\xff" + struct.pack(">Q", (1 << 63) - 1) + KEY)  # its continuation: 2**63 - 1 bytes
    for mod in (_wsframe_py, _wsframe_c):
        events = mod.FrameParser(server=True).feed(wire)
        assert [type(e).__name__ for e in events] == ["DataFrame", "WsProtocolError"], mod.__name__
        assert events[-1].close_code == 1009, mod.__name__
    fuzz_wsframe.test_one_input(harness.script_of(1, [(wire, 0)]))


@needs_compiled
def test_request_content_length_above_2_63_is_handled_alike_in_both_builds():
    wire = b"POST / HTTP/1.1\r\nHost: app.example\r\nContent-Length: 9223372036854775808\r\n\r\nabc"
    fuzz_http_request.test_one_input(harness.script_of(0, [(wire, 0)]))


# --- the HTTP ingress and the service connection behind it ----------------------------------

GET = b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n"
OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@pytest.fixture(params=[label for label, _ in harness.builds("h1proxy")])
def http(request):
    """The HTTP ingress module of each build in use."""
    return dict(harness.builds("h1proxy"))[request.param]


def ingress(mod, *actions):
    """An ingress of build ``mod`` driven by ``(Ingress method, *args)``
    actions (fuzz/harness.py; the client's bytes go straight to ``feed``,
    past the harness's tolerance of known bugs); its streams afterwards."""

    async def run():
        ing = harness.Ingress(mod, 0)
        for name, *args in actions:
            if name == "client":
                ing.conn.feed(*args)
            else:
                getattr(ing, name)(*args)
        ing.conn.lost()
        return ing.streams

    return harness.run_in_loop(run())


def service_reads(sent: bytes) -> list:
    """The requests a service parses from what it received (strict llhttp,
    as a service would); an AssertionError if it cannot."""

    class Heads:
        def __init__(self):
            self.seen = []

        def on_url(self, url):
            self.seen.append(url)

    heads = Heads()
    try:
        httptools.HttpRequestParser(heads).feed_data(bytes(sent))
    except httptools.HttpParserError as exc:
        raise AssertionError(f"the service cannot read what it got ({exc}): {bytes(sent)!r}") from None
    return heads.seen


def test_http10_keep_alive_request_is_not_followed_on_a_closing_service_connection(http):
    req = b"GET /%d HTTP/1.0\r\nHost: app.example\r\nConnection: keep-alive\r\n\r\n"
    streams = ingress(http, ("client", req % 1), ("service", OK5), ("client", req % 2))
    for st in streams:
        service_reads(st.sent)


def test_body_after_an_early_response_cannot_smuggle_a_request(http):
    smuggled = b"GET /admin HTTP/1.1\r\nHost: app.example\r\n\r\n"
    second = b"POST /x HTTP/1.1\r\nHost: app.example\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled
    # The client knows how the relay rewrites a head: it sizes the first
    # body so that the service takes the second head as the rest of it.
    rewritten = bytes(ingress(http, ("client", second))[0].sent).index(smuggled)
    first = b"POST /form HTTP/1.1\r\nHost: app.example\r\nContent-Length: %d\r\n\r\nhello" % (5 + rewritten)
    early = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
    streams = ingress(http, ("client", first), ("service", early), ("client", b"x" * rewritten + second))
    seen = [url for st in streams for url in service_reads(st.sent)]
    assert b"/admin" not in seen


def test_deferred_credit_goes_back_to_the_stream_that_received_the_bytes(http):
    streams = ingress(http, ("client", GET), ("pause_writing",), ("service", OK5),
                      ("client", b"GET /api/x HTTP/1.1\r\nHost: app.example\r\n\r\n"), ("resume_writing",))
    assert [(st.delivered, st.credited) for st in streams] == [(len(OK5), len(OK5)), (0, 0)]


def test_service_connection_close_is_not_reused(http):
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"
    streams = ingress(http, ("client", GET), ("service", closing), ("client", GET))
    assert len(service_reads(streams[0].sent)) == 1
