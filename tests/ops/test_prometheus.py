"""The dashboard and the alert rules against a real Prometheus (issue 14
items 3 and 6): Debian's `prometheus`, on a loopback port with a scrape
interval of a second, scrapes a relay started from configs/ (relay.toml with
the [hybrid] of hybrid.toml and the [zerotrust] of zerotrust/relay.toml;
ports, data directory and a few settings overridden, below) while agents
started from configs/agent.toml, configs/zerotrust/agent.toml and
configs/device-agent.toml carry traffic: TCP and HTTP through the tunnel,
refused requests, a hybrid connection in both modes, zero-trust flows under
the policy of configs/zerotrust/policy.toml (imported with `relayd admin
policy import`), a device enrolled over EST and the device proxy.

Then every query of configs/grafana/relayd.json (with Grafana's variables
replaced) and every template variable must return data, and every alert of
configs/prometheus/relayd-alerts.yml is checked: the ones this test provokes
(an endpoint nobody serves, a dead scrape target, a certificate that expires
tomorrow, short agent certificates, a hybrid connection without listener,
Redis unreachable, an agent stopped...) must fire, the others must at least
evaluate over series relayd exports; Prometheus' own evaluation of the rule
file must report no error. The relay and the agents run with no new
privileges and no writable-executable memory, as the systemd units have them.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request

import pytest
import yaml

from relayd.client import hybrid
from relayd.net import run
from tests.adversarial.stack import EchoHandler, HttpService, serve
from tests.ops.test_configs import CONFIGS, alert_rules, dashboard_queries, metric_names, template_queries
from tests.tunnel.processes import RELAYD, cli, free_port, stop_pid, wait_port
from tests.waiting import until_sync

pytestmark = [pytest.mark.once,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus is not installed (Debian package prometheus; scripts/test.sh "
                                        "installs it)")]

#: The files of configs/ this test runs (test_configs.py checks the rest).
STARTED = ["relay.toml", "hybrid.toml", "zerotrust/relay.toml", "zerotrust/policy.toml", "agent.toml",
           "zerotrust/agent.toml", "device-agent.toml", "prometheus/prometheus.yml", "prometheus/relayd-alerts.yml",
           "grafana/relayd.json"]

#: Alerts this test provokes: each must fire.
FIRING = {"RelaydDown", "RelaydEndpointWithoutAgent", "RelaydAgentsOffline", "RelaydPublicConnectionsRefused",
          "RelaydHttpServerErrors", "RelaydHybridConnectionErrors", "RelaydHybridConnectionWithoutListener",
          "RelaydCertificateExpiresSoon", "RelaydAgentCertificateExpiresSoon", "RelaydEventBusErrors"}
#: Alerts that stay quiet here; their left side (before the comparison) must return data
#: (the series of a relayd bug and of running out of descriptors exist at 0 from the start).
QUIET = {"RelaydAgentLinkRefusals", "RelaydWebhookDeliveriesLost", "RelaydInternalErrors",
         "RelaydOutOfFileDescriptors"}

PASSWORD = "correct horse battery staple"
#: Grafana's variables as Prometheus gets them: All = ".*", a window that
#: holds the whole test for $__rate_interval.
GRAFANA = {"$__rate_interval": "5m", "$__interval": "5m", "$job": "relayd", "$instance": ".*", "$endpoint": ".*"}

# Run the way configs/systemd/*.service run them: NoNewPrivileges=yes and
# MemoryDenyWriteExecute=yes (prctl PR_SET_NO_NEW_PRIVS, PR_SET_MDWE), then relayd.
HARDENED = """
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
if libc.prctl(65, 1, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:  # EINVAL: a kernel before 6.3
    raise OSError(ctypes.get_errno(), "PR_SET_MDWE")
os.execv(sys.executable, [sys.executable, "-m", "relayd.cli"] + sys.argv[1:])
"""


class Hardened:
    """A relayd process run as the units run it; stopped by its PID."""

    def __init__(self, tmp, name: str, args: list[str]) -> None:
        self.name = name
        self.log = open(tmp / f"{name}.log", "w+b")
        self.p = subprocess.Popen([sys.executable, "-c", HARDENED] + args, stdout=self.log, stderr=self.log)

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> str:
        stop_pid(self.p)
        return self.text()


def toml_value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"


def toml_doc(doc: dict) -> str:
    return "".join(f"[{table}]\n" + "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in body.items())
                   for table, body in doc.items())


def short_lived_cert(tmp, name: str, days: float):
    """A self-signed certificate for ``name`` that expires in ``days``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


class Prometheus:
    """Debian's prometheus on a loopback port with a tmp storage directory,
    stopped by its PID."""

    def __init__(self, tmp, config: dict) -> None:
        self.port = free_port()
        path = tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log = open(tmp / "prometheus.log", "w+b")
        self.p = subprocess.Popen(["prometheus", f"--config.file={path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                  stdout=self.log, stderr=self.log)
        until_sync(self.ready, 30, lambda: "prometheus did not get ready:\n" + self.text(), interval=0.1)

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as exc:  # 400: a query that does not parse, with Prometheus' reason
            return json.load(exc)

    def targets(self) -> str:
        """The scrape targets' health, for failure messages."""
        return "\n".join(f"  {t['scrapeUrl']}: {t['health']} {t['lastError']}"
                         for t in self.api("targets")["data"]["activeTargets"])

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def stop(self) -> None:
        stop_pid(self.p)


def grafana(expr: str) -> str:
    for var, value in GRAFANA.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def left_side(expr: str) -> str:
    """The expression before its last comparison at the top level (an
    alert's value, before the threshold)."""
    depth, cut = 0, None
    for m in re.finditer(r"[()]|\s(>=|<=|==|!=|>|<)\s", expr):
        if m.group(0) == "(":
            depth += 1
        elif m.group(0) == ")":
            depth -= 1
        elif depth == 0:
            cut = m.start()
    assert cut is not None, f"no comparison in {expr}"
    return expr[:cut]


# -- traffic ----------------------------------------------------------------------------------


def tcp_echo(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.settimeout(10)
        payload = os.urandom(32 * 1024)
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            data = s.recv(65536)
            assert data, "the tunnel closed the echo early"
            got += data
        assert got == payload


def refused(port: int) -> None:
    """A connection to an endpoint nobody serves: closed or reset, no answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), 5) as s:
            s.settimeout(10)
            s.sendall(b"anyone?")
            assert s.recv(100) == b"", "a connection to an endpoint nobody serves got an answer"
    except ConnectionError:
        pass  # reset (closed with our bytes unread)


def https_request(port: int, ctx: ssl.SSLContext, host: str, target: str, headers: dict | None = None) -> int:
    with socket.create_connection(("127.0.0.1", port), 5) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as s:
        s.settimeout(15)
        head = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n"
        s.sendall(head.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def socks_connect(port: int, ip: str, dport: int) -> int:
    """A SOCKS5 CONNECT through `relayd connect`: the reply code (0 = the flow is up)."""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.settimeout(15)
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(ip) + dport.to_bytes(2, "big"))
        reply = s.recv(10)
        return reply[1] if len(reply) > 1 else -1


def api_call(port: int, ctx: ssl.SSLContext, key: str, method: str, path: str, doc=None) -> tuple[int, dict]:
    import http.client

    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=15)
    try:
        body = json.dumps(doc).encode() if doc is not None else None
        headers = {"Authorization": f"Bearer {key}", **({"Content-Type": "application/json"} if body else {})}
        c.request(method, path, body, headers)
        r = c.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if data and r.getheader("content-type", "").startswith("application/json")
                          else {})
    finally:
        c.close()


# -- the test -----------------------------------------------------------------------------------


def test_dashboard_queries_and_alert_rules_against_a_real_prometheus(tmp_path):
    ports = {k: free_port() for k in ("agents", "https", "metrics", "db", "spare", "dead", "redis", "device_api",
                                      "socks")}
    services = {"echo": serve(EchoHandler), "web": serve(HttpService), "device": serve(HttpService)}
    data = tmp_path / "relay"
    procs: list[Hardened] = []
    prom = connect = None
    try:
        # The relay: the examples merged, with what only a test may change.
        doc = tomllib.loads((CONFIGS / "relay.toml").read_text())
        doc["hybrid"] = tomllib.loads((CONFIGS / "hybrid.toml").read_text())["hybrid"]
        doc["zerotrust"] = tomllib.loads((CONFIGS / "zerotrust/relay.toml").read_text())["zerotrust"]
        providers = doc["zerotrust"].pop("providers")  # nested tables: written separately below
        soon = short_lived_cert(tmp_path, "soon.example", days=1)  # RelaydCertificateExpiresSoon
        doc["serve"].update(
            data=str(data), agents=f"127.0.0.1:{ports['agents']}", public=f"127.0.0.1:{ports['agents']}",
            https=f"127.0.0.1:{ports['https']}", metrics=f"127.0.0.1:{ports['metrics']}",
            tcp={"db": f"127.0.0.1:{ports['db']}", "spare": f"127.0.0.1:{ports['spare']}"},  # nobody serves spare
            http={**doc["serve"]["http"], "spareweb": "spare.example"},
            grace="0s",  # refusals at once, not after the example's 5 s
            agent_cert_ttl="2h",  # RelaydAgentCertificateExpiresSoon
            redis=f"redis://127.0.0.1:{ports['redis']}/0",  # nobody listens: RelaydEventBusErrors
            certs=[{"cert": soon[0], "key": soon[1]}])
        conf = tmp_path / "relay.toml"
        conf.write_text(toml_doc(doc) + "".join(f"[zerotrust.providers.{n}]\n" + "".join(
            f"{k} = {toml_value(v)}\n" for k, v in p.items()) for n, p in providers.items()))
        procs.append(Hardened(tmp_path, "relay", ["serve", "--config", str(conf)]))
        wait_port(ports["metrics"])
        wait_port(ports["https"])
        ca = str(data / "ca" / "ca.crt")
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False  # HTTP endpoints' names get the relay's certificate (no ACME here)
        admin_key = (data / "admin-api.key").read_text().strip()

        # Prometheus, from the example: every second, the relay and a dead target, the example's rules.
        pcfg = yaml.safe_load((CONFIGS / "prometheus/prometheus.yml").read_text())
        pcfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        pcfg["rule_files"] = [str(CONFIGS / "prometheus" / f) for f in pcfg["rule_files"]]
        pcfg.pop("alerting")  # no Alertmanager here: the alerts are read from the API
        (job,) = [j for j in pcfg["scrape_configs"] if j["job_name"] == "relayd"]
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{ports['metrics']}", f"127.0.0.1:{ports['dead']}"]
        pcfg["scrape_configs"] = [job]
        prom = Prometheus(tmp_path, pcfg)

        # The policy with the command, a user through the REST API.
        cli("admin", "policy", "import", str(CONFIGS / "zerotrust/policy.toml"), "--data", str(data))
        st, body = api_call(ports["https"], ctx, admin_key, "POST", "/api/v1/admin/users",
                            {"username": "eve", "password": PASSWORD, "groups": ["engineering"]})
        assert st == 201, body
        otp = json.loads(cli("admin", "otp", "create", "--name", "cam-01", "--json", "--data", str(data)).stdout)

        # The agents, from their examples.
        procs.append(Hardened(tmp_path, "agent", [
            "agent", "--config", str(CONFIGS / "agent.toml"), "--data", str(tmp_path / "agent"),
            "--join", cli("admin", "join-token", "--data", str(data)).stdout.strip(),
            "--endpoint", f"db=127.0.0.1:{services['echo'].server_address[1]}",
            "--endpoint", f"app=127.0.0.1:{services['web'].server_address[1]}"]))
        site = Hardened(tmp_path, "site-agent", [
            "agent", "--config", str(CONFIGS / "zerotrust/agent.toml"), "--data", str(tmp_path / "site"),
            "--join", cli("admin", "join-token", "--data", str(data)).stdout.strip(),
            "--site", "s-lab=127.0.0.0/8"])  # so that an allowed flow to the lab is refused at once here
        procs.append(site)
        procs.append(Hardened(tmp_path, "device", [
            "agent", "--config", str(CONFIGS / "device-agent.toml"), "--data", str(tmp_path / "device"),
            "--otp", otp["otp"], "--est", f"https://127.0.0.1:{ports['https']}", "--pin", otp["ca_sha256"],
            "--device-api", f"127.0.0.1:{ports['device_api']}",
            "--endpoint", f"device=127.0.0.1:{services['device'].server_address[1]}"]))

        def scraped(name: str) -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5).read().decode()
            return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

        until_sync(lambda: scraped("relayd_active_listeners") == 3 and scraped("relayd_devices_online") == 1, 30,
                   lambda: "the agents did not connect:\n" + "\n".join(p.text()[-1500:] for p in procs))

        async def traffic():
            def every_kind():  # what the loop repeats: rates need more than one scrape
                tcp_echo(ports["db"])
                refused(ports["spare"])
                assert https_request(ports["https"], ctx, "app.example.com", "/x") == 200
                for _ in range(4):  # RelaydHttpServerErrors: more than 0.1/s over its 5 minutes
                    assert https_request(ports["https"], ctx, "spare.example", "/") == 503

            base = f"Endpoint=sb://127.0.0.1:{ports['https']}/;SharedAccessKeyName="
            hc = {r["name"]: r["key"] for c in doc["hybrid"]["connections"] for r in c["rules"]}
            orders_listen = hybrid.parse_connection_string(
                base + f"orders-listen;SharedAccessKey={hc['orders-listen']};EntityPath=orders")
            orders_send = hybrid.parse_connection_string(
                base + f"orders-send;SharedAccessKey={hc['orders-send']};EntityPath=orders")
            ingest = hybrid.parse_connection_string(
                base + f"ingest;SharedAccessKey={hc['ingest']};EntityPath=telemetry/ingest")
            wrong = hybrid.parse_connection_string(
                base + "orders-listen;SharedAccessKey=not-the-key-of-orders-listen;EntityPath=orders")

            async def echo(ws):
                async for message in ws:
                    await ws.send(message)

            async def answer(request):
                return hybrid.Response(200, {"content-type": "text/plain"}, b"got " + request.body)

            listener = hybrid.Listener(orders_listen, on_accept=echo, on_request=answer, ssl=ctx)
            running = asyncio.get_running_loop().create_task(listener.run())
            await asyncio.wait_for(listener.online.wait(), 10)
            async with await hybrid.connect(orders_send, ssl=ctx) as ws:  # a WebSocket sender, accepted
                await ws.send(b"order 1")
                assert await ws.recv() == b"order 1"
            status, _, body = await hybrid.request(orders_send, "POST", "/lines", b"2 lines", ssl=ctx)
            assert (status, body) == (200, b"got 2 lines")
            with pytest.raises(hybrid.HandshakeRefused) as refused_listener:  # a listener with a wrong key
                await hybrid.Listener(wrong, ssl=ctx).run()
            assert refused_listener.value.status == 401
            await listener.close()  # RelaydHybridConnectionWithoutListener from now on
            await asyncio.wait_for(running, 10)
            with pytest.raises(hybrid.HandshakeRefused):  # no listener any more: 404 for a WebSocket sender
                await hybrid.connect(orders_send, ssl=ctx)

            # Zero-trust: eve signs in (and someone with a wrong password does not), then two flows.
            login = await asyncio.to_thread(
                subprocess.run, RELAYD + ["login", f"https://127.0.0.1:{ports['https']}", "--user", "eve",
                                          "--password-stdin", "--ca", ca, "--data", str(tmp_path / "eve")],
                input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
            assert login.returncode == 0, login.stderr
            bad = await asyncio.to_thread(
                subprocess.run, RELAYD + ["login", f"https://127.0.0.1:{ports['https']}", "--user", "eve",
                                          "--password-stdin", "--ca", ca, "--data", str(tmp_path / "mallory")],
                input="guess\n", capture_output=True, text=True, timeout=60)
            assert bad.returncode != 0
            nonlocal connect
            connect = subprocess.Popen(RELAYD + ["connect", "--data", str(tmp_path / "eve"), "--socks",
                                                 f"127.0.0.1:{ports['socks']}"],
                                       stdout=subprocess.DEVNULL, stderr=open(tmp_path / "connect.log", "wb"))
            await asyncio.to_thread(wait_port, ports["socks"], 30)
            # The policy allows engineers the lab's web servers (the gateway says yes; the site agent
            # here then refuses to dial: outside its networks), and nothing on port 22.
            await asyncio.to_thread(socks_connect, ports["socks"], "10.20.1.10", 443)
            assert await asyncio.to_thread(socks_connect, ports["socks"], "10.20.9.9", 22) != 0

            # The device proxy without a token; the REST API; garbage on the agents port.
            device_id = json.loads((tmp_path / "device" / "identity.json").read_text())["agent_id"]
            assert await asyncio.to_thread(https_request, ports["https"], ctx, "127.0.0.1",
                                           f"/api/v1/devices/{device_id}/proxy/") == 401
            st, _ = await asyncio.to_thread(api_call, ports["https"], ctx, admin_key, "GET", "/api/v1/admin/users")
            assert st == 200
            with socket.create_connection(("127.0.0.1", ports["agents"]), 5) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                s.settimeout(10)
                s.recv(100)

            loop_until = time.monotonic() + 5
            rounds = 0
            while time.monotonic() < loop_until or rounds < 10:
                rounds += 1
                await asyncio.to_thread(every_kind)
                status, _, _ = await hybrid.request(ingest, "POST", "/t", b"{}", ssl=ctx)
                assert status == 502  # HTTP mode, no listener: RelaydHybridConnectionErrors
                await asyncio.sleep(0.2)

        run(traffic())
        # RelaydAgentsOffline: one of the three agents goes.
        site.stop()
        until_sync(lambda: prom.query("sum(relayd_active_listeners)")["data"]["result"][0]["value"][1] == "2", 20,
                   "Prometheus did not see the site agent go", ignore=(IndexError, KeyError, OSError))

        # Every dashboard query and template variable returns data.
        problems: dict[str, str] = {}

        def check_dashboard() -> bool:
            problems.clear()
            for title, expr in dashboard_queries():
                res = prom.query(grafana(expr))
                if res["status"] != "success":
                    problems[f"{title}: {expr}"] = res.get("error", "")
                elif not res["data"]["result"]:
                    problems[f"{title}: {expr}"] = "no data"
            for q in template_queries():
                m = re.fullmatch(r"label_values\((.+), (\w+)\)", q)
                res = prom.api(f"label/{m.group(2)}/values", **{"match[]": grafana(m.group(1))})
                if not res.get("data"):
                    problems[q] = "no values"
            return not problems

        until_sync(check_dashboard, 30, lambda: "dashboard queries without data:\n" + "\n".join(
            f"  {k}\n    -> {v}" for k, v in problems.items()) + "\nscrapes:\n" + prom.targets(), interval=1)

        # The policy judged both flows: the engineer's to the lab's web servers, and port 22.
        verdicts = {r["metric"]["verdict"] for r in prom.query(
            'relayd_zt_flow_decisions_total{site="s-lab"} > 0')["data"]["result"]}
        assert {"allow", "deny"} <= verdicts, verdicts

        # The alerts.
        rules = {r["alert"]: r for r in alert_rules()}
        assert set(rules) == FIRING | QUIET, "classify every alert of the rule file in this test"
        meta = prom.api("targets/metadata", match_target='{job="relayd"}')["data"]
        families = {m["metric"] for m in meta}

        def check_alerts() -> bool:
            problems.clear()
            for name, rule in rules.items():
                expr = rule["expr"]
                res = prom.query(expr)
                if res["status"] != "success":
                    problems[name] = res.get("error", "")
                elif name in FIRING and not res["data"]["result"]:
                    problems[name] = "did not fire"
                elif name in QUIET and not prom.query(left_side(expr))["data"]["result"]:
                    problems[name] = f"no data for {left_side(expr)}"
                missing = {n for n in metric_names(expr)
                           if re.sub(r"_(bucket|sum|count)$", "", n) not in families}
                if missing:
                    problems[name] = f"not in the relay's exposition: {missing}"
            return not problems

        until_sync(check_alerts, 30, lambda: "alerts:\n" + "\n".join(f"  {k}: {v}" for k, v in problems.items()),
                   interval=1)
        # Prometheus evaluates the rule file itself: no rule errs, the provoked ones are pending or firing.
        groups = prom.api("rules")["data"]["groups"]
        evaluated = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(evaluated) == set(rules)
        assert all(r["health"] == "ok" for r in evaluated.values()), {
            n: r.get("lastError") for n, r in evaluated.items() if r["health"] != "ok"}

        def active() -> set[str]:
            return {a["labels"]["alertname"] for a in prom.api("alerts")["data"]["alerts"]}

        until_sync(lambda: FIRING <= active(), 20, lambda: f"not pending or firing: {FIRING - active()}", interval=1)
    finally:
        logs = {}
        if connect is not None:
            stop_pid(connect)
            logs["connect"] = (tmp_path / "connect.log").read_text(errors="replace")
        for p in reversed(procs):
            logs[p.name] = p.stop()
        if prom is not None:
            prom.stop()
        for srv in services.values():
            srv.shutdown()
            srv.server_close()
    for who, text in logs.items():
        assert "Traceback" not in text, f"{who} printed a traceback:\n{text[-3000:]}"
        assert PASSWORD not in text and admin_key not in text and otp["otp"] not in text, f"a secret in {who}'s log"
