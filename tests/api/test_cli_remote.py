"""`relayd admin --api URL` as people run it: CLI processes against a real
`relayd serve` process on loopback, over its admin API (docs/api.md). A
join token made remotely enrolls a real agent, the remote listing shows it,
a remote revocation cuts its tunnel; the same subcommands print the same
lines with --data and with --api; hostile requests (a wrong key, a wrong
pin, malformed and oversized bodies, unknown ids) are each refused with
their status and counted in relayd_api_requests_total, while a bystander's
stream through another agent goes on intact. No key, token or payload
reaches the relay's log."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from tests.adversarial.stack import EchoHandler, Stack, _Server, echo_round
from tests.tunnel.processes import RELAYD, Proc, cli, free_port, wait_port
from tests.waiting import until_sync

pytestmark = pytest.mark.once

MARKER = "PAYLOAD-3f81c2"


def _serve_echo() -> _Server:
    srv = _Server(("127.0.0.1", 0), EchoHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class Remote:
    """relayd serve (HTTPS, metrics, TCP endpoints echo and by) and a
    bystander agent serving ``by``, whose stream through the relay runs the
    whole time."""

    def __init__(self, tmp) -> None:
        self.tmp = tmp
        self.ports = {k: free_port() for k in ("agents", "https", "metrics", "echo", "by")}
        self.data = tmp / "relay"
        self.echo, self.by_service = _serve_echo(), _serve_echo()
        self.agents: list[Proc] = []
        self.relay = Proc(["serve", "--data", str(self.data), "--agents", f"127.0.0.1:{self.ports['agents']}",
                           "--https", f"127.0.0.1:{self.ports['https']}", "--metrics",
                           f"127.0.0.1:{self.ports['metrics']}", "--tcp", f"echo=127.0.0.1:{self.ports['echo']}",
                           "--tcp", f"by=127.0.0.1:{self.ports['by']}"])
        self.errors: list[str] = []
        self.rounds = 0
        self._stop = threading.Event()
        try:
            wait_port(self.ports["https"])
            wait_port(self.ports["metrics"])
            self.key = (self.data / "admin-api.key").read_text().strip()
            self.url = f"https://127.0.0.1:{self.ports['https']}"
            self.ca = str(self.data / "ca" / "ca.crt")
            self.pin = self.ca_pin()
            token = cli("admin", "join-token", "--data", str(self.data), "--endpoint", "by").stdout.strip()
            self.agents.append(Proc(["agent", "--data", str(tmp / "by-agent"), "--join", token, "--endpoint",
                                     f"by=127.0.0.1:{self.by_service.server_address[1]}"]))
            until_sync(lambda: self.metric("relayd_active_listeners") >= 1, 30, "the bystander agent is not up",
                       ignore=(OSError,))
            self.pump = threading.Thread(target=self._pump, daemon=True)
            self.pump.start()
            until_sync(lambda: self.rounds > 0 or self.errors, 15, "the bystander stream never got going")
        except BaseException:
            print(self.stop()[-3000:])
            raise

    def ca_pin(self) -> str:
        line = next(x for x in cli("admin", "status", "--data", str(self.data)).stdout.splitlines()
                    if x.startswith("CA pin:"))
        return line.split()[-1]

    def _pump(self) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.ports["by"]), timeout=15)
            while not self._stop.is_set():
                echo_round(s, 32 * 1024, "bystander")
                self.rounds += 1
                time.sleep(0.01)  # kept: paces the bystander
            s.close()
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def intact(self) -> None:
        before = self.rounds
        until_sync(lambda: self.rounds > before or self.errors, 15, "the bystander stalled")
        assert not self.errors, self.errors

    def admin(self, *args: str, key: str | None = "", env: dict | None = None, remote: bool = True,
              check: bool = True) -> subprocess.CompletedProcess:
        """`relayd admin ARGS`, remote (--api, the key in RELAYD_API_KEY,
        the CA file) unless told otherwise."""
        e = {k: v for k, v in os.environ.items() if k != "RELAYD_API_KEY"}
        if key is not None:
            e["RELAYD_API_KEY"] = self.key if key == "" else key
        e.update(env or {})
        argv = RELAYD + ["admin", *args] + (["--api", self.url, "--ca", self.ca] if remote else [])
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=e)
        if check:
            assert res.returncode == 0, (args, res.stderr)
        return res

    def local(self, *args: str) -> str:
        return cli("admin", *args, "--data", str(self.data)).stdout

    metrics = Stack.metrics  # (they read self.ports["metrics"])
    metric = Stack.metric

    def api_count(self, route: str, method: str, status: int) -> float:
        return self.metric("relayd_api_requests_total", route=route, method=method, status=str(status))

    def log(self) -> str:
        self.relay.err.seek(0, os.SEEK_SET)
        text = self.relay.err.read().decode()
        self.relay.err.seek(0, os.SEEK_END)
        return text

    def stop(self) -> str:
        self._stop.set()
        out = ""
        for p in self.agents + [self.relay]:
            out += p.stop()[1]
        for srv in (self.echo, self.by_service):
            srv.shutdown()
            srv.server_close()
        return out


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    r = Remote(tmp_path_factory.mktemp("cliremote"))
    r.keys = {r.key}
    yield r
    r.intact()
    err = r.stop()
    assert "Traceback" not in err, err[-3000:]
    assert MARKER not in err
    for key in r.keys:
        assert key not in err, "an admin key reached the relay's log"
    for token in getattr(r, "tokens", ()):
        assert token not in err and token.split(".")[1][:24] not in err, "a join token reached the relay's log"


def test_join_token_enroll_list_revoke_remotely(remote, tmp_path):
    token = remote.admin("join-token", "--endpoint", "echo", "--ttl", "5m").stdout.strip()
    remote.tokens = [token]
    assert token.startswith("relayd1.") and "\n" not in token
    agent = Proc(["agent", "--data", str(tmp_path / "agent"), "--join", token, "--endpoint",
                  f"echo=127.0.0.1:{remote.echo.server_address[1]}"])
    remote.agents.append(agent)

    def listed():
        out = remote.admin("agents").stdout
        rows = [ln for ln in out.splitlines()[1:] if ln.split()[1] == "echo" and " online " in ln]
        return rows[0].split()[0] if rows else None

    agent_id = until_sync(listed, 30, "the agent is not listed online remotely", interval=0.3)
    # The same relay, trusted by its CA's pin instead of the CA file.
    res = subprocess.run(RELAYD + ["admin", "agents", agent_id, "--api", remote.url, "--pin", remote.pin],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RELAYD_API_KEY": remote.key})
    assert res.returncode == 0, res.stderr
    detail = dict(ln.split(":", 1) for ln in res.stdout.splitlines())
    assert detail["status"].strip() == "online" and detail["offered"].strip() == "echo"
    tokens = remote.admin("join-tokens").stdout
    assert agent_id in tokens and " used " in tokens and token.split(".")[1][:20] not in tokens
    # A stream through the agent, held while the agent is revoked remotely.
    held = socket.create_connection(("127.0.0.1", remote.ports["echo"]), 5)
    try:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        t0 = time.monotonic()
        out = remote.admin("revoke-agent", agent_id).stdout
        assert out.startswith(f"revoked {agent_id}")
        held.settimeout(3)
        with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
            while held.recv(10):  # cut, not a clean end
                pass
        assert time.monotonic() - t0 < 3
    finally:
        held.close()
    assert f"{agent_id} " in remote.admin("agents").stdout and " revoked " in remote.admin("agents").stdout
    agent.p.wait(20)  # its certificate is refused from now on: it gives up
    assert agent.p.returncode != 0
    remote.intact()


def test_the_same_lines_with_data_and_with_api(remote):
    # Writes remotely, reads both ways (and the other way round).
    remote.admin("hc", "create", "orders/eu", "--response-timeout", "90s")
    key = remote.admin("hc", "rule", "add", "orders/eu", "--name", "eu-listen", "--rights", "listen").stdout
    assert key.startswith("added rule eu-listen (listen) to orders/eu") and "key: " in key
    remote.local("hc", "rule", "add", "--name", "root", "--rights", "send,listen")
    remote.admin("otp", "create", "--name", "cam-1")
    remote.local("join-token", "--endpoint", "by")
    def both(args):
        here = subprocess.run(RELAYD + ["admin", *args, "--data", str(remote.data)], capture_output=True, text=True,
                              timeout=60)
        there = remote.admin(*args, check=False)
        return args, (here.returncode, here.stdout, here.stderr), (there.returncode, there.stdout, there.stderr)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # (processes: their start-up is most of the time)
        answers = {" ".join(args[:2]): (here, there) for args, here, there in pool.map(both, (
            ["hc", "list"], ["join-tokens"], ["otp", "list"], ["user", "list"],
            ["hc", "connection-string", "orders/eu", "--name", "eu-listen"], ["agents", "ag-000000000000"]))}
    for what, (here, there) in answers.items():
        assert here == there, what
        assert here[0] == (1 if what.startswith("agents") else 0), here
    assert "eu-listen (listen)" in answers["hc list"][0][1] and "cam-1" in answers["otp list"][0][1]
    assert answers["hc connection-string"][0][1].startswith(
        f"Endpoint=sb://127.0.0.1:{remote.ports['https']}/;SharedAccessKeyName=eu-listen;")
    rows = remote.admin("endpoints").stdout.splitlines()
    by = next(r.split() for r in rows if r.startswith("by "))
    assert by[1] == "tcp" and by[2] == f"127.0.0.1:{remote.ports['by']}" and by[3] == "1" and int(by[-2]) > 0
    status = remote.admin("status").stdout
    assert "(read from its data directory)" not in status and "1 online" in status
    remote.admin("hc", "delete", "orders/eu")
    assert "orders/eu" not in remote.local("hc", "list")
    remote.intact()


def _raw(remote, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    import http.client
    import ssl

    c = http.client.HTTPSConnection("127.0.0.1", remote.ports["https"],
                                    context=ssl.create_default_context(cafile=remote.ca), timeout=15)
    try:
        c.request(method, "/api/v1" + path, body, headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


KEY = {"Authorization": "KEY"}
JSONH = {"Authorization": "KEY", "Content-Type": "application/json"}
# (what, method, path, body, headers, status, error, route)
HOSTILE = [
    ("no key", "GET", "/admin/agents", None, {}, 401, "unauthorized", "/admin/agents"),
    ("wrong key", "POST", "/admin/join-tokens", b"{}", {"Authorization": "Bearer rak_" + MARKER,
                                                       "Content-Type": "application/json"}, 401, "unauthorized",
     "/admin/join-tokens"),
    ("not JSON", "POST", "/admin/join-tokens", MARKER.encode(), JSONH, 400, "bad_json", "/admin/join-tokens"),
    ("not an object", "POST", "/admin/hybrid-connections", b'["x"]', JSONH, 400, "bad_request",
     "/admin/hybrid-connections"),
    ("unknown field", "POST", "/admin/join-tokens", b'{"secret": "' + MARKER.encode() + b'"}', JSONH, 422,
     "invalid", "/admin/join-tokens"),
    ("wrong type", "POST", "/admin/hybrid-rules", b'{"name": 7, "rights": "all"}', JSONH, 422, "invalid",
     "/admin/hybrid-rules"),
    ("a body where none is taken", "POST", "/admin/agents/ag-000000000000/revoke", b'{"x": 1}', JSONH, 400,
     "bad_request", "/admin/agents/{agent_id}/revoke"),
    ("form media type", "POST", "/admin/hybrid-connections", b"path=x",
     {"Authorization": "KEY", "Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type",
     "/admin/hybrid-connections"),
    ("oversized body", "POST", "/admin/hybrid-connections", b'{"path": "' + b"a" * (3 << 20) + b'"}', JSONH, 413,
     "too_large", "/admin/hybrid-connections"),
    ("unknown agent", "POST", "/admin/agents/ag-ffffffffffff/revoke", None, KEY, 404, "not_found",
     "/admin/agents/{agent_id}/revoke"),
    ("an id that cannot be one", "GET", "/admin/agents/" + "%3C" * 70, None, KEY, 404, "not_found",
     "/admin/agents/{agent_id}"),
    ("unknown join token", "DELETE", "/admin/join-tokens/AAAAAAAAAAAA", None, KEY, 404, "not_found",
     "/admin/join-tokens/{token_id}"),
    ("unknown hybrid connection", "DELETE", "/admin/hybrid-connections/nowhere", None, KEY, 404, "not_found",
     "/admin/hybrid-connections/{hc}"),
    ("unknown rule", "POST", "/admin/hybrid-rules/nobody/rotate", None, KEY, 404, "not_found",
     "/admin/hybrid-rules/{rule}/rotate"),
    ("a key in the query", "GET", "/admin/status?api_key=" + MARKER, None, KEY, 400, "credentials_in_query",
     "/admin/status"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_requests_refused_and_counted(remote, case):
    _, method, path, body, headers, status, code, route = case
    headers = {k: f"Bearer {remote.key}" if v == "KEY" else v for k, v in headers.items()}
    before = remote.api_count(route, method, status)
    st, data = _raw(remote, method, path, body, headers)
    assert st == status, data[:300]
    err = json.loads(data)
    assert err["error"] == code and set(err) == {"error", "message"} and MARKER not in err["message"]
    until_sync(lambda: remote.api_count(route, method, status) == before + 1, 5, "the refusal was not counted")
    remote.intact()


def test_the_command_line_refuses_clearly(remote):
    before = remote.api_count("/admin/agents", "GET", 401)
    res = remote.admin("agents", key="rak_" + MARKER, check=False)
    assert res.returncode == 1 and "wrong admin key" in res.stderr and "RELAYD_API_KEY" in res.stderr
    assert MARKER not in res.stderr and res.stdout == ""
    until_sync(lambda: remote.api_count("/admin/agents", "GET", 401) == before + 1, 5, "not counted")
    res = remote.admin("agents", key=None, check=False)
    assert res.returncode == 2 and "admin key" in res.stderr
    res = subprocess.run(RELAYD + ["admin", "agents", "--api", remote.url, "--pin", "sha256:" + "0" * 64],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "RELAYD_API_KEY": remote.key})
    assert res.returncode == 1 and "pin" in res.stderr and res.stdout == ""
    res = subprocess.run(RELAYD + ["admin", "agents", "--api", remote.url], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "RELAYD_API_KEY": remote.key, "SSL_CERT_FILE": os.devnull})
    assert res.returncode == 1 and "does not verify" in res.stderr
    res = remote.admin("revoke-agent", "ag-ffffffffffff", check=False)
    assert res.returncode == 1 and "no agent 'ag-ffffffffffff'" in res.stderr
    res = remote.admin("join-token", "--ttl", "soon", check=False)
    assert res.returncode == 2 and "ttl" in res.stderr
    res = remote.admin("hc", "create", "bad//path", check=False)
    assert res.returncode == 2 and "hybrid connection path" in res.stderr
    res = remote.admin("agents", "--data", str(remote.data), check=False)
    assert res.returncode == 2 and "--data DIR" in res.stderr
    res = subprocess.run(RELAYD + ["admin", "agents", "--api", f"https://127.0.0.1:{free_port()}", "--ca",
                                   remote.ca], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RELAYD_API_KEY": remote.key})
    assert res.returncode == 75 and "cannot reach" in res.stderr
    assert "Traceback" not in res.stderr
    remote.intact()


def test_a_key_rotated_remotely(remote):
    new = remote.admin("api-key", "rotate").stdout.strip()
    remote.keys.add(new)
    old, remote.key = remote.key, new
    assert remote.admin("agents", key=old, check=False).returncode == 1
    assert remote.admin("agents").returncode == 0
    metrics_ok = urllib.request.urlopen(f"http://127.0.0.1:{remote.ports['metrics']}/metrics", timeout=5).status
    assert metrics_ok == 200
    remote.intact()
