"""Debian's pebble (Let's Encrypt's ACME test server) and pebble-challtestsrv
(its mock DNS) on free loopback ports, started and stopped by PID.

pebble validates for real: it resolves each name through the mock DNS
(every name answers 127.0.0.1, no AAAA) and connects to the relay's
plain-HTTP port (http-01) or HTTPS port (tls-alpn-01), which its config
names. PEBBLE_VA_ALWAYS_VALID is never set; PEBBLE_VA_NOSLEEP only removes
its random 0-15 s wait before validating, PEBBLE_AUTHZREUSE=0 makes every
order prove control again.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest

from relayd.control.ca import CertificateAuthority
from tests.tunnel.processes import free_port, stop_pid
from tests.waiting import listening, until_sync


def need_pebble() -> None:
    for tool in ("pebble", "pebble-challtestsrv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package pebble; scripts/test.sh installs it)")


class Pebble:
    """One pebble and its DNS. ``ca_file`` is what the relay's acme.ca must
    trust (the CA of pebble's own HTTPS certificate, made here);
    ``directory`` is the ACME directory URL."""

    def __init__(self, tmp: Path, http_port: int, tls_port: int, *, validity: int | None = None,
                 blocklist: tuple[str, ...] = (), port: int | None = None) -> None:
        need_pebble()
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority.load_or_create(self.tmp / "pebble-tls-ca", name="pebble test TLS CA")
        chain, key = ca.issue_server_cert(["127.0.0.1", "localhost"])
        (self.tmp / "pebble.crt").write_bytes(chain)
        (self.tmp / "pebble.key").write_bytes(key)
        self.ca_file = ca.cert_path
        self.port = port or free_port()
        self.mgmt_port = free_port()
        self.dns_port = free_port()
        self.dns_mgmt_port = free_port()
        cfg = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}", "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(self.tmp / "pebble.crt"), "privateKey": str(self.tmp / "pebble.key"),
            "httpPort": http_port, "tlsPort": tls_port, "ocspResponderURL": "",
            "externalAccountBindingRequired": False, "domainBlocklist": list(blocklist)}}
        if validity is not None:
            cfg["pebble"]["certificateValidityPeriod"] = validity
        (self.tmp / "pebble.json").write_text(json.dumps(cfg))
        self.directory = f"https://127.0.0.1:{self.port}/dir"
        self.procs: list[subprocess.Popen] = []
        self.log = open(self.tmp / "pebble.log", "ab")

    def start(self) -> "Pebble":
        dns = subprocess.Popen(
            ["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
             "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-management", f"127.0.0.1:{self.dns_mgmt_port}"], stdout=self.log, stderr=self.log)
        self.procs.append(dns)
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_AUTHZREUSE="0")
        env.pop("PEBBLE_VA_ALWAYS_VALID", None)
        self.procs.append(subprocess.Popen(
            ["pebble", "-config", str(self.tmp / "pebble.json"), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            stdout=self.log, stderr=self.log, env=env))
        until_sync(lambda: listening(self.port) and listening(self.dns_mgmt_port), 15,
                   lambda: "pebble did not start:\n" + self.output())
        return self

    def stop_acme(self) -> None:
        """Stop pebble itself (the ACME server), keep the DNS."""
        for p in self.procs[1:]:
            stop_pid(p)
        self.procs = self.procs[:1]

    def restart_acme(self) -> None:
        """A new pebble on the same ports: it knows no account or order."""
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_AUTHZREUSE="0")
        env.pop("PEBBLE_VA_ALWAYS_VALID", None)
        self.procs.append(subprocess.Popen(
            ["pebble", "-config", str(self.tmp / "pebble.json"), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            stdout=self.log, stderr=self.log, env=env))
        until_sync(lambda: listening(self.port), 15, lambda: "pebble did not restart:\n" + self.output())

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_pid(p)
        self.procs = []
        self.log.close()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.tmp / "pebble.log").read_text(errors="replace")[-4000:]

    def roots(self) -> bytes:
        """pebble's issuing root (made afresh at each start), PEM."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(f"https://127.0.0.1:{self.mgmt_port}/roots/0", context=ctx, timeout=10) as r:
            return r.read()

    def __enter__(self) -> "Pebble":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
