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
import subprocess
import sys
import time

import pytest

from tests.waiting import until_sync
from tests.zerotrust import netns
from tests.zerotrust.netns import OTHER_IP, SERVICE_IP, TunSite

pytestmark = pytest.mark.skipif(netns.usable() is not None, reason=netns.usable() or "")

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
    # 2 MB in segments of at most 1360 bytes, and their acknowledgements.
    for direction in ("out", "in"):
        until_sync(lambda: tun_site.metric("relayd_zt_packets_total", direction=direction, result="passed") > 1000,
                   10, lambda: f"{direction}: {tun_site.metric('relayd_zt_packets_total', direction=direction)}")


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
