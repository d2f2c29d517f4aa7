"""The HTTPS front door: every request, each one on a kept-alive connection
included, is routed on its own, to an HTTP endpoint or to one of the relay's
own services (local routes: the agent link, which takes the connection over,
and request/response services on the kept-alive connection)."""

import asyncio
import re

import pytest

from relayd.errors import ConfigError
from relayd.net import http_ingress as hi
from relayd.net.wslink import AGENT_PATH, HttpsPort
from tests.net.test_http_hostile import Stream
from tests.metric import value
from tests.net.test_http_ingress import FakeTransport
from tests.waiting import until

UPGRADE = (b"GET " + AGENT_PATH.encode() + b"?v=1 HTTP/1.1\r\nHost: relay.example\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


class Door:
    """An HttpsPort with one endpoint route and a local service that records
    what it was handed."""

    def __init__(self):
        self.t = FakeTransport()
        self.streams = []
        self.taken = []

        def local(head, transport, rest):
            self.taken.append((head, transport, rest))

        def open_stream(endpoint, client, ready):
            st = Stream(endpoint)
            self.streams.append(st)
            ready(st, None)

        routes = [hi.Route("", "*", AGENT_PATH, local=local), hi.parse_route("web", "app.example")]
        self.conns = []

        def make_http(port, t):
            self.conns.append(hi.HttpConnection(port, t, routes, open_stream, 60))
            return self.conns[-1]

        self.port = HttpsPort(make_http)
        self.port.connection_made(self.t)

    def http(self):
        return self.conns[-1]


def run(body):
    async def main():
        d = Door()
        try:
            body(d)
        finally:
            d.port.connection_lost(None)

    asyncio.run(main())


def test_a_kept_alive_connection_turns_into_an_agent_link_after_endpoint_requests():
    def body(d):
        d.port.data_received(b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n")
        conn = d.http()
        conn.stream_data(OK)
        assert bytes(d.t.out).endswith(b"hi")
        d.port.data_received(UPGRADE + b"\x82\x00")  # the upgrade, and the first frame after it
        assert len(d.taken) == 1
        head, transport, rest = d.taken[0]
        assert head.method == b"GET" and head.path == AGENT_PATH.encode() and head.target.endswith(b"?v=1")
        assert head.get(b"sec-websocket-version") == b"13"
        assert transport is d.t and rest == b"\x82\x00"
        assert not d.t.closed
        assert d.streams[0].eof_sent  # the endpoint's stream was let go
        d.port.data_received(b"more")  # the service owns the transport now: nothing reaches the ingress
        assert conn.closed and len(d.conns) == 1

    run(body)


def test_the_agent_path_is_the_relays_on_every_host_name():
    def body(d):
        d.port.data_received(UPGRADE.replace(b"relay.example", b"app.example"))
        assert len(d.taken) == 1 and not d.streams

    run(body)


def test_a_local_request_waits_for_the_exchange_before_it():
    def body(d):
        d.port.data_received(b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n"
                             b"GET " + AGENT_PATH.encode() + b" HTTP/1.1\r\nHost: relay.example\r\n\r\n")
        assert not d.taken
        d.http().stream_data(OK)
        assert len(d.taken) == 1 and d.taken[0][0].get(b"upgrade") is None
        assert bytes(d.t.out).endswith(b"hi")

    run(body)


def test_a_pipelined_upgrade_to_the_agent_path_is_refused():
    def body(d):
        d.port.data_received(b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n" + UPGRADE + b"raw")
        assert not d.taken
        assert b" 400 " in bytes(d.t.out) and d.t.closed

    run(body)


def test_other_hosts_and_paths_still_reach_endpoints_or_404():
    def body(d):
        d.port.data_received(b"GET /.relayd/agentX HTTP/1.1\r\nHost: nobody.example\r\n\r\n")
        assert not d.taken and bytes(d.t.out).startswith(b"HTTP/1.1 404 ")

    run(body)


@pytest.mark.parametrize("route", ["app.example/.relayd", "app.example/.relayd/agent", "x/.relayd/"])
def test_endpoints_cannot_claim_the_relays_own_path(route):
    with pytest.raises(ConfigError, match="relay's own"):
        hi.parse_route("web", route)
    hi.parse_route("web", "app.example/.relaydx")  # a different segment: fine


def test_the_connection_takes_its_limits_from_the_config():
    from relayd.core import http1

    async def main():
        t = FakeTransport()
        limits = http1.HttpLimits(max_queued_requests=1, max_headers=8)
        conn = hi.HttpConnection(None, t, [hi.parse_route("web", "app.example")],
                                 lambda e, c, ready: ready(Stream(e), None), 60, limits)
        get = b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n"
        conn.feed(get + get + get)  # one in flight, one queued, one too many
        assert bytes(t.out).startswith(b"HTTP/1.1 400 ") and b"pipelined" in bytes(t.out)
        t2 = FakeTransport()
        conn2 = hi.HttpConnection(None, t2, [hi.parse_route("web", "app.example")],
                                  lambda e, c, ready: ready(Stream(e), None), 60, limits)
        conn2.feed(b"GET /a HTTP/1.1\r\nHost: app.example\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(9)) + b"\r\n")
        assert bytes(t2.out).startswith(b"HTTP/1.1 431 ")
        conn.lost()
        conn2.lost()

    asyncio.run(main())


class Responder:
    """A local request/response service (Route.respond) that records what
    it got; ``gate`` holds its answers until set."""

    def __init__(self, fail=False):
        self.got = []
        self.fail = fail
        self.gate = None

    async def __call__(self, head, body, ex):
        self.got.append((head.method, head.target, body))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("secret-payload-in-the-error")
        from relayd.core.http1 import Reply

        return Reply(200, b"got " + head.target + b" " + body, headers=((b"X-Local", b"1"),))


def serve(responder, body, gateway_timeout=60.0):
    async def main():
        t = FakeTransport()
        streams = []

        def open_stream(endpoint, client, ready):
            streams.append(Stream(endpoint))
            ready(streams[-1], None)

        routes = [hi.Route("", "*", "/.relayd/echo", serve=hi.buffered(responder)),
                  hi.parse_route("web", "app.example")]
        conn = hi.HttpConnection(None, t, routes, open_stream, gateway_timeout)
        try:
            await body(conn, t, streams)
        finally:
            conn.lost()

    asyncio.run(main())


def responses(out: bytes) -> list[bytes]:
    """The status lines in ``out``, in order."""
    return re.findall(rb"HTTP/1\.1 [0-9]{3} [A-Za-z ]+", bytes(out))


def test_a_local_service_answers_pipelined_requests_on_a_kept_alive_connection():
    r = Responder()

    async def body(conn, t, streams):
        conn.feed(b"GET /.relayd/echo?a=1 HTTP/1.1\r\nHost: relay.example\r\n\r\n"
                  b"POST /.relayd/echo HTTP/1.1\r\nHost: relay.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n"
                  b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n")
        await until(lambda: len(responses(t.out)) == 2 and streams)
        assert r.got == [(b"GET", b"/.relayd/echo?a=1", b""), (b"POST", b"/.relayd/echo", b"abcde")]
        out = bytes(t.out)
        assert out.count(b"X-Local: 1") == 2 and b"Connection: close" not in out
        assert out.index(b"got /.relayd/echo?a=1 ") < out.index(b"got /.relayd/echo abcde")
        conn.stream_data(OK)  # the endpoint's answer, third, on the same connection
        assert bytes(t.out).endswith(b"hi") and not t.closed
        conn.feed(b"HEAD /.relayd/echo HTTP/1.1\r\nHost: relay.example\r\nConnection: close\r\n\r\n")
        await until(lambda: t.closed)
        tail = bytes(t.out).rsplit(b"hi", 1)[1]
        assert tail.startswith(b"HTTP/1.1 200 OK") and tail.endswith(b"Connection: close\r\n\r\n")  # no body

    serve(r, body)


def test_a_local_service_that_fails_answers_500_and_leaves_no_secret_in_the_log(caplog):
    r = Responder(fail=True)
    before = value("relayd_internal_errors_total", where="http_local")

    async def body(conn, t, streams):
        conn.feed(b"GET /.relayd/echo HTTP/1.1\r\nHost: relay.example\r\n\r\n")
        await until(lambda: responses(t.out))
        assert responses(t.out) == [b"HTTP/1.1 500 Internal Server Error"]
        conn.feed(b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n")  # the connection lives on
        conn.stream_data(OK)
        assert bytes(t.out).endswith(b"hi") and not t.closed

    serve(r, body)
    assert value("relayd_internal_errors_total", where="http_local") == before + 1
    assert "secret-payload" not in caplog.text


def test_a_local_service_gets_a_bounded_body():
    from relayd.core import http1

    r = Responder()

    async def body(conn, t, streams):
        # A bystander: another client's exchange with an endpoint, mid-body.
        t2 = FakeTransport()
        bystander = hi.HttpConnection(None, t2, [hi.parse_route("web", "app.example")],
                                      lambda e, c, ready: ready(Stream(e), None), 60)
        bystander.feed(b"POST /b HTTP/1.1\r\nHost: app.example\r\nContent-Length: 4\r\n\r\nab")
        conn.feed(b"POST /.relayd/echo HTTP/1.1\r\nHost: relay.example\r\nContent-Length: %d\r\n\r\n"
                  % (http1.LIMITS.max_queued_body + 10) + b"x" * (http1.LIMITS.max_queued_body + 1))
        assert responses(t.out) == [b"HTTP/1.1 413 Content Too Large"] and t.closed and not r.got
        bystander.feed(b"cd")
        bystander.stream_data(OK)
        assert bytes(t2.out).endswith(b"hi") and not t2.closed
        assert bytes(bystander.stream.sent).endswith(b"\r\n\r\nabcd")
        bystander.lost()

    serve(r, body)


def test_a_slow_local_service_times_out_with_504_and_is_cancelled():
    r = Responder()

    async def body(conn, t, streams):
        r.gate = asyncio.Event()
        conn.feed(b"GET /.relayd/echo HTTP/1.1\r\nHost: relay.example\r\n\r\n")
        await until(lambda: t.closed, timeout=5)
        assert responses(t.out) == [b"HTTP/1.1 504 Gateway Timeout"]
        r.gate.set()
        await asyncio.sleep(0)
        assert responses(t.out) == [b"HTTP/1.1 504 Gateway Timeout"]  # the late answer went nowhere

    serve(r, body, gateway_timeout=0.3)
