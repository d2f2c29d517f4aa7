"""Two network namespaces for the TUN-mode tests and bench: a site (relay,
agent and services) and a client, joined by a veth pair. Everything is
made here and removed after; addresses exist only inside them:

  client ns: veth 10.77.0.2/24
  site ns:   veth 10.77.0.1/24 (the relay's HTTPS port); 10.78.0.1 and
             10.78.0.2 on its loopback device (the site's services)

``TunSite`` runs relayd in them as people do (processes): `relayd serve`
(gateway of site s-tun), `relayd agent --site` and echo services in the
site namespace, `relayd login` and `relayd connect --tun` in the client's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from relayd.control.policy import Policy, to_toml
from tests.tunnel.processes import free_port
from tests.waiting import until_sync

ROOT = Path(__file__).resolve().parents[2]
RELAY_IP, CLIENT_IP = "10.77.0.1", "10.77.0.2"
SERVICE_IP, OTHER_IP = "10.78.0.1", "10.78.0.2"


def usable() -> str | None:
    """Why the namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    if not shutil.which("ip") or not os.path.exists("/dev/net/tun"):
        return "needs iproute2 and /dev/net/tun"
    return None


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {res.stderr.strip()}")
    return res


class Namespaces:
    def __init__(self, tag: str | None = None) -> None:
        tag = tag or str(os.getpid())
        self.site, self.client = f"rzt{tag}s", f"rzt{tag}c"
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Namespaces":
        try:
            self._make()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _make(self) -> None:
        s, c = self.site, self.client
        sh("ip", "netns", "add", s)
        sh("ip", "netns", "add", c)
        sh("ip", "link", "add", "vs" + s[3:14], "type", "veth", "peer", "name", "vc" + c[3:14])
        vs, vc = "vs" + s[3:14], "vc" + c[3:14]
        sh("ip", "link", "set", vs, "netns", s)
        sh("ip", "link", "set", vc, "netns", c)
        self.run(s, "ip", "addr", "add", RELAY_IP + "/24", "dev", vs)
        self.run(c, "ip", "addr", "add", CLIENT_IP + "/24", "dev", vc)
        for ns, dev in ((s, vs), (c, vc)):
            self.run(ns, "ip", "link", "set", "lo", "up")
            self.run(ns, "ip", "link", "set", dev, "up")
        # The site's services: addresses on the site's loopback device (the
        # kernel here may lack the dummy device type).
        self.run(s, "ip", "addr", "add", SERVICE_IP + "/32", "dev", "lo")
        self.run(s, "ip", "addr", "add", OTHER_IP + "/32", "dev", "lo")

    def run(self, ns: str, *args: str, check: bool = True, timeout: float = 60,
            stdin: str | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(("ip", "netns", "exec", ns) + args, capture_output=True, text=True, timeout=timeout,
                             cwd=ROOT, input=stdin)
        if check and res.returncode != 0:
            raise RuntimeError(f"[{ns}] {' '.join(args)}: {res.stderr.strip()[-2000:]}")
        return res

    def py(self, ns: str, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(ns, sys.executable, *args, **kw)

    def start(self, ns: str, *args: str, log: Path | None = None, stdin=subprocess.DEVNULL) -> subprocess.Popen:
        out = open(log, "wb") if log else subprocess.DEVNULL
        p = subprocess.Popen(("ip", "netns", "exec", ns) + args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                             stdin=stdin)
        self.procs.append(p)
        return p

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for ns in (self.site, self.client):
            sh("ip", "netns", "del", ns, check=False)


RELAYD = (sys.executable, "-m", "relayd.cli")
PASSWORD = "tun mode password"


def policy_toml() -> str:
    doc = {
        "sites": [{"id": "s-tun", "networks": ["10.78.0.0/24"]}],
        "conditions": [{"id": "c-why", "criteria": [{"reason": True, "suffix": "why", "max_age": "10m", "min_len": 5}],
                        "remedies": [{"type": "reason", "suffix": "why", "message": "Why do you need port 9003"}]}],
        "entitlements": [
            {"id": "e-tun", "site": "s-tun", "tags": ["t"], "actions": [
                {"action": "allow", "proto": "tcp", "hosts": [SERVICE_IP], "ports": ["9000", "5201"]},
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
    def __init__(self, ns: Namespaces, tmp, tun_mtu: int = 1400) -> None:
        self.ns, self.tmp = ns, tmp
        self.tun_mtu = tun_mtu
        self.data = tmp / "relay"
        self.metrics_port = free_port()
        self.https = f"{RELAY_IP}:{free_port()}"
        # Plain relay endpoints to the same services (the peer in bench/zerotrust/tun.py).
        self.endpoints = {"echo": (f"{RELAY_IP}:{free_port()}", f"{SERVICE_IP}:9000"),
                          "iperf": (f"{RELAY_IP}:{free_port()}", f"{SERVICE_IP}:5201")}

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
        conf.write_text(f'[zerotrust]\nsite = "s-tun"\ntun_pool = "100.96.0.0/24"\ntun_mtu = {self.tun_mtu}\n')
        ns.start(ns.site, *RELAYD, "serve", "--config", str(conf), "--data", str(self.data), "--agents",
                 f"127.0.0.1:{free_port()}", "--https", self.https, "--hostname", RELAY_IP,
                 "--metrics", f"127.0.0.1:{self.metrics_port}",
                 *(a for n, (pub, _) in self.endpoints.items() for a in ("--tcp", f"{n}={pub}")), log=tmp / "relay.log")
        until_sync(lambda: (self.data / "relay.json").is_file(), 30, "the relay did not start")
        (tmp / "policy.toml").write_text(policy_toml())
        self.admin("policy", "import", str(tmp / "policy.toml"))
        self.admin("user", "add", "alice", "--group", "staff", "--password-stdin", stdin=PASSWORD + "\n")
        token = self.admin("join-token").strip()
        agent_conf = tmp / "agent.toml"
        agent_conf.write_text('[agent]\nsite_tun = "rzt-site"\n')
        ns.start(ns.site, *RELAYD, "agent", "--config", str(agent_conf), "--data", str(tmp / "agent"), "--join",
                 token, "--site", "s-tun=10.78.0.0/24",
                 *(a for n, (_, svc) in self.endpoints.items() for a in ("--endpoint", f"{n}={svc}")),
                 log=tmp / "agent.log")
        until_sync(lambda: " online " in self.admin("agents") or None, 30, "the agent did not come online")
        ns.run(ns.client, *RELAYD, "login", f"https://{self.https}", "--user", "alice", "--password-stdin",
               "--ca", str(self.data / "ca" / "ca.crt"), "--data", str(tmp / "client"), stdin=PASSWORD + "\n")
        self.client = ns.start(ns.client, *RELAYD, "connect", "--data", str(tmp / "client"), "--tun", "rzt0",
                               "--socks", "127.0.0.1:0", log=tmp / "connect.log", stdin=subprocess.PIPE)
        until_sync(lambda: "TUN rzt0" in self.connect_log() or None, 30,
                   lambda: "relayd connect did not bring up its TUN device:\n" + self.connect_log())

    @property
    def socks(self) -> str:
        return re.search(r"SOCKS5 proxy on (\S+);", self.connect_log()).group(1)

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
