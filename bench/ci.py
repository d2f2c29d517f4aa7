#!/usr/bin/env python3
"""Short benchmark for CI: relayd against peers in the same run, judged by
ratios only (floors in bench/floors.toml, checked by bench/floors.py).

    bash bench/ci.sh                                   # installs what is missing
    .venv/bin/python bench/ci.py --out bench/results/ci.json

One relay node and one agent carry every relayd path: two TCP endpoints (to
an iperf3 server and to an echo server) and two HTTP endpoints on the HTTPS
port (to an nginx back end and a WebSocket echo server). The peers, started
here on loopback next to it and stopped by PID: the Go yamux tunnel of
bench/tunnel (frp's data path, built offline from bench/tunnel/gotunnel),
HAProxy (TCP mode, one thread, no TLS), nginx as a TLS reverse proxy to the
same back end, and with --direct the targets themselves.

Every path is set up once. Each round measures one figure on every path back
to back (the order flips each round, so drift and position hit every path
alike), and a ratio is relayd's figure over the peer's in the same round,
inverted for latency so that higher is always better for relayd; a ratio is
the median of its rounds. The Go build (about 30 s with an empty cache) runs
while the Python processes start. No sample starts after --budget seconds
and none may take more than about 30 s, so that a path that stalls fails its
floors (as missing figures) in time instead of holding CI up. Exit status:
bench/floors.py's verdict.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from statistics import median
from types import SimpleNamespace

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "tunnel"))
import gobuild  # noqa: E402
from bench import floors  # noqa: E402
from bench.http.run import WS_ECHO, download, nginx_conf, wrk, ws_rate  # noqa: E402
from tests.tunnel.processes import wait_port  # noqa: E402
from bench.tunnel.run import (HOST, Ctx, Registry, cpu_seconds, free_port, iperf_client,  # noqa: E402
                              machine, make_cert, rr_tool, setup_gotunnel, setup_haproxy, versions, wait_ready)

RELAYD = ROOT / ".venv" / "bin" / "relayd"
PY = ROOT / ".venv" / "bin" / "python"

#: figure -> (unit, higher is better, peers compared with relayd). The cpu_
#: figures are the CPU time (user + system, /proc/PID/stat) of the path's own
#: processes (relay + agent; HAProxy; nginx's proxy) during the sample of the
#: figure before them, per unit of work: less sensitive to other load on the
#: machine than rates, which lose whatever CPU time the other load takes.
FIGURES = {
    "tunnel.throughput": ("Gbit/s, iperf3 one stream", True, ("gotunnel", "haproxy")),
    "tunnel.cpu_per_gb": ("CPU s per GB in that run", False, ("gotunnel", "haproxy")),
    "tunnel.connections": ("new connections/s, 16 workers", True, ("gotunnel", "haproxy")),
    "tunnel.cpu_per_connection": ("CPU us per connection in that run", False, ("gotunnel", "haproxy")),
    "tunnel.latency_p50": ("us, p50 of 64-byte round trips", False, ("gotunnel", "haproxy")),
    "http.requests": ("requests/s, wrk keep-alive", True, ("nginx",)),
    "http.cpu_per_request": ("CPU us per request in that run", False, ("nginx",)),
    "http.new_connections": ("requests/s, wrk Connection: close", True, ("nginx",)),
    "http.cpu_per_new_connection": ("CPU us per request in that run", False, ("nginx",)),
    "http.download": ("Gbit/s, curl of 64 MiB", True, ("nginx",)),
    "http.cpu_per_gb": ("CPU s per GB in that run", False, ("nginx",)),
    "http.websocket": ("64-byte echoes/s, one at a time", True, ("nginx",)),
}
#: a measurement -> the figure it gives, and its CPU figure (with the unit of work)
MEASUREMENTS = {
    "tunnel.throughput": ("tunnel.cpu_per_gb", 1e9, 1.0),  # (cpu figure, bytes per unit, cpu scale)
    "tunnel.connections": ("tunnel.cpu_per_connection", 1, 1e6),
    "tunnel.latency_p50": None,
    "http.requests": ("http.cpu_per_request", 1, 1e6),
    "http.new_connections": ("http.cpu_per_new_connection", 1, 1e6),
    "http.download": ("http.cpu_per_gb", 1e9, 1.0),
    "http.websocket": None,
}
TUNNEL_PATHS = ("relayd", "gotunnel", "haproxy")
HTTP_PATHS = ("relayd", "nginx")
PEERS = {
    "relayd": "relayd serve + relayd agent (compiled build), TLS agent link, one of each for every path",
    "gotunnel": "bench/tunnel/gotunnel: Go relay + agent, TLS + hashicorp/yamux (Debian's), frp's 6 MiB window",
    "haproxy": "HAProxy, mode tcp, nbthread 1, no TLS (one hop)",
    "nginx": "nginx, worker_processes 1, TLS reverse proxy with upstream keepalive, no buffering",
    "direct": "the target itself (iperf3, the Go echo server, the nginx back end, the WebSocket echo)",
}
BIG = 64 << 20


def ratio_name(figure: str, peer: str) -> str:
    higher_better = FIGURES[figure][1]
    return f"{figure} relayd/{peer}" if higher_better else f"{figure} {peer}/relayd"


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# --------------------------------------------------------------------------- set-up


def start_relayd(ctx: Ctx, iperf_port: int, echo_port: int, backend: int, ws: int) -> tuple[dict[str, int], list]:
    """One relay and one enrolled agent with every relayd path; its public
    ports and the two processes."""
    p = {k: free_port() for k in ("agents", "https", "iperf", "echo")}
    data = ctx.tmp / "relayd"
    serve = ctx.reg.start("relayd-serve", [
        str(RELAYD), "serve", "--data", str(data / "relay"), "--agents", f"{HOST}:{p['agents']}",
        "--https", f"{HOST}:{p['https']}", "--tcp", f"iperf={HOST}:{p['iperf']}",
        "--tcp", f"echo={HOST}:{p['echo']}", "--http", f"web={HOST}", "--http", f"ws={HOST}/ws"])
    deadline = time.monotonic() + 60
    while True:  # the join token needs the CA and database that serve makes as it starts
        wait_port(p["agents"], 60)
        res = subprocess.run([str(RELAYD), "admin", "join-token", "--data", str(data / "relay")],
                             capture_output=True, text=True, timeout=60)
        if res.returncode == 0 and res.stdout.strip():
            break
        if time.monotonic() > deadline or serve.popen.poll() is not None:
            raise RuntimeError(f"no join token: {res.stderr[-500:]}\n{serve.tail()}")
        time.sleep(0.2)
    agent = ctx.reg.start("relayd-agent", [
        str(RELAYD), "agent", "--join", res.stdout.strip(), "--data", str(data / "agent"),
        "--endpoint", f"iperf={HOST}:{iperf_port}", "--endpoint", f"echo={HOST}:{echo_port}",
        "--endpoint", f"web={HOST}:{backend}", "--endpoint", f"ws={HOST}:{ws}"])
    return p, [serve, agent]


def start_http(ctx: Ctx, tmp: pathlib.Path) -> tuple[dict[str, int], list]:
    """The nginx back end (a small response and a 64 MiB file), the WebSocket
    echo server, and nginx as a TLS reverse proxy to both; the ports, and the
    proxy's process."""
    with open(tmp / "big.bin", "wb") as f:
        f.write(os.urandom(1 << 20) * (BIG >> 20))
    p = {k: free_port() for k in ("backend", "ws", "nginx")}
    ctx.reg.start("ws-echo", [str(PY), "-c", WS_ECHO, str(p["ws"])])
    conf = nginx_conf(tmp, "backend", f"""server {{ listen {HOST}:{p['backend']};
        location / {{ return 200 "hello from the back end\\n"; }}
        location = /big.bin {{ root {tmp}; }} }}""")
    ctx.reg.start("nginx-backend", ["nginx", "-c", str(conf)])
    conf = nginx_conf(tmp, "proxy", f"""upstream be {{ server {HOST}:{p['backend']}; keepalive 64; }}
      server {{ listen {HOST}:{p['nginx']} ssl; ssl_certificate {ctx.cert}; ssl_certificate_key {ctx.key};
        location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection "";
                      proxy_buffering off; proxy_request_buffering off; }}
        location /ws {{ proxy_pass http://{HOST}:{p['ws']}; proxy_http_version 1.1;
                       proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade"; }} }}""")
    return p, [ctx.reg.start("nginx-proxy", ["nginx", "-c", str(conf)])]


def wait_http(url: str, timeout: float, procs) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", url],
                              capture_output=True, text=True, timeout=30).stdout
        if code == "200":
            return
        for p in procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited {p.popen.returncode}:\n{p.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: no 200 within {timeout}s (last {code!r})\n"
                               + "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs))
        time.sleep(0.2)


# --------------------------------------------------------------------------- measurement


def measure(figure: str, addr: dict, a) -> tuple[float, float | None]:
    """One sample of ``figure`` through the path at ``addr``: its value and
    the work it did (bytes, connections, requests), where a CPU figure goes with it."""
    s = a.seconds
    if figure == "tunnel.throughput":
        r = iperf_client(addr["iperf"], seconds=s, timeout=s + 15)
        if "error" in r:
            raise RuntimeError(r["error"])
        return r["gbit_s"], r["bytes"]
    if figure == "tunnel.connections":
        r = rr_tool(addr["ctx"], ["-mode", "connect", "-addr", f"{HOST}:{addr['echo']}", "-c", "16",
                                  "-duration", f"{s}s", "-timeout", "5s"], timeout=s + 15)
        if "error" in r or r.get("failures"):
            raise RuntimeError(f"rr connect: {r}")
        return r["conn_per_s"], r["connections"]
    if figure == "tunnel.latency_p50":
        r = rr_tool(addr["ctx"], ["-mode", "rr", "-addr", f"{HOST}:{addr['echo']}", "-n", str(a.rr_n),
                                  "-size", "64"], timeout=20)
        if "error" in r:
            raise RuntimeError(f"rr: {r}")
        return r["p50_us"], None
    if figure in ("http.requests", "http.new_connections"):
        rps = wrk(addr["url"] + "/", s, 16, close=figure == "http.new_connections")[0]
        return rps, rps * s  # wrk's requests/s is over its own run of s seconds
    if figure == "http.download":
        return download(addr["url"] + "/big.bin", size=BIG, timeout=20), BIG
    if figure == "http.websocket":
        return ws_rate(addr["ws"], s), None
    raise KeyError(figure)


def run_rounds(paths: dict[str, dict[str, dict]], a, samples: dict, deadline: float) -> None:
    for rnd in range(a.rounds):
        print(f"round {rnd + 1}/{a.rounds}", flush=True)
        for figure, cpu in MEASUREMENTS.items():
            group = paths["tunnel" if figure.startswith("tunnel.") else "http"]
            order = list(group) if rnd % 2 == 0 else list(reversed(group))
            line = []
            for name in order:
                if time.monotonic() > deadline:
                    print(f"  out of time (--budget {a.budget:g} s): {figure} on {name} and after not measured",
                          flush=True)
                    return
                endpoint = "iperf" if figure == "tunnel.throughput" else "echo" if figure.startswith("tunnel.") else "web"
                pids = [pid for p in group[name]["procs"].get(endpoint, []) for pid in p.tree()]
                try:
                    c0 = cpu_seconds(pids)
                    v, work = measure(figure, group[name], a)
                    c1 = cpu_seconds(pids)
                    samples[figure][name][rnd] = v
                    line.append(f"{name} {v:,.2f}")
                    if cpu and pids and work:
                        per = (c1 - c0) * cpu[2] / (work / cpu[1])
                        samples[cpu[0]][name][rnd] = per
                        line[-1] += f" ({per:,.2f} CPU)"
                except Exception as exc:  # one failed sample must not cost the rest
                    line.append(f"{name} ERROR {str(exc).splitlines()[0][:200]}")
                time.sleep(a.settle)
            print(f"  {figure}: " + "; ".join(line), flush=True)


def summarize(samples: dict) -> tuple[dict, dict]:
    """Every figure's samples and median per path; every ratio of relayd to
    a peer, oriented so that higher is better for relayd: the median of the
    rounds' ratios (paired samples, taken back to back), their spread, and
    for comparison the ratio of the two medians."""
    def rel(mine, theirs, higher):
        return (mine / theirs if higher else theirs / mine) if mine and theirs else None

    figures, ratios = {}, {}
    for figure, per_path in samples.items():
        unit, higher, peers = FIGURES[figure]
        meds = {name: median([v for v in vals if v is not None]) if any(v is not None for v in vals) else None
                for name, vals in per_path.items()}
        figures[figure] = {"unit": unit, "higher_is_better": higher,
                           "paths": {name: {"samples": vals, "median": meds[name]} for name, vals in per_path.items()}}
        for peer in peers:
            if peer not in per_path or "relayd" not in per_path:
                continue
            rounds = [rel(mine, theirs, higher) for mine, theirs in zip(per_path["relayd"], per_path[peer])]
            got = [x for x in rounds if x is not None]
            ratios[ratio_name(figure, peer)] = {
                "value": median(got) if got else None, "per_round": rounds,
                "min": min(got, default=None), "max": max(got, default=None),
                "figure": figure, "peer": peer, "of_medians": rel(meds["relayd"], meds[peer], higher)}
    return figures, ratios


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds; every ratio is a median over them (default 5)")
    ap.add_argument("--seconds", type=int, default=1, help="length of each timed sample, s (default 1)")
    ap.add_argument("--rr-n", type=int, default=3000, help="64-byte round trips per latency sample (default 3000)")
    ap.add_argument("--settle", type=float, default=0.2, help="pause after each sample, s (default 0.2)")
    ap.add_argument("--budget", type=float, default=140,
                    help="start no sample later than this many seconds after the start (default 140)")
    ap.add_argument("--floors", default=str(floors.FLOORS), help="floors file (default bench/floors.toml)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ci.json"), help="JSON artifact")
    ap.add_argument("--gocache", default=str(ROOT / "bench" / "results" / ".gocache"), help="Go build cache")
    ap.add_argument("--direct", action="store_true",
                    help="also measure the targets directly (for context; adds about 35 s)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs)")
    a = ap.parse_args(argv)
    started = time.monotonic()

    def on_term(signum, frame):  # a cancelled CI job still stops every process started here
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="relayd-cibench-"))
    reg = Registry(tmp)
    args = SimpleNamespace(gomaxprocs=0, haproxy_threads=1, relayd=str(RELAYD))
    ctx = Ctx(args, tmp, reg, {})
    result: dict = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_files": len(git("status", "--porcelain", "--untracked-files=no").splitlines()),
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
        "reproduce": floors.REPRODUCE,
        "machine": {**machine(), "python": platform.python_version(), "loadavg_start": os.getloadavg()},
        "settings": vars(a),
        "peers": PEERS,
    }
    extra = ("direct",) if a.direct else ()
    samples = {f: {n: [None] * a.rounds for n in (TUNNEL_PATHS if f.startswith("tunnel.") else HTTP_PATHS) + extra}
               for f in FIGURES}
    built: dict = {}

    def build_go() -> None:
        t0 = time.monotonic()
        try:
            built["bins"] = gobuild.build(tmp / "bin", cache_dir=pathlib.Path(a.gocache))
        except Exception as exc:
            built["error"] = exc
        built["seconds"] = round(time.monotonic() - t0, 1)

    try:
        builder = threading.Thread(target=build_go, daemon=True)
        builder.start()  # meanwhile the Python processes start: nothing is measured yet
        make_cert(ctx)
        t = {"iperf": free_port(), "echo": free_port()}
        reg.start("iperf3-server", ["iperf3", "-s", "-B", HOST, "-p", str(t["iperf"]), "--forceflush"])
        h, nginx = start_http(ctx, tmp)
        r, relayd = start_relayd(ctx, t["iperf"], t["echo"], h["backend"], h["ws"])
        hap = {k: setup_haproxy(ctx, t[k], k) for k in ("iperf", "echo")}
        builder.join()
        result["go_build_s"] = built["seconds"]
        if "error" in built:
            raise RuntimeError(f"Go build: {built['error']}")
        ctx.bins.update(built["bins"])
        reg.start("echo-server", [str(ctx.bins["rr"]), "-mode", "echo", "-listen", f"{HOST}:{t['echo']}"])
        gt = {k: setup_gotunnel(ctx, t[k], k) for k in ("iperf", "echo")}
        tunnel = {"relayd": {"iperf": r["iperf"], "echo": r["echo"], "procs": {"iperf": relayd, "echo": relayd}},
                  "gotunnel": {k: v[0] for k, v in gt.items()} | {"procs": {k: v[1] for k, v in gt.items()}},
                  "haproxy": {k: v[0] for k, v in hap.items()} | {"procs": {k: v[1] for k, v in hap.items()}},
                  "direct": dict(t, procs={})}
        tunnel = {k: v for k, v in tunnel.items() if k in samples["tunnel.throughput"]}
        for addr in tunnel.values():
            addr["ctx"] = ctx
            wait_ready("echo", addr["echo"], 60, reg.live)
            wait_ready("iperf", addr["iperf"], 60, reg.live)
        http = {"relayd": {"url": f"https://{HOST}:{r['https']}", "ws": f"wss://{HOST}:{r['https']}/ws",
                           "procs": {"web": relayd}},
                "nginx": {"url": f"https://{HOST}:{h['nginx']}", "ws": f"wss://{HOST}:{h['nginx']}/ws",
                          "procs": {"web": nginx}},
                "direct": {"url": f"http://{HOST}:{h['backend']}", "ws": f"ws://{HOST}:{h['ws']}/ws", "procs": {}}}
        http = {k: v for k, v in http.items() if k in samples["http.requests"]}
        for addr in http.values():
            wait_http(addr["url"] + "/", 60, reg.live)
            wrk(addr["url"] + "/", 1, 16)  # warm up: first connections, caches, buffers
            download(addr["url"] + "/big.bin", size=BIG)
        result["setup_s"] = round(time.monotonic() - started, 1)
        result["versions"] = versions(ctx, ["relayd"])
        result["versions"]["nginx"] = subprocess.run(["nginx", "-v"], capture_output=True,
                                                     text=True).stderr.strip()
        result["tls"] = {k[:-4]: v for k, v in ctx.info.items() if k.endswith("_tls")}
        print(f"set up in {result['setup_s']} s (Go build {built['seconds']} s); "
              f"{a.rounds} rounds of {a.seconds} s samples", flush=True)
        run_rounds({"tunnel": tunnel, "http": http}, a, samples, started + a.budget)
    except Exception as exc:  # the figures that are missing fail their floors
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"ERROR {result['error']}", file=sys.stderr, flush=True)
    finally:
        reg.stop_all()
        if a.keep_tmp:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["figures"], result["ratios"] = summarize(samples)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(f"\nratios (relayd against the peer, higher is better; median of {a.rounds} rounds), "
          f"wall {result['wall_s']} s:", flush=True)
    return floors.judge(result, pathlib.Path(a.out), pathlib.Path(a.floors))


if __name__ == "__main__":
    sys.exit(main())
