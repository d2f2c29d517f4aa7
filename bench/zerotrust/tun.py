"""Zero-trust TUN mode and flow opening against their peers, in one run
(issue 12, item 7), in the two network namespaces of
tests/zerotrust/netns.py (made here, removed after; root needed):

* TCP throughput, iperf3 from the client namespace to a server in the
  site's: straight over the veth pair (the network's own speed), through
  a plain relay TCP endpoint (relay + agent streams), and through TUN mode
  (relayd connect --tun: every packet through the client, the gateway's
  packet filter and the agent's TUN device). WireGuard between the same
  namespaces is the peer the issue names; the kernel here has no
  wireguard module (`ip link add type wireguard` fails), so the veth path
  stands in for it, as the issue allows.
* Flow-open latency, connect() to the first echoed byte of a new
  connection: through the relay's plain TCP endpoint, through the
  gateway in SOCKS mode (a flow decision per connection) and through
  TUN mode (a new tracked flow per connection).

    .venv/bin/python bench/zerotrust/tun.py [--seconds 5] [--connections 200]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.zerotrust import netns  # noqa: E402
from tests.zerotrust.netns import RELAY_IP, SERVICE_IP, TunSite  # noqa: E402


def iperf(site: TunSite, host: str, port: int, seconds: float) -> float:
    out = site.ns.run(site.ns.client, "iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J",
                      timeout=seconds + 60).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"]


def latency(site: TunSite, host: str, port: int, n: int, socks: str | None = None) -> dict:
    args = ["latency", host, str(port), str(n)] + ([socks] if socks else [])
    xs = sorted(json.loads(site.probe(*args, timeout=300)))
    return {"median_ms": statistics.median(xs) * 1000, "p99_ms": xs[int(len(xs) * 0.99) - 1] * 1000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--mtu", type=int, default=1400, help="the gateway's tun_mtu")
    a = ap.parse_args()
    why = netns.usable()
    if why:
        raise SystemExit(f"bench/zerotrust/tun.py {why}")
    with tempfile.TemporaryDirectory() as tmp, netns.Namespaces("b") as ns:
        site = TunSite(ns, Path(tmp), a.mtu)
        site.start()
        ns.start(ns.site, "iperf3", "-s", "-p", "5201")
        echo_pub = site.endpoints["echo"][0].rsplit(":", 1)[1]
        iperf_pub = site.endpoints["iperf"][0].rsplit(":", 1)[1]
        time.sleep(0.5)
        results = {
            "throughput_gbit": {
                "veth (no tunnel)": iperf(site, RELAY_IP, 5201, a.seconds) / 1e9,
                "relay TCP endpoint": iperf(site, RELAY_IP, int(iperf_pub), a.seconds) / 1e9,
                "TUN mode": iperf(site, SERVICE_IP, 5201, a.seconds) / 1e9,
            },
            "flow_open": {
                "relay TCP endpoint": latency(site, RELAY_IP, int(echo_pub), a.connections),
                "gateway, SOCKS mode": latency(site, SERVICE_IP, 9000, a.connections, site.socks),
                "gateway, TUN mode": latency(site, SERVICE_IP, 9000, a.connections),
            },
        }
    t = results["throughput_gbit"]
    print("| TCP throughput (iperf3, %gs) | Gbit/s | against veth |" % a.seconds)
    print("|---|---|---|")
    for k, v in t.items():
        print(f"| {k} | {v:.3f} | {v / t['veth (no tunnel)']:.4f} |")
    f = results["flow_open"]
    print(f"\n| flow open, connect to first echoed byte ({a.connections} connections) | median ms | p99 ms |"
          " median against the relay endpoint |")
    print("|---|---|---|---|")
    for k, v in f.items():
        print(f"| {k} | {v['median_ms']:.2f} | {v['p99_ms']:.2f} | "
              f"{v['median_ms'] / f['relay TCP endpoint']['median_ms']:.2f} |")
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
