"""TUN mode end to end, in two network namespaces the test makes (see
netns.py): `relayd serve` (the site's gateway), `relayd agent --site` and
the services in the site namespace; `relayd login` and `relayd connect
--tun` in the client namespace. Programs in the client namespace reach the
site's services by plain sockets: TCP, UDP and ICMP that the user's
entitlements allow pass; a denied or blocked flow is refused at once (ICMP
administratively prohibited, so connect() fails instead of hanging); a
flow behind a reason condition gets through once the user answers the
prompt of `relayd connect`; a kill from `relayd admin revoke` stops a live
TCP flow."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from relayd.control.policy import Policy, to_toml
from tests.tunnel.processes import free_port
from tests.waiting import until_sync
from tests.zerotrust import netns
from tests.zerotrust.netns import OTHER_IP, RELAY_IP, SERVICE_IP

pytestmark = pytest.mark.skipif(netns.usable() is not None, reason=netns.usable() or "")

RELAYD = (sys.executable, "-m", "relayd.cli")
PASSWORD = "tun mode password"


def policy_toml() -> str:
    doc = {
        "sites": [{"id": "s-tun", "networks": ["10.78.0.0/24"]}],
        "conditions": [{"id": "c-why", "criteria": [{"reason": True, "suffix": "why", "max_age": "10m", "min_len": 5}],
                        "remedies": [{"type": "reason", "suffix": "why", "message": "Why do you need port 9003"}]}],
        "entitlements": [
            {"id": "e-tun", "site": "s-tun", "tags": ["t"], "actions": [
                {"action": "allow", "proto": "tcp", "hosts": [SERVICE_IP], "ports": ["9000"]},
                {"action": "allow", "proto": "udp", "hosts": [SERVICE_IP], "ports": ["9000"]},
                {"action": "allow", "proto": "icmp", "hosts": [SERVICE_IP], "types": ["8"]},
                {"action": "block", "proto": "tcp", "hosts": [SERVICE_IP], "ports": ["9002"]}]},
            {"id": "e-why", "site": "s-tun", "tags": ["t"], "conditions": ["c-why"], "actions": [
                {"action": "allow", "proto": "tcp", "hosts": [SERVICE_IP], "ports": ["9003"]}]},
        ],
        "policies": [{"id": "p-staff", "match": {"criteria": [{"claim": "user.groups", "op": "contains",
                                                                "value": "staff"}]},
                      "entitlement_tags": ["t"]}],
    }
    return to_toml(Policy.from_doc(doc).to_doc())


class TunSite:
    def __init__(self, ns: netns.Namespaces, tmp) -> None:
        self.ns, self.tmp = ns, tmp
        self.data = tmp / "relay"
        self.metrics_port = free_port()
        self.https = f"{RELAY_IP}:{free_port()}"

    def admin(self, *args: str, stdin: str | None = None) -> str:
        res = subprocess.run(RELAYD + ("admin",) + args + ("--data", str(self.data)), capture_output=True, text=True,
                             timeout=60, input=stdin)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def start(self) -> None:
        ns, tmp = self.ns, self.tmp
        ns.start(ns.site, sys.executable, "-m", "tests.zerotrust.netns_tools", "serve", f"{SERVICE_IP}:9000",
                 f"{SERVICE_IP}:9002", f"{SERVICE_IP}:9003", f"{OTHER_IP}:9000", log=tmp / "services.log")
        conf = tmp / "relay.toml"
        conf.write_text('[zerotrust]\nsite = "s-tun"\ntun_pool = "100.96.0.0/24"\n')
        ns.start(ns.site, *RELAYD, "serve", "--config", str(conf), "--data", str(self.data), "--agents",
                 f"127.0.0.1:{free_port()}", "--https", self.https, "--hostname", RELAY_IP,
                 "--metrics", f"127.0.0.1:{self.metrics_port}", log=tmp / "relay.log")
        until_sync(lambda: (self.data / "relay.json").is_file(), 30, "the relay did not start")
        (tmp / "policy.toml").write_text(policy_toml())
        self.admin("policy", "import", str(tmp / "policy.toml"))
        self.admin("user", "add", "alice", "--group", "staff", "--password-stdin", stdin=PASSWORD + "\n")
        token = self.admin("join-token").strip()
        agent_conf = tmp / "agent.toml"
        agent_conf.write_text('[agent]\nsite_tun = "rzt-site"\n')
        ns.start(ns.site, *RELAYD, "agent", "--config", str(agent_conf), "--data", str(tmp / "agent"), "--join",
                 token, "--site", "s-tun=10.78.0.0/24", log=tmp / "agent.log")
        until_sync(lambda: " online " in self.admin("agents") or None, 30, "the agent did not come online")
        ns.run(ns.client, *RELAYD, "login", f"https://{self.https}", "--user", "alice", "--password-stdin",
               "--ca", str(self.data / "ca" / "ca.crt"), "--data", str(tmp / "client"), stdin=PASSWORD + "\n")
        self.client = ns.start(ns.client, *RELAYD, "connect", "--data", str(tmp / "client"), "--tun", "rzt0",
                               "--socks", "127.0.0.1:0", log=tmp / "connect.log", stdin=subprocess.PIPE)
        until_sync(lambda: "TUN rzt0" in self.connect_log() or None, 30,
                   lambda: "relayd connect did not bring up its TUN device:\n" + self.connect_log())

    def connect_log(self) -> str:
        return (self.tmp / "connect.log").read_text(errors="replace")

    def probe(self, *args: str, timeout: float = 40) -> str:
        return self.ns.py(self.ns.client, "-m", "tests.zerotrust.netns_tools", *args, timeout=timeout).stdout.strip()

    def metric(self, name: str, **labels: str) -> float:
        text = self.ns.py(self.ns.site, "-c", f"import urllib.request;print(urllib.request.urlopen("
                                              f"'http://127.0.0.1:{self.metrics_port}/metrics').read().decode())").stdout
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
            if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
                total += float(m.group(2))
        return total


@pytest.fixture(scope="module")
def tun_site(tmp_path_factory):
    with netns.Namespaces() as ns:
        s = TunSite(ns, tmp_path_factory.mktemp("tun"))
        s.start()
        yield s


def test_allowed_tcp_udp_and_icmp_pass_through_the_tun_device(tun_site):
    out = tun_site.probe("tcp", SERVICE_IP, "9000", "2000000")
    assert out.startswith("ok"), out + "\n" + tun_site.connect_log()
    assert tun_site.probe("udp", SERVICE_IP, "9000") == "ok"
    assert tun_site.probe("ping", SERVICE_IP) == "ok"
    assert tun_site.metric("relayd_zt_packets_total", direction="out", result="passed") > 1000
    assert tun_site.metric("relayd_zt_packets_total", direction="in", result="passed") > 1000


def test_denied_and_blocked_flows_fail_at_once_and_are_audited(tun_site):
    for host, port, verdict in ((SERVICE_IP, "9002", "block"), (OTHER_IP, "9000", "deny"), (SERVICE_IP, "9001", "deny")):
        before = tun_site.metric("relayd_zt_flow_decisions_total", verdict=verdict)
        out = tun_site.probe("tcp", host, port, "1000")
        status, why, seconds = out.split()
        assert (status, why) == ("error", "EHOSTUNREACH"), out
        assert float(seconds) < 3.0, out  # refused, not left to time out
        assert tun_site.metric("relayd_zt_flow_decisions_total", verdict=verdict) > before
    audit = [json.loads(line) for line in (tun_site.tmp / "relay.log").read_text().splitlines()
             if '"access decision"' in line]
    assert {(a["verdict"], a["proto"], a["dst"], a["port"]) for a in audit} >= {
        ("block", "tcp", SERVICE_IP, 9002), ("deny", "tcp", OTHER_IP, 9000), ("allow", "tcp", SERVICE_IP, 9000)}
    assert all(a["user"] == "alice" and a["site"] == "s-tun" for a in audit)
    assert tun_site.probe("udp", OTHER_IP, "9000") == "timeout"
    assert tun_site.metric("relayd_zt_packets_total", direction="out", result="deny") > 0
    # The agent's host answers pings on 10.78.0.2 too; the user may not send them.
    assert tun_site.probe("ping", OTHER_IP) == "timeout"


def test_a_reason_step_up_lets_the_retransmitted_syn_through(tun_site):
    p = subprocess.Popen(("ip", "netns", "exec", tun_site.ns.client, sys.executable, "-m",
                          "tests.zerotrust.netns_tools", "tcp", SERVICE_IP, "9003", "1000"),
                         stdout=subprocess.PIPE, text=True, cwd=netns.ROOT)
    try:
        until_sync(lambda: "Why do you need port 9003" in tun_site.connect_log() or None, 15,
                   lambda: "no prompt:\n" + tun_site.connect_log())
        tun_site.client.stdin.write(b"ticket OPS-7: tun test\n")
        tun_site.client.stdin.flush()
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert out.startswith("ok"), out + "\n" + tun_site.connect_log()


def test_a_kill_stops_a_live_tun_flow_within_a_second(tun_site):
    p = subprocess.Popen(("ip", "netns", "exec", tun_site.ns.client, sys.executable, "-m",
                          "tests.zerotrust.netns_tools", "hold", SERVICE_IP, "9000", "20"),
                         stdout=subprocess.PIPE, text=True, cwd=netns.ROOT)
    try:
        assert p.stdout.readline().strip() == "up"
        time.sleep(0.5)
        tun_site.admin("revoke", "kill", "--user", "alice", "--reason", "tun test")
        t0 = time.monotonic()  # the entry is in the store
        line = p.stdout.readline().strip()
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    assert line.startswith("cut "), line
    # The kill reaches the gateway through its 0.25 s poll (the cut is within
    # a second); the probe notices a missing answer after 0.3 s more.
    assert float(line.split()[1]) - t0 < 1.0 + 0.3, (line, t0)
    assert "tun test" in tun_site.connect_log()  # the client is told why
