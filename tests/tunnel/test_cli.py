"""The command line as people type it: real `relayd serve`, `relayd agent`
and `relayd admin` processes on loopback, stopped by PID."""

import asyncio
import os
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.tunnel.processes import RELAYD, Proc, cli, free_port, wait_agents_online, wait_port
from tests.tunnel.util import echo_handler

@pytest.fixture
def relay_proc(tmp_path):
    agents, public, metrics = free_port(), free_port(), free_port()
    data = tmp_path / "relay"
    proc = Proc(["serve", "--data", str(data), "--agents", f"127.0.0.1:{agents}",
                 "--tcp", f"svc=127.0.0.1:{public}", "--metrics", f"127.0.0.1:{metrics}"])
    try:
        wait_port(agents)
        yield proc, data, public, metrics
    finally:
        out, err = proc.stop()
        # Logs are JSON lines with metadata only: no token secret, no payload.
        for line in err.splitlines():
            if line.startswith("{"):
                assert "secret" not in line.lower() or '"secret"' not in line


def echo_through(port, payload):
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while data := s.recv(65536):
            got += data
    return got


def test_serve_join_agent_traffic_list_revoke(relay_proc, tmp_path):
    proc, data, public, metrics_port = relay_proc
    token = cli("admin", "join-token", "--data", str(data), "--endpoint", "svc", "--ttl", "5m").stdout.strip()
    assert token.startswith("relayd1.") and "\n" not in token
    ca = cli("admin", "ca-cert", "--data", str(data)).stdout
    assert ca.startswith("-----BEGIN CERTIFICATE-----")

    import threading

    loop_ready = threading.Event()
    box = {}

    def serve_echo():
        async def main():
            srv = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
            box["port"] = srv.sockets[0].getsockname()[1]
            box["stop"] = asyncio.Event()
            loop_ready.set()
            await box["stop"].wait()
            srv.close()

        box["loop"] = asyncio.new_event_loop()
        box["loop"].run_until_complete(main())

    th = threading.Thread(target=serve_echo, daemon=True)
    th.start()
    loop_ready.wait(5)
    agent = Proc(["agent", "--join", token, "--data", str(tmp_path / "agent"),
                  "--endpoint", f"svc=127.0.0.1:{box['port']}"])
    try:
        listing = wait_agents_online(data, 1)
        agent_id = [ln.split()[0] for ln in listing.splitlines()[1:] if " online " in ln][0]
        payload = os.urandom(3_000_000)
        assert echo_through(public, payload) == payload
        # The token was single-use: a second agent with it is refused.
        res = subprocess.run(RELAYD + ["agent", "--join", token, "--data", str(tmp_path / "agent2"),
                                       "--endpoint", "svc=127.0.0.1:9"], capture_output=True, text=True, timeout=30)
        assert res.returncode == 1 and "already used" in res.stderr
        # Metrics count bytes as they flow, per endpoint (never per agent: docs/operations.md).
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'relayd_bytes_total{direction="in",endpoint="svc"}' in text and agent_id not in text
        assert 'relayd_endpoint_agents{endpoint="svc"} 1.0' in text
        assert "relayd_active_listeners 1.0" in text
        assert 'relayd_enrollments_total{kind="enroll",result="success"} 1.0' in text
        assert "relayd_stream_open_seconds_bucket" in text
        # Revocation from another process cuts the live link within a second.
        held = socket.create_connection(("127.0.0.1", public), 5)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        out = cli("admin", "revoke-agent", agent_id, "--data", str(data)).stdout
        assert "revoked" in out
        held.settimeout(3)  # the deadline: revocation reaches live links at the next poll (1 s)
        with pytest.raises(ConnectionResetError):  # cut, not a clean end
            held.recv(10)
        held.close()
        listing = cli("admin", "agents", "--data", str(data)).stdout
        assert " revoked " in listing
        # The revoked agent gives up (its certificate is refused).
        agent.p.wait(20)
        assert agent.p.returncode != 0
    finally:
        _, agent_err = agent.stop()
        box["loop"].call_soon_threadsafe(box["stop"].set)
    assert token.split(".")[1][:20] not in agent_err  # the token never reaches a log line


def test_slow_reader_bounds_relay_memory(relay_proc, tmp_path):
    """A client pushes as fast as it can toward a service that reads 1 MB/s:
    the relay must not buffer beyond the stream windows."""
    proc, data, public, _ = relay_proc
    token = cli("admin", "join-token", "--data", str(data)).stdout.strip()
    slow = socket.socket()
    slow.bind(("127.0.0.1", 0))
    slow.listen(1)
    agent = Proc(["agent", "--join", token, "--data", str(tmp_path / "agent"),
                  "--endpoint", f"svc=127.0.0.1:{slow.getsockname()[1]}"])
    try:
        wait_agents_online(data, 1)
        base = proc.rss()
        client = socket.create_connection(("127.0.0.1", public), 5)
        client.setblocking(False)
        conn, _ = slow.accept()
        conn.settimeout(1)
        chunk = bytes(1024 * 1024)
        sent = read = 0
        t_end = time.time() + 6
        peak = base
        while time.time() < t_end and sent < 1 << 30:
            try:
                sent += client.send(chunk)
            except BlockingIOError:
                pass
            # The service reads ~1 MB/s.
            try:
                read += len(conn.recv(100_000))
            except socket.timeout:
                pass
            time.sleep(0.1)  # kept: paces the slow service's reads (~1 MB/s), the point of the test
            peak = max(peak, proc.rss())
        growth = peak - base
        print(f"sent {sent >> 20} MiB, service read {read >> 20} MiB, relay RSS growth {growth >> 20} MiB")
        assert growth < 64 * 1024 * 1024
        # Back-pressure reached the client: it could push only about
        # windows + socket buffers, far from 1 GiB.
        assert sent < 200 * 1024 * 1024
        client.close()
        conn.close()
    finally:
        agent.stop()
        slow.close()


BAD_CONFIGS = [
    ("[serve]\nagents = 7000\n", "serve.agents"),
    ("[serve]\nagentz = '127.0.0.1:1'\n", "serve.agentz"),
    ("[serve]\ngrace = 'soon'\n", "serve.grace"),
    ("[serve.tcp]\na = '127.0.0.1:9000'\nb = '127.0.0.1:9000'\n", "serve.tcp.b"),
    ("[serve.tcp]\n'bad name!' = '127.0.0.1:9000'\n", "bad name!"),
    ("[mux]\nmax_window = 10\n", "max_window"),
    ("[mux]\nping_interval = 'x'\n", "mux.ping_interval"),
    ("this is not toml = = =\n", "not valid TOML"),
    ("[serve]\nagents = '127.0.0.1:99999'\n", "serve.agents"),
]


@pytest.mark.parametrize("text,key", BAD_CONFIGS)
def test_malformed_config_fails_at_start_naming_the_key(tmp_path, text, key):
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(text)
    res = cli("serve", "--config", str(cfg), "--data", str(tmp_path / "d"), check=False)
    assert res.returncode == 2
    assert key in res.stderr and res.stderr.startswith("relayd: error:")
    assert "Traceback" not in res.stderr


def test_admin_on_missing_data_dir(tmp_path):
    res = cli("admin", "join-token", "--data", str(tmp_path / "nope"), check=False)
    assert res.returncode == 2 and "relayd serve" in res.stderr


def test_quickstart_demo_runs_and_cleans_up():
    res = subprocess.run(RELAYD + ["demo", "--once", "--mib", "16"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "SHA-256 verified" in res.stdout and "stopped relay, agent" in res.stdout
