"""HTTP ingress side by side in one run: the back end directly, nginx as a
TLS reverse proxy to it, and relayd's HTTPS ingress + agent to it.

    bash bench/http/run.sh            # installs nginx-light and wrk if missing

The back end is an nginx instance of its own (a small fixed response, and a
large file), so that no path is limited by a slow service. Every process is
on loopback, started here and stopped by PID. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
RELAYD = ROOT / ".venv" / "bin" / "relayd"
PY = ROOT / ".venv" / "bin" / "python"


def port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(p: int, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", p), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {p} did not open")


class Procs:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs = []

    def start(self, name, argv, **kw):
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(5)


def nginx_conf(tmp: Path, name: str, server_block: str) -> Path:
    d = tmp / name
    (d / "logs").mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(f"""
daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; sendfile on; tcp_nopush on; keepalive_requests 1000000;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  {server_block}
}}
""")
    return conf


def wrk(url: str, seconds: int, conns: int, close: bool = False, headers=()) -> tuple[float, float]:
    """requests/s and p99 (us); ``close``: a new connection (and TLS
    handshake) for every request; ``headers``: "Name: value" strings."""
    extra = (["-H", "Connection: close"] if close else []) + [a for h in headers for a in ("-H", h)]
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", *extra, url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:  # error answers are not a measurement of the path
        raise RuntimeError(f"{url}: {bad.group(1)} answers were not 2xx/3xx")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1e6}[m.group(2)]
    return rps, p99


def download(url: str, headers=(), size: int = 0, timeout: float = 300) -> float:
    """Gbit/s of one download; RuntimeError when fewer than ``size`` bytes came."""
    t0 = time.perf_counter()
    r = subprocess.run(["curl", "-sk", *[a for h in headers for a in ("-H", h)], "-o", "/dev/null",
                        "-w", "%{size_download}", url], capture_output=True, text=True, timeout=timeout)
    got = int(r.stdout or 0)
    if got < size:
        raise RuntimeError(f"{url}: downloaded {got} of {size} bytes")
    return got * 8 / (time.perf_counter() - t0) / 1e9


WS_ECHO = """
import asyncio, sys
from websockets.asyncio.server import serve
async def echo(c):
    async for m in c:
        await c.send(m)
async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), max_size=None):
        await asyncio.Event().wait()
asyncio.run(main())
"""

WS_CLIENT = """
import asyncio, ssl, sys, time
from websockets.asyncio.client import connect
async def main(url, seconds):
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    async with connect(url, ssl=ctx if url.startswith("wss") else None, max_size=None) as c:
        msg, n, end = b"x" * 64, 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            await c.send(msg)
            await c.recv()
            n += 1
    print(n / seconds)
asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


def ws_rate(url: str, seconds: int) -> float:
    out = subprocess.run([str(PY), "-c", WS_CLIENT, url, str(seconds)], capture_output=True, text=True,
                         timeout=seconds + 30)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-1000:])
    return float(out.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3,
                    help="wrk runs per path, taken in turn across the paths; the median is reported")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="relayd-httpbench-"))
    procs = Procs(tmp)
    big = tmp / "big.bin"
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20) * 256)  # 256 MiB
    try:
        # Self-signed certificate for nginx's TLS (same key type as relayd's: P-256).
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", str(tmp / "k.pem"), "-out", str(tmp / "c.pem"), "-days", "1",
                        "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
        wsb = port()
        procs.start("ws-echo", [str(PY), "-c", WS_ECHO, str(wsb)])
        b = port()
        backend = nginx_conf(tmp, "backend", f"""server {{ listen 127.0.0.1:{b};
            location / {{ return 200 "hello from the back end\\n"; }}
            location = /big.bin {{ root {tmp}; }} }}""")
        procs.start("backend", ["nginx", "-c", str(backend)])
        n = port()
        proxy = nginx_conf(tmp, "proxy", f"""upstream be {{ server 127.0.0.1:{b}; keepalive 64; }}
          server {{ listen 127.0.0.1:{n} ssl; ssl_certificate {tmp}/c.pem; ssl_certificate_key {tmp}/k.pem;
            location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection "";
                          proxy_buffering off; proxy_request_buffering off; }}
            location /ws {{ proxy_pass http://127.0.0.1:{wsb}; proxy_http_version 1.1;
                           proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade"; }} }}""")
        procs.start("nginx-proxy", ["nginx", "-c", str(proxy)])
        ag, https = port(), port()
        procs.start("relay", [str(RELAYD), "serve", "--data", str(tmp / "relay"), "--agents", f"127.0.0.1:{ag}",
                              "--https", f"127.0.0.1:{https}", "--http", "web=127.0.0.1",
                              "--http", "ws=127.0.0.1/ws"])
        for p in (b, n, ag, https, wsb):
            wait_port(p)
        token = subprocess.run([str(RELAYD), "admin", "join-token", "--data", str(tmp / "relay")],
                               capture_output=True, text=True, check=True).stdout.strip()
        procs.start("agent", [str(RELAYD), "agent", "--join", token, "--data", str(tmp / "agent"),
                              "--endpoint", f"web=127.0.0.1:{b}", "--endpoint", f"ws=127.0.0.1:{wsb}"])
        deadline = time.time() + 20
        while subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                              f"https://127.0.0.1:{https}/"], capture_output=True, text=True).stdout != "200":
            if time.time() > deadline:
                raise RuntimeError((tmp / "agent.log").read_text()[-2000:])
            time.sleep(0.2)
        paths = {"back end directly (http)": f"http://127.0.0.1:{b}",
                 "nginx TLS reverse proxy": f"https://127.0.0.1:{n}",
                 "relayd HTTPS ingress + agent": f"https://127.0.0.1:{https}"}
        ws_urls = {"back end directly (http)": f"ws://127.0.0.1:{wsb}/ws",
                   "nginx TLS reverse proxy": f"wss://127.0.0.1:{n}/ws",
                   "relayd HTTPS ingress + agent": f"wss://127.0.0.1:{https}/ws"}
        runs = {name: [] for name in paths}
        for name, url in paths.items():
            wrk(url + "/", 1, args.conns)  # warm up
        # The machine's speed drifts over a run: take the paths in turn, not
        # one after the other, and report each path's median.
        downloads = {name: [] for name in paths}
        fresh = {name: [] for name in paths}
        for _ in range(args.repeat):
            for name, url in paths.items():
                runs[name].append(wrk(url + "/", args.seconds, args.conns))
            for name, url in paths.items():
                fresh[name].append(wrk(url + "/", args.seconds, args.conns, close=True)[0])
            for name, url in paths.items():
                downloads[name].append(download(url + "/big.bin"))
        rows = {}
        for name, url in paths.items():
            rps, p99 = sorted(runs[name])[len(runs[name]) // 2]
            gbit = sorted(downloads[name])[len(downloads[name]) // 2]
            new = sorted(fresh[name])[len(fresh[name]) // 2]
            rows[name] = (rps, p99, new, gbit, ws_rate(ws_urls[name], args.seconds))
        for name in paths:
            print(f"{name}: requests/s of each run: " + ", ".join(f"{r:,.0f}" for r, _ in runs[name])
                  + "; new connections/s: " + ", ".join(f"{r:,.0f}" for r in fresh[name])
                  + "; download Gbit/s: " + ", ".join(f"{g:.2f}" for g in downloads[name]))
        print(f"\nwrk -t1 -c{args.conns} -d{args.seconds}s small GET with keep-alive, and with `Connection: close` "
              f"(a new connection and TLS handshake per request), medians of {args.repeat} runs "
              f"taken in turn; curl download of 256 MiB, median of {args.repeat}; "
              f"WebSocket echo of 64-byte messages, one at a time, Python websockets client and server\n")
        print("| path | requests/s | p99 latency us | new connections/s | 256 MiB download Gbit/s | WebSocket echoes/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, (rps, p99, new, gbit, wsr) in rows.items():
            print(f"| {name} | {rps:,.0f} | {p99:,.0f} | {new:,.0f} | {gbit:.2f} | {wsr:,.0f} |")
        ng = rows["nginx TLS reverse proxy"]
        rl = rows["relayd HTTPS ingress + agent"]
        print(f"\nrelayd / nginx: requests/s {rl[0] / ng[0]:.2f}x, p99 {rl[1] / ng[1]:.2f}x, "
              f"new connections/s {rl[2] / ng[2]:.2f}x, download {rl[3] / ng[3]:.2f}x, "
              f"WebSocket echoes {rl[4] / ng[4]:.2f}x")
    finally:
        procs.stop()
        subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    main()
