"""A real relay and a real agent as processes on loopback, real services
behind the agent, and bystanders that must come through every attack
unharmed.

Attackers connect from 127.0.0.2 and up (their own per-source caps); the
agent and the bystanders use 127.0.0.1. Every payload an attacker sends
carries MARKER, so that a test can check that no log line ever holds attack
payload. Processes are stopped by PID; nothing outlives a test.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import socketserver
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import httptools
from prometheus_client.parser import text_string_to_metric_families

from tests.net.test_http_ingress import Upstream
from tests.tunnel.processes import Proc, cli, free_port, wait_port
from tests.waiting import until_sync

MARKER = b"PAYLOAD-7f3a9c"
ATTACKER = "127.0.0.2"
BLOB_SIZE = 64 * 1024 * 1024
TCP = ("echo", "blob", "sink", "cut")  # TCP endpoints served by the agent


def blob(offset: int, n: int) -> bytes:
    """Bytes [offset, offset+n) of the blob service's stream (deterministic)."""
    out = bytearray()
    block = offset // 65536
    while len(out) < n + offset % 65536:
        out += hashlib.sha256(b"%d" % block).digest() * 2048
        block += 1
    start = offset % 65536
    return bytes(out[start:start + n])


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        try:
            while data := s.recv(65536):
                s.sendall(data)
        except OSError:
            pass


class BlobHandler(socketserver.BaseRequestHandler):
    """Sends the blob; records how the client side ended (for reset tests)."""

    endings: list = []

    def handle(self):
        s = self.request
        sent = 0
        try:
            while sent < BLOB_SIZE:
                chunk = blob(sent, 256 * 1024)
                s.sendall(chunk)
                sent += len(chunk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
            self.endings.append("eof")
        except ConnectionResetError:
            self.endings.append("reset")
        except OSError as exc:
            self.endings.append(type(exc).__name__)


class CutHandler(socketserver.BaseRequestHandler):
    """Sends 4 MiB, then resets the connection (a service that crashes)."""

    def handle(self):
        s = self.request
        try:
            s.sendall(blob(0, 4 * 1024 * 1024))
        except OSError:
            return
        _reset(s)


class SinkHandler(socketserver.BaseRequestHandler):
    """Reads until the peer ends; records how many bytes came and whether
    the end was EOF or a reset."""

    endings: list = []
    received = 0

    def handle(self):
        s = self.request
        try:
            while data := s.recv(65536):
                SinkHandler.received += len(data)
            self.endings.append("eof")
        except ConnectionResetError:
            self.endings.append("reset")


class HttpService(socketserver.BaseRequestHandler):
    """A real HTTP/1.1 service (parsed with httptools, as a service would):
    records every request it sees, and answers by path. Paths under /evil/
    answer with hostile bytes."""

    requests: list = []  # {"method", "url", "headers", "body"}

    def handle(self):
        s = self.request
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = Upstream()
        try:
            while data := s.recv(65536):
                done = len(up.requests)
                try:
                    up.parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    pass
                except httptools.HttpParserError:
                    return
                for req in up.requests[done:]:
                    self.requests.append(req)
                    for chunk in self.answer(req):
                        if chunk is None:
                            _reset(s)
                            return
                        s.sendall(chunk)
        except OSError:
            pass

    def answer(self, req):
        path = req["url"].split(b"?")[0]
        if path == b"/evil/chunked-then-101":
            return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n" + MARKER]
        if path == b"/evil/chunked-then-forged":
            return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n" + MARKER]
        if path == b"/evil/bad-chunk":
            return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"]
        if path == b"/evil/cut":
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000, None]
        if path == b"/evil/refuse-upgrade":
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno"]
        body = b"ok " + req["url"]
        return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body]


def _reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


def serve(handler) -> _Server:
    srv = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class Stack:
    """relayd serve + relayd agent (processes) with echo, blob, sink and
    HTTP services; ``https`` routes web=app.example to the HTTP service."""

    def __init__(self, tmp: Path, *, admission: str = "", config: str = "", agent: bool = True,
                 extra_tcp=("noagent",)) -> None:
        self.tmp = tmp
        self.services = {"echo": serve(EchoHandler), "blob": serve(BlobHandler), "sink": serve(SinkHandler),
                         "cut": serve(CutHandler), "web": serve(HttpService)}
        HttpService.requests = []
        BlobHandler.endings = []
        SinkHandler.endings = []
        SinkHandler.received = 0
        self.ports = {k: free_port() for k in ("agents", "https", "metrics", *TCP, *extra_tcp)}
        self.data = tmp / "relay"
        conf = tmp / "relay.toml"
        conf.write_text('[mux]\nping_interval = "1s"\nping_timeout = "3s"\n' + admission + config)
        args = ["serve", "--config", str(conf), "--data", str(self.data),
                "--agents", f"127.0.0.1:{self.ports['agents']}", "--https", f"127.0.0.1:{self.ports['https']}",
                "--hostname", "app.example", "--http", "web=app.example",
                "--metrics", f"127.0.0.1:{self.ports['metrics']}"]
        for name in (*TCP, *extra_tcp):
            args += ["--tcp", f"{name}=127.0.0.1:{self.ports[name]}"]
        self.relay = Proc(args)
        self.agent = None
        self.more_agents: list[Proc] = []
        try:
            wait_port(self.ports["agents"])
            wait_port(self.ports["metrics"])
            if agent:
                self.start_agent()
        except BaseException:
            self.stop(check=False)
            raise

    # -- processes -------------------------------------------------------------------

    def start_agent(self, name: str = "agent") -> Proc:
        token = cli("admin", "join-token", "--data", str(self.data)).stdout.strip()
        conf = self.tmp / f"{name}.toml"
        conf.write_text('[mux]\nping_interval = "1s"\nping_timeout = "3s"\n[agent]\nreconnect_max = "1s"\n')
        args = ["agent", "--config", str(conf), "--data", str(self.tmp / name), "--join", token]
        for svc in (*TCP, "web"):
            args += ["--endpoint", f"{svc}=127.0.0.1:{self.services[svc].server_address[1]}"]
        links = self.links()
        proc = Proc(args)
        if self.agent is None:
            self.agent = proc  # the first agent: the one the bystander's traffic goes through
        else:
            self.more_agents.append(proc)
        until_sync(lambda: self.links() > links and self.metric("relayd_active_listeners") >= 1, 30,
                   "the agent did not connect", ignore=(OSError,))
        return proc

    def stop(self, check: bool = True) -> tuple[str, str]:
        for p in self.more_agents:
            p.stop()
        outs = []
        for p in (self.agent, self.relay):
            if p is not None:
                outs.append(p.stop()[1])
            else:
                outs.append("")
        for srv in self.services.values():
            srv.shutdown()
            srv.server_close()
        agent_err, relay_err = outs
        if check:
            for who, text in (("relay", relay_err), ("agent", agent_err)):
                assert "Traceback" not in text, f"{who} printed a traceback:\n{text[-3000:]}"
                assert MARKER.decode() not in text, f"attack payload reached the {who}'s log"
        return relay_err, agent_err

    # -- observation --------------------------------------------------------------------

    def metrics(self) -> dict:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=5).read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels) -> float:
        want = tuple(sorted(labels.items()))
        total = 0.0
        for (n, lab), v in self.metrics().items():
            if n == name and set(want) <= set(lab):
                total += v
        return total

    def links(self) -> float:
        """Agent links the relay ever accepted (a reconnect adds one)."""
        return self.metric("relayd_listener_connections_total", result="success")

    def agent_links(self) -> int:
        """Links the (first) agent process made: 1 unless it had to reconnect."""
        self.agent.err.seek(0)
        return self.agent.err.read().count(b'"msg":"connected"')

    # -- clients ------------------------------------------------------------------------------

    def client_ctx(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.data / "ca" / "ca.crt"))
        return ctx

    def tls(self, source: str = ATTACKER, host: str = "app.example", timeout: float = 10) -> ssl.SSLSocket:
        raw = socket.socket()
        raw.bind((source, 0))
        raw.settimeout(timeout)
        raw.connect(("127.0.0.1", self.ports["https"]))
        # Strict about EOF: a TLS connection that ends without close_notify
        # (a reset) must show as an error, not as a clean end.
        return self.client_ctx().wrap_socket(raw, server_hostname=host, suppress_ragged_eofs=False)

    def https(self, request: bytes, source: str = ATTACKER, timeout: float = 10) -> bytes:
        """Send raw bytes on a fresh TLS connection; everything until close."""
        s = self.tls(source, timeout=timeout)
        try:
            s.sendall(request)
            return read_all(s)
        finally:
            s.close()

    def tcp(self, endpoint: str, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(timeout)
        s.connect(("127.0.0.1", self.ports[endpoint]))
        return s


def echo_round(s: socket.socket, size: int, what: str) -> int:
    """Send ``size`` random bytes to an echo service and check what comes
    back; the number of bytes."""
    chunk = os.urandom(size)
    s.sendall(chunk)
    got = b""
    while len(got) < len(chunk):
        data = s.recv(len(chunk) - len(got))
        if not data:
            raise ConnectionError(f"{what} stream ended")
        got += data
    if got != chunk:
        raise AssertionError(f"{what} stream corrupted")
    return size


def read_all(s) -> bytes:
    got = b""
    try:
        while data := s.recv(65536):
            got += data
    except (ConnectionResetError, ssl.SSLError, socket.timeout) as exc:
        got += b"<" + type(exc).__name__.encode() + b">"
    return got


def cut(got: bytes) -> bool:
    """True if a read_all() ended abnormally: a reset, or (over TLS) an end
    without close_notify, which is how a TLS client sees the reset."""
    return got.endswith((b"<ConnectionResetError>", b"<SSLEOFError>"))


def statuses(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


class Bystander:
    """Someone else's traffic: a TCP stream through the echo endpoint and a
    kept-alive HTTPS connection, busy the whole time, every byte checked."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.errors: list[str] = []
        self.tcp_bytes = 0
        self.http_requests = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._tcp, daemon=True),
                         threading.Thread(target=self._http, daemon=True)]
        for t in self._threads:
            t.start()
        until_sync(lambda: (self.tcp_bytes and self.http_requests) or self.errors, 10,
                   "the bystander never got going")

    def _tcp(self) -> None:
        try:
            s = self.stack.tcp("echo")
            while not self._stop.is_set():
                self.tcp_bytes += echo_round(s, 32 * 1024, "echo")
                time.sleep(0.005)  # kept: paces the bystander's traffic (steady, not a CPU hog)
            s.close()
        except Exception as exc:
            self.errors.append(f"tcp: {type(exc).__name__}: {exc}")

    def _http(self) -> None:
        try:
            s = self.stack.tls("127.0.0.1")
            buf = b""
            while not self._stop.is_set():
                n = self.http_requests
                s.sendall(b"GET /bystander/%d HTTP/1.1\r\nHost: app.example\r\n\r\n" % n)
                want = b"ok /bystander/%d" % n
                while want not in buf:
                    data = s.recv(65536)
                    if not data:
                        raise ConnectionError("kept-alive HTTPS connection closed")
                    buf += data
                buf = buf[buf.index(want) + len(want):]
                self.http_requests += 1
                time.sleep(0.01)  # kept: paces the bystander's requests
            s.close()
        except Exception as exc:
            self.errors.append(f"https: {type(exc).__name__}: {exc}")

    def check(self) -> None:
        """Still healthy: both streams progressed and nothing went wrong."""
        t, h = self.tcp_bytes, self.http_requests
        until_sync(lambda: (self.tcp_bytes > t and self.http_requests > h) or self.errors, 10,
                   "the bystander stalled")
        assert not self.errors, self.errors

    def stop(self) -> None:
        self.check()
        self._stop.set()
        for t in self._threads:
            t.join(10)
        assert not self.errors, self.errors
