"""HTTP ingress on the HTTPS port, driven by curl, raw TLS sockets and the
`websockets` client, through a real relay and agent to real services."""

import asyncio
import hashlib
import http.server
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time

import pytest

from relayd.net import run
from tests.metric import bad_input, value
from tests.tunnel.util import join_token, start_agent, start_relay
from tests.waiting import until_sync

BIG = os.urandom(3 * 1024 * 1024)


class Backend(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body go out in separate writes; without this, Nagle plus the
    # peer's delayed ACK stalls each kept-alive response ~40 ms.
    disable_nagle_algorithm = True
    name = "web"
    seen: list = []  # paths of the GET requests the services received, in order

    def log_message(self, *a):
        pass

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _send(self, body, status=200, extra=()):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        Backend.seen.append(self.path)
        if self.path.startswith("/big"):
            return self._send(BIG)
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                part = f"event {i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path.startswith("/slow"):
            time.sleep(3)  # kept: the point: a service slower than the gateway timeout
        info = {"who": self.name, "path": self.path, "version": self.request_version,
                "headers": {k.lower(): v for k, v in self.headers.items()}}
        self._send(json.dumps(info).encode(), extra=[("Keep-Alive", "timeout=5")])

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BIG)))
        self.end_headers()

    def do_POST(self):
        body = self._body()
        self._send(hashlib.sha256(body).hexdigest().encode())


class ApiBackend(Backend):
    name = "api"


@pytest.fixture
def backends():
    servers = []
    for cls in (Backend, ApiBackend):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), cls)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    yield [s.server_address[1] for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def curl(relay, *args, host="app.example"):
    port = relay.https_port
    cmd = ["curl", "-sS", "--max-time", "20", "--cacert", str(relay.ca_path),
           "--resolve", f"{host}:{port}:127.0.0.1", *[a.replace("URL", f"https://{host}:{port}") for a in args]]
    return subprocess.run(cmd, capture_output=True, timeout=30)


def with_relay(tmp_path, backends, body, agent=True, **kw):
    web, api = backends

    async def main():
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 0), hostname="app.example",
                                  http={"web": "app.example", "api": "app.example/api/"}, **kw)
        a = None
        if agent:
            a = await start_agent(tmp_path, "a1", join_token(relay),
                                  {"web": ("127.0.0.1", web), "api": ("127.0.0.1", api)})
        try:
            await asyncio.to_thread(body, relay)
        finally:
            if a is not None:
                await a.stop()
            await relay.stop()

    run(main())


def test_routing_forwarded_headers_hop_by_hop_keepalive(tmp_path, backends):
    def body(relay):
        r = curl(relay, "-H", "Connection: keep-alive, X-Private", "-H", "X-Private: secret",
                 "-H", "X-Forwarded-For: 10.9.9.9", "URL/hello?x=1", "URL/api/orders", "-w", "\n%{num_connects}")
        assert r.returncode == 0, r.stderr
        out = r.stdout.decode()
        parts = out.split("\n")  # body1, "1" + body2, "0"  (write-out after each transfer)
        a = json.loads(parts[0])
        b = json.loads(parts[1][1:])
        connects = [parts[1][0], parts[2]]
        assert a["who"] == "web" and a["path"] == "/hello?x=1"
        assert b["who"] == "api" and b["path"] == "/api/orders"
        h = a["headers"]
        assert h["x-forwarded-for"] == "10.9.9.9, 127.0.0.1" and h["x-forwarded-proto"] == "https"
        assert h["forwarded"] == "for=127.0.0.1;proto=https;host=app.example:%d" % relay.https_port
        assert "x-private" not in h and "connection" not in h  # kept alive to the service
        assert connects == ["1", "0"], out  # the second request reused the kept-alive connection
        # /api/v1 on the relay's own name is the relay's REST API, not the endpoint's.
        r = curl(relay, "URL/api/v1/openapi.json")
        assert r.returncode == 0 and json.loads(r.stdout)["openapi"].startswith("3.1"), r.stdout[:200]
        # Many requests on kept-alive connections: every per-request stream is freed.
        for _ in range(3):
            r = curl(relay, *(["URL/x"] * 100), "-o", "/dev/null")
            assert r.returncode == 0, r.stderr
        until_sync(lambda: [s.conn.session.stream_count() for s in relay.sessions.values()] == [0], 5,
                   lambda: f"streams left: {[s.conn.session.stream_count() for s in relay.sessions.values()]}")

    with_relay(tmp_path, backends, body)


def test_streaming_upload_download_and_chunked(tmp_path, backends):
    def body(relay):
        upload = tmp_path / "up.bin"
        upload.write_bytes(os.urandom(8 * 1024 * 1024))
        want = hashlib.sha256(upload.read_bytes()).hexdigest().encode()
        r = curl(relay, "--data-binary", f"@{upload}", "URL/upload")
        assert r.returncode == 0 and r.stdout == want, r.stderr
        r = curl(relay, "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{upload}", "URL/upload")
        assert r.returncode == 0 and r.stdout == want, r.stderr
        r = curl(relay, "URL/big")
        assert r.returncode == 0 and r.stdout == BIG
        r = curl(relay, "-N", "URL/stream")
        assert r.stdout == b"".join(f"event {i}\n".encode() for i in range(5))

    with_relay(tmp_path, backends, body)


def test_error_statuses(tmp_path, backends):
    def body(relay):
        # other.example gets the relay's own certificate (-k), and no route.
        r = curl(relay, "-k", "-o", "/dev/null", "-w", "%{http_code}", "URL/x", host="other.example")
        assert r.stdout == b"404"
        r = curl(relay, "-o", "/dev/null", "-w", "%{http_code}", "URL/slow")
        assert r.stdout == b"504"

    with_relay(tmp_path, backends, body, gateway_timeout=1.0)


def test_no_agent_503_and_dead_service_502(tmp_path, backends):
    def body(relay):
        r = curl(relay, "-w", "%{http_code}", "URL/")
        assert r.stdout.endswith(b"503") and b"no agent" in r.stdout

    with_relay(tmp_path, backends, body, agent=False)

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()

    def body2(relay):
        r = curl(relay, "-w", "%{http_code}", "URL/")
        assert r.stdout.endswith(b"502"), r.stdout

    with_relay(tmp_path / "2", [dead, dead], body2)


SMUGGLING = [
    b"POST / HTTP/1.1\r\nHost: app.example\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: app.example\r\nX-A: 1\r\n  folded\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: app.example\r\nHost: evil.example\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: app.example\r\n" + b"X-Pad: " + b"a" * 40000 + b"\r\n\r\n",
]


@pytest.mark.parametrize("raw", SMUGGLING, ids=["cl+te", "obs-fold", "bad-chunk", "te-gzip", "two-hosts",
                                                 "no-host", "huge-head"])
def test_malformed_requests_refused(tmp_path, backends, raw):
    def body(relay):
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        with socket.create_connection(("127.0.0.1", relay.https_port), 5) as s:
            with ctx.wrap_socket(s, server_hostname="app.example") as t:
                t.sendall(raw)
                reply = b""
                t.settimeout(5)
                try:
                    while chunk := t.recv(65536):
                        reply += chunk
                except (ssl.SSLError, ConnectionError):
                    pass
        assert reply.split(b" ", 2)[1] in (b"400", b"431"), reply[:200]

    with_relay(tmp_path, backends, body)


def test_websocket_passthrough(tmp_path, backends):
    import websockets.asyncio.client as wsclient
    from websockets.asyncio.server import serve

    async def main():
        async def echo(conn):
            async for msg in conn:
                await conn.send(msg)

        async with serve(echo, "127.0.0.1", 0) as server:
            wsport = server.sockets[0].getsockname()[1]
            relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 0), hostname="app.example",
                                      http={"ws": "app.example/ws"})
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"ws": ("127.0.0.1", wsport)})
            ctx = ssl.create_default_context(cafile=str(relay.ca_path))
            async with wsclient.connect(f"wss://app.example:{relay.https_port}/ws", ssl=ctx,
                                        host="127.0.0.1", port=relay.https_port) as conn:
                for msg in ("hello", b"\x00" * 100_000, "é" * 1000):
                    await conn.send(msg)
                    assert await asyncio.wait_for(conn.recv(), 5) == msg
            await agent.stop()
            await relay.stop()

    run(main())


def test_wrk_load_keeps_every_request_good_and_frees_streams(tmp_path, backends):
    """wrk (Debian package, installed by scripts/test.sh) for a few seconds of
    keep-alive load: every response a 2xx, no socket errors, no stream left."""
    import shutil

    if not shutil.which("wrk"):
        pytest.fail("wrk is needed (scripts/test.sh installs it): apt-get install wrk")

    def body(relay):
        out = subprocess.run(["wrk", "-t1", "-c8", "-d3s", f"https://127.0.0.1:{relay.https_port}/load"],
                             capture_output=True, text=True, timeout=30).stdout
        total = int(re.search(r"(\d+) requests in", out).group(1))
        assert total > 100, out
        assert "Non-2xx" not in out and "Socket errors" not in out, out
        until_sync(lambda: [s.conn.session.stream_count() for s in relay.sessions.values()] == [0], 5,
                   lambda: f"streams left: {[s.conn.session.stream_count() for s in relay.sessions.values()]}")

    web, api = backends

    async def main():
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 0), http={"web": "127.0.0.1"})
        a = await start_agent(tmp_path, "a1", join_token(relay), {"web": ("127.0.0.1", web)})
        try:
            await asyncio.to_thread(body, relay)
        finally:
            await a.stop()
            await relay.stop()

    run(main())


def test_head_then_get_on_one_kept_alive_connection(tmp_path, backends):
    """A HEAD response announces a body it does not carry: the relay must end
    it at the head, or the next response on the connection would be eaten."""

    def body(relay):
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        with socket.create_connection(("127.0.0.1", relay.https_port), 5) as raw:
            with ctx.wrap_socket(raw, server_hostname="app.example") as t:
                # Pipelined: HEAD, then GET, on one connection.
                t.sendall(b"HEAD /big HTTP/1.1\r\nHost: app.example\r\n\r\n"
                          b"GET /after HTTP/1.1\r\nHost: app.example\r\n\r\n")
                t.settimeout(10)
                data = b""
                while b'"path": "/after"' not in data:
                    chunk = t.recv(65536)
                    assert chunk, data
                    data += chunk
        first, _, rest = data.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200") and f"Content-Length: {len(BIG)}".encode() in first
        assert rest.startswith(b"HTTP/1.1 200")  # the HEAD carried no body; the GET answer follows at once

    with_relay(tmp_path, backends, body)


class RawBackend:
    """A service written on raw sockets, to misbehave on purpose: ``reply``
    maps (connection number, request number on it, request head) to the
    bytes to send back, or None to close without answering."""

    def __init__(self, reply):
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns = 0
        self.heads = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns += 1
            threading.Thread(target=self._serve, args=(c, self.conns), daemon=True).start()

    def _serve(self, c, n):
        buf, i = b"", 0
        with c:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        chunk = c.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                m = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                if m:
                    size = int(m[0].split(b":")[1])
                    while len(buf) < size:
                        buf += c.recv(65536)
                    buf = buf[size:]
                i += 1
                self.heads.append(head)
                out = self.reply(n, i, head)
                if out is None:
                    return
                c.sendall(out)

    def close(self):
        self.sock.close()


def raw_relay(tmp_path, backend, body):
    async def main():
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 0), hostname="app.example",
                                  http={"web": "app.example"})
        a = await start_agent(tmp_path, "a1", join_token(relay), {"web": ("127.0.0.1", backend.port)})
        try:
            await asyncio.to_thread(body, relay)
        finally:
            await a.stop()
            await relay.stop()
            backend.close()

    run(main())


def tls_exchange(relay, requests):
    """Send ``requests`` (bytes) one after another on one TLS connection;
    return each response (a closed connection ends the list)."""
    ctx = ssl.create_default_context(cafile=str(relay.ca_path))
    out = []
    with socket.create_connection(("127.0.0.1", relay.https_port), 5) as raw:
        with ctx.wrap_socket(raw, server_hostname="app.example") as t:
            t.settimeout(10)
            data = b""
            for req in requests:
                t.sendall(req)
                data, complete = read_response(t, data, head_only=req.startswith(b"HEAD "))
                out.append(data)
                if not complete:
                    return out
                data = b""
            return out


def read_response(t, data: bytes, head_only: bool) -> tuple[bytes, bool]:
    """One whole response (its head, then Content-Length bytes of body; to
    the end of the connection if it says Connection: close); False if the
    connection ended first."""

    def more() -> bytes:
        try:
            return t.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return b""

    while b"\r\n\r\n" not in data:
        if not (chunk := more()):
            return data, False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:[ \t]*(\d+)\r$", head + b"\r")
    want = 0 if head_only or length is None else int(length.group(1))
    while len(body) < want:
        if not (chunk := more()):
            return data, False
        body += chunk
        data += chunk
    if re.search(rb"(?im)^connection:[ \t]*close\r$", head + b"\r"):
        while chunk := more():  # anything the relay sends after it would show
            data += chunk
        return data, False
    return data, True


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_idempotent_request_is_retried_when_the_kept_alive_service_connection_closes(tmp_path):
    """The service closes each connection after its first answer, as one with
    a short keep-alive timeout does, racing the next request: a GET goes again
    on a fresh connection; a POST with a body does not (502), as it may have
    had its effect."""
    be = RawBackend(lambda n, i, head: OK if i == 1 else None)

    def body(relay):
        get = b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n"
        out = tls_exchange(relay, [get, get, get])
        assert [r[:12] for r in out] == [b"HTTP/1.1 200"] * 3, out
        assert all(r.endswith(b"ok") for r in out)
        assert be.conns == 3  # the 2nd and 3rd each went again on a new connection
        assert value("relayd_http_retries_total") >= 2
        post = b"POST /p HTTP/1.1\r\nHost: app.example\r\nContent-Length: 3\r\n\r\nabc"
        out = tls_exchange(relay, [get, post])
        assert out[0].startswith(b"HTTP/1.1 200")
        assert out[1].startswith(b"HTTP/1.1 502"), out

    raw_relay(tmp_path, be, body)


@pytest.mark.parametrize("bad", [
    b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok",  # bare LF
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok",  # obs-fold
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",  # conflicting lengths
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
    b"SPDY/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
])
def test_malformed_response_heads_get_502(tmp_path, bad):
    be = RawBackend(lambda n, i, head: bad)

    def body(relay):
        before = bad_input("http_service", "bad_response_head")
        out = tls_exchange(relay, [b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n"])
        assert out[0].startswith(b"HTTP/1.1 502"), out
        assert b"malformed" in out[0] or b"Content-Length" in out[0] or b"Transfer-Encoding" in out[0]
        assert bad_input("http_service", "bad_response_head") == before + 1

    raw_relay(tmp_path, be, body)


def test_response_longer_than_its_content_length_is_cut_and_the_connection_ends(tmp_path):
    """Bytes past Content-Length would be taken by the client as the next
    response: the relay sends exactly the announced body and closes."""
    be = RawBackend(lambda n, i, head: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"
                    b"Content-Length: 5\r\n\r\nforge")

    def body(relay):
        out = tls_exchange(relay, [b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n"])
        assert out[0].endswith(b"\r\n\r\nok"), out
        assert b"forge" not in out[0]

    raw_relay(tmp_path, be, body)


def test_identical_heads_reuse_the_rewrite_but_keep_their_own_framing(tmp_path):
    """Responses with byte-identical heads take the cached rewrite; one for a
    HEAD request (no body) and ones with different lengths stay correct."""
    def reply(n, i, head):
        size = 3 if b"/three" in head else 2
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n" % size + \
            (b"" if head.startswith(b"HEAD") else b"xyz"[:size])

    be = RawBackend(reply)

    def body(relay):
        g = b"GET /two HTTP/1.1\r\nHost: app.example\r\n\r\n"
        h = b"HEAD /two HTTP/1.1\r\nHost: app.example\r\n\r\n"
        g3 = b"GET /three HTTP/1.1\r\nHost: app.example\r\n\r\n"
        out = tls_exchange(relay, [g, g, h, g3, g])
        assert len(out) == 5, out
        assert [r.rpartition(b"\r\n\r\n")[2] for r in out] == [b"xy", b"xy", b"", b"xyz", b"xy"], out
        assert all(b"keep-alive" not in r.lower() for r in out)

    raw_relay(tmp_path, be, body)


def test_pipelined_request_does_not_lift_the_gateway_timeout_of_the_one_in_flight(tmp_path, backends):
    def body(relay):
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        with socket.create_connection(("127.0.0.1", relay.https_port), 5) as raw:
            with ctx.wrap_socket(raw, server_hostname="app.example") as t:
                t.sendall(b"GET /slow HTTP/1.1\r\nHost: app.example\r\n\r\n")
                until_sync(lambda: "/slow" in Backend.seen, 5, "the slow request never reached the service")
                t.sendall(b"GET /next HTTP/1.1\r\nHost: app.example\r\n\r\n")
                t.settimeout(10)
                data = t.recv(65536)
        # A 504 (gateway_timeout 1 s), not the 200 the slow service gives after 3 s.
        assert data.startswith(b"HTTP/1.1 504"), data

    with_relay(tmp_path, backends, body, gateway_timeout=1.0)


def test_client_asking_to_close_gets_connection_close_and_the_close(tmp_path, backends):
    """HTTP/1.0 without keep-alive, and HTTP/1.1 with Connection: close: the
    response says Connection: close and the relay then closes, so a client
    reading to the end is not left waiting for the idle timeout."""

    def body(relay):
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        versions = []
        for req in (b"GET /ten HTTP/1.0\r\nHost: app.example\r\n\r\n",
                    b"GET /close HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", relay.https_port), 5) as raw:
                with ctx.wrap_socket(raw, server_hostname="app.example") as t:
                    t.sendall(req)
                    t.settimeout(5)
                    data = b""
                    while True:
                        chunk = t.recv(65536)
                        if not chunk:
                            break
                        data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close" in head, data
            info = json.loads(rest)
            assert info["path"] in ("/ten", "/close")
            versions.append(info["version"])
        # The service was asked in the client's version (no chunked body for 1.0).
        assert versions == ["HTTP/1.0", "HTTP/1.1"]

    with_relay(tmp_path, backends, body)


def test_one_kept_alive_connection_serves_an_endpoint_then_becomes_an_agent_link(tmp_path, backends):
    """The front door routes each request on its own: after an endpoint's
    answer, the same TLS connection asks for the agent link and gets the
    relay's own 101, then speaks the link's preamble through it."""
    import base64

    from relayd.core import wire
    from relayd.core.framing import encode_message
    from relayd.net.wslink import AGENT_PATH

    def accept_key(k):  # RFC 6455 4.2.2, computed here independently
        return base64.b64encode(hashlib.sha1(k.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()

    def body(relay):
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        key = base64.b64encode(os.urandom(16)).decode()
        with socket.create_connection(("127.0.0.1", relay.https_port), 5) as raw:
            with ctx.wrap_socket(raw, server_hostname="app.example") as t:
                t.settimeout(10)
                t.sendall(b"GET /first HTTP/1.1\r\nHost: app.example\r\n\r\n")
                data = b""
                while b'"path": "/first"' not in data:
                    chunk = t.recv(65536)
                    assert chunk, data
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200")
                t.sendall(f"GET {AGENT_PATH} HTTP/1.1\r\nHost: app.example\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          .encode())
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = t.recv(65536)
                    assert chunk, data
                    data += chunk
                head = data.partition(b"\r\n\r\n")[0]
                assert head.startswith(b"HTTP/1.1 101 ") and accept_key(key).encode() in head
                # The link's first request, as one masked binary frame: the CA.
                payload = encode_message(wire.encode_request(wire.CaRequest()))
                mask = os.urandom(4)
                t.sendall(bytes([0x82, 0x80 | len(payload)]) + mask
                          + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
                reply = b""
                while b"BEGIN CERTIFICATE" not in reply:
                    chunk = t.recv(65536)
                    assert chunk, reply
                    reply += chunk

    with_relay(tmp_path, backends, body)
