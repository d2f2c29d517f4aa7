"""Reload (SIGHUP): endpoints, routes and certificates change without
dropping anything established."""

import asyncio
import dataclasses
import signal
import socket
import ssl
import subprocess
import sys

import pytest

from relayd.net import run
from tests.tunnel.processes import free_port
from tests.tunnel.util import echo_ok, echo_service, join_token, start_agent, start_relay
from tests.waiting import listening, until_sync


def test_tcp_endpoints_come_and_go_and_established_connections_live_on(tmp_path):
    async def main():
        relay = await start_relay(tmp_path, endpoints=("echo",))
        async with echo_service() as svc:
            # The agent offers "extra" too, which the relay does not have yet.
            agent = await start_agent(tmp_path, "a1", join_token(relay),
                                      {"echo": ("127.0.0.1", svc), "extra": ("127.0.0.1", svc)})
            old_port = relay.tcp_ports["echo"]
            r, w = await asyncio.open_connection("127.0.0.1", old_port)
            w.write(b"before")
            assert await r.readexactly(6) == b"before"

            new = dataclasses.replace(relay.cfg, tcp={"extra": ("127.0.0.1", 0)})
            await relay.reload(new)

            # Established: still flows through the removed endpoint's stream.
            w.write(b"after")
            assert await r.readexactly(5) == b"after"
            # Removed: its listening socket is closed, so a new client is refused.
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", old_port)
            # Added: served by the agent already connected, without reconnecting.
            assert await echo_ok(relay.tcp_ports["extra"])
            assert agent.reconnects == 0
            w.close()
            await agent.stop()
        await relay.stop()

    run(main())


def test_http_routes_swap_for_the_next_request_on_a_kept_alive_connection(tmp_path):
    async def main():
        import http.server
        import threading

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                body = self.path.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 0), hostname="app.example",
                                  http={"web": "app.example/old"})
        svc = ("127.0.0.1", srv.server_address[1])
        agent = await start_agent(tmp_path, "a1", join_token(relay), {"web": svc, "web2": svc})

        def exchange(t, path):
            t.sendall(f"GET {path} HTTP/1.1\r\nHost: app.example\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                data += t.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            n = int([ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0])
            while len(body) < n:
                body += t.recv(65536)
            return head.split(b" ")[1], body

        ctx = ssl.create_default_context(cafile=str(relay.ca_path))

        def connect():
            raw = socket.create_connection(("127.0.0.1", relay.https_port), 5)
            t = ctx.wrap_socket(raw, server_hostname="app.example")
            t.settimeout(10)
            return t

        t = await asyncio.to_thread(connect)
        assert await asyncio.to_thread(exchange, t, "/old/a") == (b"200", b"/old/a")
        await relay.reload(dataclasses.replace(relay.cfg, http={"web2": "app.example/new"}))
        status, _ = await asyncio.to_thread(exchange, t, "/old/b")
        assert status == b"404"  # the next request on the same connection sees the new table
        t.close()
        t = await asyncio.to_thread(connect)
        assert await asyncio.to_thread(exchange, t, "/new/c") == (b"200", b"/new/c")
        t.close()
        await agent.stop()
        await relay.stop()
        srv.shutdown()
        srv.server_close()

    run(main())


class Served:
    """``relayd serve --config FILE`` as a process, with one TCP endpoint
    (``one``) and a free port for another (``two``)."""

    def __init__(self, tmp_path, interval: float = 0.05) -> None:
        agents, self.one, self.two = free_port(), free_port(), free_port()
        self.conf = tmp_path / "relay.toml"
        self.conf.write_text(f'[serve]\ndata = "{tmp_path / "d"}"\nagents = "127.0.0.1:{agents}"\n'
                             f'[serve.tcp]\none = "127.0.0.1:{self.one}"\n')
        self.log = open(tmp_path / "relay.log", "w+b")
        self.interval = interval
        self.proc = subprocess.Popen([sys.executable, "-m", "relayd.cli", "serve", "--config", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=self.log)

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait(self, pred, what: str) -> None:
        until_sync(pred, 20, lambda: f"{what}\n{self.text()[-2000:]}", interval=self.interval)

    def add_two(self) -> None:
        self.conf.write_text(self.conf.read_text() + f'two = "127.0.0.1:{self.two}"\n')
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        self.log.close()
        return self.proc.returncode


def test_sighup_reloads_the_config_file_and_a_bad_file_keeps_the_running_one(tmp_path):
    r = Served(tmp_path)
    try:
        r.wait(lambda: listening(r.one), "the relay did not start")
        r.add_two()
        r.wait(lambda: listening(r.two), "the added endpoint did not start listening")
        r.conf.write_text("[serve\nbroken")
        r.proc.send_signal(signal.SIGHUP)
        r.wait(lambda: "does not load" in r.text(), "a bad file was not reported")
        state = (r.proc.poll(), listening(r.one), listening(r.two))
        assert state == (None, True, True), f"(exit, one, two) = {state}\n{r.text()[-3000:]}"
    finally:
        assert r.stop() == 0


def test_a_sighup_during_the_start_is_applied_once_the_relay_is_up(tmp_path):
    """A reload asked for while the relay is still starting (its first log
    line written, its listeners not yet open) neither ends the process (the
    default action of SIGHUP) nor gets lost."""
    r = Served(tmp_path, interval=0.005)
    try:
        r.wait(lambda: "starting relay" in r.text(), "the relay did not log its start")
        r.add_two()
        r.wait(lambda: listening(r.two), "the reload asked for during the start was not applied")
        assert listening(r.one) and r.proc.poll() is None
    finally:
        assert r.stop() == 0
