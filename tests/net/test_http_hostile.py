"""The HTTP ingress against hostile clients and services, without sockets:
request smuggling past the relay's rewriting, bytes that ride behind an
upgrade request, forged responses after a chunked body, parser exceptions
that are not HttpParserError, and paths that try to leave their route."""

import asyncio

import httptools
import pytest

from relayd.net import http_ingress as hi
from tests.metric import bad_input
from tests.net.test_http_ingress import FakeStream, FakeTransport, Upstream

ROUTES = [hi.parse_route("web", "app.example"), hi.parse_route("api", "app.example/api"),
          hi.parse_route("admin", "app.example/admin/")]


class Stream(FakeStream):
    """What the ingress sends to the agent, and how the stream ended."""

    def __init__(self, endpoint):
        super().__init__()
        self.endpoint = endpoint
        self.was_reset = False
        self.eof_sent = False

    def write_eof(self):
        self.eof_sent = True

    def reset(self):
        self.was_reset = True


class Client:
    def __init__(self, routes=ROUTES):
        self.t = FakeTransport()
        self.t.aborted = False
        abort = self.t.abort

        def aborted():
            self.t.aborted = True
            abort()

        self.t.abort = aborted
        self.streams = []

        def open_stream(endpoint, client, ready):
            st = Stream(endpoint)
            self.streams.append(st)
            ready(st, None)

        self.conn = hi.HttpConnection(None, self.t, routes, open_stream, 60)

    @property
    def out(self):
        return bytes(self.t.out)

    def upstream(self, i=0):
        up = Upstream()
        try:
            up.parser.feed_data(bytes(self.streams[i].sent))
        except httptools.HttpParserUpgrade:
            pass
        return up.requests


def run(body):
    async def main():
        c = Client()
        try:
            body(c)
        finally:
            c.conn.lost()

    asyncio.run(main())


# -- request smuggling ----------------------------------------------------------------


@pytest.mark.parametrize("named", [b"content-length", b"Content-Length, keep-alive", b"transfer-encoding",
                                   b"host", b"x-forwarded-for, forwarded"])
def test_connection_cannot_drop_framing_or_forwarding_headers(named):
    """Connection may name hop-by-hop fields to drop, but never the ones
    that frame the body, route the request or say who sent it."""

    def body(c):
        smuggled = b"GET /admin HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"
        c.conn.feed(b"POST /form HTTP/1.1\r\nHost: app.example\r\nConnection: " + named +
                    b"\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
        reqs = c.upstream()
        assert len(reqs) == 1, reqs
        assert reqs[0]["body"] == smuggled
        h = reqs[0]["headers"]
        assert h[b"host"] == b"app.example"
        assert h[b"x-forwarded-for"] == b"192.0.2.7"
        assert h[b"forwarded"].startswith(b"for=192.0.2.7")

    run(body)


UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"


def test_bytes_after_an_upgrade_request_wait_for_the_101():
    def body(c):
        c.conn.feed(UPGRADE + SMUGGLED)
        st = c.streams[0]
        assert bytes(st.sent).endswith(b"\r\n\r\n") and SMUGGLED not in bytes(st.sent)
        c.conn.feed(b"more raw bytes")
        assert b"more raw" not in bytes(st.sent)
        # The service accepts: what was held goes on, in order, then raw.
        c.conn.stream_data(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        assert bytes(st.sent).endswith(SMUGGLED + b"more raw bytes")
        c.conn.feed(b"!")
        assert bytes(st.sent).endswith(b"more raw bytes!")
        assert c.out.startswith(b"HTTP/1.1 101 ")

    run(body)


@pytest.mark.parametrize("status", [b"200 OK", b"400 Bad Request", b"426 Upgrade Required"])
def test_refused_upgrade_never_passes_the_held_bytes(status):
    def body(c):
        c.conn.feed(UPGRADE + SMUGGLED)
        c.conn.stream_data(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nno")
        c.conn.feed(b"after the refusal")
        st = c.streams[0]
        assert SMUGGLED not in bytes(st.sent) and b"after the refusal" not in bytes(st.sent)
        assert len(c.upstream()) == 1
        assert c.out.startswith(b"HTTP/1.1 " + status) and b"Connection: close" in c.out
        assert c.t.closed

    run(body)


def test_connect_is_refused_and_nothing_reaches_an_agent():
    def body(c):
        c.conn.feed(b"CONNECT internal.example:22 HTTP/1.1\r\nHost: app.example\r\n\r\nSSH-2.0-x\r\n")
        assert c.out.startswith(b"HTTP/1.1 405 ")
        assert not c.streams and c.t.closed

    run(body)


def test_pipelined_upgrade_request_is_refused():
    def body(c):
        c.conn.feed(b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n" + UPGRADE + b"raw")
        assert b"raw" not in bytes(c.streams[0].sent)
        assert c.t.closed

    run(body)


# -- hostile services -----------------------------------------------------------------------


@pytest.mark.parametrize("after", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
    b"\r\n",
    b"garbage",
])
@pytest.mark.parametrize("split", [False, True])
def test_bytes_after_a_chunked_response_are_dropped_and_counted(after, split):
    """In the same read as the last chunk: dropped, counted, and the client
    connection closes after the good response. In a later read (no request
    outstanding): dropped, counted, and that service connection is let go."""

    def body(c):
        kind = "unsolicited" if split else "past_chunked_end"
        before = bad_input("http_service", kind)
        c.conn.feed(b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n")
        resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        if split:
            c.conn.stream_data(resp)
            c.conn.stream_data(after)
            assert c.streams[0].eof_sent and c.conn.stream is None
        else:
            c.conn.stream_data(resp + after)
            assert c.t.closed
        assert c.out.endswith(b"5\r\nhello\r\n0\r\n\r\n"), c.out
        assert c.out.count(b"HTTP/1.1 ") == 1
        assert bad_input("http_service", kind) == before + 1

    run(body)


@pytest.mark.parametrize("chunked", [
    b"zz\r\nhello\r\n0\r\n\r\n",          # not hex
    b"5\r\nhelloXX0\r\n\r\n",             # no CRLF after the data
    b"5\nhello\r\n0\r\n\r\n",             # bare LF
    b"fffffffffffffffffff\r\n",           # size overflows
    b"5;ext\x00\r\nhello\r\n0\r\n\r\n",   # NUL in an extension
    b"0\r\n bad trailer\r\n\r\n",         # obs-fold in the trailer
])
def test_malformed_chunked_response_aborts_the_client(chunked):
    def body(c):
        before = bad_input("http_service", "bad_chunked_response")
        c.conn.feed(b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n")
        c.conn.stream_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        assert c.t.aborted
        assert bad_input("http_service", "bad_chunked_response") == before + 1

    run(body)


def test_chunked_response_with_extensions_and_trailers_passes_byte_for_byte():
    def body(c):
        c.conn.feed(b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n")
        chunked = b"5;name=v\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\n"
        c.conn.stream_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(len(chunked)):  # one byte at a time
            c.conn.stream_data(chunked[i:i + 1])
        assert c.out.endswith(b"\r\n\r\n" + chunked)
        assert not c.t.closed
        c.conn.feed(b"GET /b HTTP/1.1\r\nHost: app.example\r\n\r\n")  # kept alive
        assert bytes(c.streams[0].sent).count(b"GET ") == 2

    run(body)


# -- routing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target,endpoint,forwarded", [
    (b"/api", "api", b"/api"),
    (b"/api/", "api", b"/api/"),
    (b"/api/v1?x=1", "api", b"/api/v1?x=1"),
    (b"/apiX", "web", b"/apiX"),
    (b"/api.json", "web", b"/api.json"),
    (b"/admin", "admin", b"/admin"),
    (b"/administrator", "web", b"/administrator"),
    (b"/api/../admin/x", "admin", b"/admin/x"),
    (b"/api/%2e%2e/admin", "admin", b"/admin"),
    (b"/api/%2E./admin", "admin", b"/admin"),
    (b"/api/./v1/.", "api", b"/api/v1/"),
    (b"/api/v1/..", "api", b"/api/"),
    (b"/x/.well-known/y", "web", b"/x/.well-known/y"),
    (b"http://app.example/api/v1?q", "api", b"/api/v1?q"),
    (b"HTTPS://APP.example/admin", "admin", b"/admin"),
    (b"http://app.example", "web", b"/"),
    (b"http://app.example?q=1", "web", b"/?q=1"),
])
def test_routes_match_whole_segments_of_the_normalised_path(target, endpoint, forwarded):
    def body(c):
        c.conn.feed(b"GET " + target + b" HTTP/1.1\r\nHost: app.example\r\n\r\n")
        assert c.streams and c.streams[0].endpoint == endpoint, c.out
        assert c.upstream()[0]["url"] == forwarded

    run(body)


@pytest.mark.parametrize("target", [
    b"/..", b"/api/../..", b"/%2e%2e/etc", b"/api/..%2Fadmin", b"/api%2f../admin", b"/api/..%5Cadmin",
    b"/api\\..\\admin", b"/api/..;/admin", b"/api/.;/x", b"http://other.example/api", b"http://u@app.example/",
    b"api/v1", b"//other.example/x",
])
def test_targets_that_could_leave_their_route_are_refused(target):
    def body(c):
        c.conn.feed(b"GET " + target + b" HTTP/1.1\r\nHost: app.example\r\n\r\n")
        assert c.out.startswith(b"HTTP/1.1 400 "), (target, c.out)
        assert not c.streams

    run(body)


def test_no_route_log_line_names_the_host_not_the_path(caplog):
    def body(c):
        with caplog.at_level("INFO", logger="relayd.http"):
            c.conn.feed(b"GET /secret-capability-token-123 HTTP/1.1\r\nHost: other.example\r\n\r\n")
        assert c.out.startswith(b"HTTP/1.1 404 ")
        text = " ".join(r.getMessage() + " " + str(r.__dict__) for r in caplog.records)
        assert "other.example" in text and "secret-capability-token" not in text

    run(body)


# -- the HTTPS port's first request ---------------------------------------------------------


@pytest.mark.parametrize("first", [b"GET /\r\n", b"GET / HTTP/1.1\nHost: app.example\n\n", b"GET / HTTP/1.1\n",
                                   b"\x16\x03\x01garbage\r\n", b"GET / HTTP/2.0\r\n"])
@pytest.mark.parametrize("with_routes", [True, False])
def test_https_port_answers_a_bad_first_line_at_once(first, with_routes):
    """HTTP/0.9, bare LF and garbage get their 400 as soon as the first line
    is whole, not after the head timeout."""
    from relayd.net.wslink import HttpsPort

    async def main():
        t = FakeTransport()
        routes = ROUTES if with_routes else []
        port = HttpsPort(lambda port, tr: hi.HttpConnection(port, tr, routes, lambda e, c, ready: ready(Stream(e), None),
                                                            60))
        port.connection_made(t)
        port.data_received(first)
        assert bytes(t.out).startswith(b"HTTP/1.1 400 "), bytes(t.out)
        assert t.closed
        port.connection_lost(None)

    asyncio.run(main())
