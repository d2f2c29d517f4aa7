"""The HTTP ingress's request side as a state machine, without sockets:
whatever way the client's bytes are cut into reads, the service must receive
the same requests (method, target, body) in the same order, whether a body
was counted (Content-Length), framed by the parser (chunked) or absent."""

import asyncio

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.core import http1
from relayd.net import http_ingress as hi


class FakeTransport:
    def __init__(self):
        self.out = bytearray()
        self.closed = False

    def get_extra_info(self, key):
        return ("192.0.2.7", 5555) if key == "peername" else None

    def write(self, data):
        self.out += data

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True


class FakeStream:
    def __init__(self):
        self.sent = bytearray()
        self.at_eof = False

    def attach(self, sink):
        pass

    def send_nowait(self, data):
        self.sent += data
        return len(data)

    def consumed(self, n):
        pass

    def write_eof(self):
        pass

    def reset(self):
        pass


class Upstream:
    """An independent parse of what the relay sent to the service."""

    def __init__(self):
        self.requests = []
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self):
        self.cur = {"url": b"", "body": b"", "headers": {}}

    def on_url(self, url):
        self.cur["url"] += url

    def on_header(self, name, value):
        self.cur["headers"][name.lower()] = value

    def on_body(self, body):
        self.cur["body"] += body

    def on_message_complete(self):
        self.cur["method"] = self.parser.get_method()
        self.requests.append(self.cur)


def request_bytes(method, path, body, chunked, pieces):
    head = f"{method} {path} HTTP/1.1\r\nHost: app.example\r\nX-Trace: {path}\r\n".encode()
    if chunked:
        out = head + b"Transfer-Encoding: chunked\r\n\r\n"
        for p in pieces:
            out += b"%x\r\n%s\r\n" % (len(p), p)
        return out + b"0\r\n\r\n"
    if body or method == "POST":
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    return head + b"\r\n"


requests = st.lists(
    st.tuples(st.sampled_from(["GET", "POST", "PUT"]), st.integers(0, 999),
              st.binary(max_size=300), st.booleans(), st.integers(1, 4)),
    min_size=1, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, st.lists(st.integers(1, 400), min_size=1, max_size=30))
def test_any_split_of_pipelined_requests_reaches_the_service_unchanged(reqs, cuts):
    async def main():
        stream = FakeStream()
        transport = FakeTransport()
        conn = hi.HttpConnection(None, transport, [hi.Route("web", "app.example")],
                                 lambda endpoint, client, ready: ready(stream, None), 60)
        wire = b""
        expected = []
        for method, n, body, chunked, parts in reqs:
            path = f"/r{n}"
            size = max(1, len(body) // parts)
            pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
            pieces = [p for p in pieces if p]
            wire += request_bytes(method, path, body, chunked and bool(body), pieces)
            expected.append((method.encode(), path.encode(), body))
        pos, i = 0, 0
        while pos < len(wire):
            step = cuts[i % len(cuts)]
            conn.feed(wire[pos:pos + step])
            pos += step
            i += 1
        assert not transport.closed, bytes(transport.out)
        # One request in flight at a time: answer each so the next goes out.
        for _ in expected:
            conn.stream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        up = Upstream()
        up.parser.feed_data(bytes(stream.sent))
        got = [(r["method"], r["url"], r["body"]) for r in up.requests]
        assert got == expected
        for r, (_, path, _) in zip(up.requests, expected):
            assert r["headers"][b"x-trace"] == path
            assert r["headers"][b"x-forwarded-for"] == b"192.0.2.7"
        conn.lost()

    asyncio.run(main())


def test_content_length_body_is_counted_not_parsed():
    """After the head, a Content-Length body goes to the stream as it came,
    counted, never read as requests: a request head inside it stays body."""

    async def main():
        stream = FakeStream()
        conn = hi.HttpConnection(None, FakeTransport(), [hi.Route("web", "app.example")],
                                 lambda endpoint, client, ready: ready(stream, None), 60)
        inner = b"\r\n\r\nGET /admin HTTP/1.1\r\nHost: app.example\r\n\r\n"
        body = inner + b"B" * (100_000 - len(inner))
        conn.feed(b"POST /up HTTP/1.1\r\nHost: app.example\r\nContent-Length: 100000\r\n\r\n" + body[:5000])
        assert conn.framing.client_state == "length"
        conn.feed(body[5000:])
        sent = bytes(stream.sent)
        assert sent.endswith(b"\r\n\r\n" + body) and sent.count(b"X-Forwarded-For") == 1
        assert conn.framing.client_state == "head" and conn.framing.active.complete
        conn.lost()

    asyncio.run(main())


def test_oversized_head_without_an_end_is_refused():
    async def main():
        t = FakeTransport()
        conn = hi.HttpConnection(None, t, [hi.Route("web", "app.example")], lambda e, c, ready: ready(FakeStream(), None), 60)
        conn.feed(b"GET / HTTP/1.1\r\nHost: app.example\r\nX-Big: " + b"a" * (http1.LIMITS.max_head + 10))
        assert bytes(t.out).startswith(b"HTTP/1.1 431") and t.closed
        conn.lost()

    asyncio.run(main())


def test_service_is_asked_in_the_clients_http_version():
    async def main():
        for request, line in [(b"GET /a HTTP/1.0\r\nHost: app.example\r\n\r\n", b"GET /a HTTP/1.0\r\n"),
                              (b"GET /b HTTP/1.0\r\nHost: app.example\r\nConnection: keep-alive\r\n\r\n",
                               b"GET /b HTTP/1.0\r\n"),
                              (b"GET /c HTTP/1.1\r\nHost: app.example\r\n\r\n", b"GET /c HTTP/1.1\r\n"),
                              (b"GET /d HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
                               b"GET /d HTTP/1.1\r\n")]:
            stream = FakeStream()
            conn = hi.HttpConnection(None, FakeTransport(), [hi.Route("web", "app.example")],
                                     lambda endpoint, client, ready: ready(stream, None), 60)
            conn.feed(request)
            assert bytes(stream.sent).startswith(line), (request, bytes(stream.sent))
            assert b"keep-alive" not in bytes(stream.sent).lower()  # hop-by-hop, dropped
            conn.lost()

    asyncio.run(main())
