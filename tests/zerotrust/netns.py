"""Two network namespaces for the TUN-mode tests and bench: a site (relay,
agent and services) and a client, joined by a veth pair. Everything is
made here and removed after; addresses exist only inside them:

  client ns: veth 10.77.0.2/24
  site ns:   veth 10.77.0.1/24 (the relay's HTTPS port); 10.78.0.1 and
             10.78.0.2 on its loopback device (the site's services)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
