"""Hybrid connections side by side in one run, on loopback:

* WebSocket echo round trips (64 B, one at a time: p50/p99) and sender
  connects per second, through a hybrid connection with relayd's Python
  listener and with Microsoft's hyco-ws listener, against a plain relayd
  WebSocket endpoint (relay + agent) and the echo server directly;
* HTTP-mode requests per second and p99 (wrk) with a hyco-https listener and
  with the Python listener, against a plain relayd HTTP endpoint and the
  back end (nginx) directly;
* a 64 MiB download through each HTTP path.

    bash bench/hybrid/run.sh [--seconds 5]

The relay listens on 127.0.0.1:443 (the npm clients' URL helpers hard-code
443), so this runs as root. Every process is started here and stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path


def _http_bench():
    """bench/http/run.py (its helpers: processes, nginx, ports)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("httpbench", Path(__file__).resolve().parent.parent / "http" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_hb = _http_bench()
PY, RELAYD, ROOT, Procs, nginx_conf, port, wait_port = (_hb.PY, _hb.RELAYD, _hb.ROOT, _hb.Procs, _hb.nginx_conf,
                                                        _hb.port, _hb.wait_port)

HYCO = ROOT / "tests" / "interop" / "hyco"
KEY_NAME, KEY = "RootManageSharedAccessKey", "YmVuY2gta2V5LW9mLXRoZS1ub2RlLTEyMzQ="

PY_LISTENER = """
import asyncio, ssl, sys
from relayd.client import hybrid
cs, ca, big = sys.argv[1], sys.argv[2], b"x" * (64 << 20)
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def answer(req):
    return hybrid.Response(200, {"content-type": "text/plain"}, big if req.target.endswith("/big") else b"hello\\n")
asyncio.run(hybrid.Listener(cs, on_accept=echo, on_request=answer, ssl=ssl.create_default_context(cafile=ca)).run())
"""

WS_PROBE = """
import asyncio, ssl, sys, time
from websockets.asyncio.client import connect
url, seconds, tok, ca = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca) if url.startswith("wss") else None
hdrs = {"ServiceBusAuthorization": tok} if tok != "-" else {}
async def main():
    lat = []
    async with connect(url, ssl=ctx, additional_headers=hdrs, compression=None, max_size=None) as c:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter(); await c.send(b"x" * 64); await c.recv(); lat.append(time.perf_counter() - t)
    lat.sort()
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        async with connect(url, ssl=ctx, additional_headers=hdrs, compression=None):
            n += 1
    print(lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6, n / seconds)
asyncio.run(main())
"""


def token(path: str) -> str:
    out = subprocess.run([str(PY), "-c", "import sys,time; from relayd.control import sas; print(sas.make_token("
                          f"'http://localhost/{path}', '{KEY_NAME}', '{KEY}', int(time.time()) + 7200))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def ws_probe(url: str, seconds: int, tok: str, ca: str) -> tuple[float, float, float]:
    out = subprocess.run([str(PY), "-c", WS_PROBE, url, str(seconds), tok, ca], capture_output=True, text=True,
                         timeout=3 * seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-1500:])
    p50, p99, cps = map(float, out.stdout.split())
    return p50, p99, cps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=16)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="relayd-hcbench-"))
    procs = Procs(tmp)
    env = dict(os.environ, NODE_EXTRA_CA_CERTS=str(tmp / "relay" / "ca" / "ca.crt"))
    try:
        with open(tmp / "big.bin", "wb") as f:
            f.write(b"x" * (64 << 20))
        wsb = port()
        procs.start("ws-echo", [str(PY), "-c", _hb.WS_ECHO, str(wsb)])
        b = port()
        procs.start("backend", ["nginx", "-c", str(nginx_conf(tmp, "backend", f"""server {{ listen 127.0.0.1:{b};
            location / {{ return 200 "hello\\n"; }} location = /big.bin {{ root {tmp}; }} }}"""))])
        (tmp / "relay.toml").write_text(f"""
[hybrid]
[[hybrid.rules]]
name = "{KEY_NAME}"
key = "{KEY}"
rights = ["listen", "send", "manage"]
[[hybrid.connections]]
path = "py"
[[hybrid.connections]]
path = "hyco"
""")
        ag = port()
        procs.start("relay", [str(RELAYD), "serve", "--config", str(tmp / "relay.toml"), "--data", str(tmp / "relay"),
                              "--agents", f"127.0.0.1:{ag}", "--https", "127.0.0.1:443", "--hostname", "localhost",
                              "--http", "web=127.0.0.1", "--http", "ws=127.0.0.1/ws"])
        for p in (b, wsb, ag, 443):
            wait_port(p)
        ca = str(tmp / "relay" / "ca" / "ca.crt")
        jt = subprocess.run([str(RELAYD), "admin", "join-token", "--data", str(tmp / "relay")], capture_output=True,
                            text=True, check=True).stdout.strip()
        procs.start("agent", [str(RELAYD), "agent", "--join", jt, "--data", str(tmp / "agent"),
                              "--endpoint", f"web=127.0.0.1:{b}", "--endpoint", f"ws=127.0.0.1:{wsb}"])
        cs = f"Endpoint=sb://localhost/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={KEY};EntityPath=py"
        procs.start("py-listener", [str(PY), "-c", PY_LISTENER, cs, ca])
        procs.start("hyco-ws", ["node", str(HYCO / "ws_peer.js"), "listen", "localhost", "hyco", KEY_NAME, KEY],
                    cwd=HYCO, env=env)
        time.sleep(3)
        deadline = time.time() + 20
        while subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "https://127.0.0.1/"],
                             capture_output=True, text=True).stdout != "200":
            if time.time() > deadline:
                raise RuntimeError((tmp / "agent.log").read_text()[-2000:])
            time.sleep(0.2)
        ws_paths = {
            "hybrid connection, relayd Python listener": ("wss://localhost/$hc/py?sb-hc-action=connect", token("py")),
            "hybrid connection, hyco-ws listener": ("wss://localhost/$hc/hyco?sb-hc-action=connect", token("hyco")),
            "relayd WebSocket endpoint (relay + agent)": ("wss://127.0.0.1/ws", "-"),
            "echo server directly": (f"ws://127.0.0.1:{wsb}/ws", "-"),
        }
        ws_rows = {name: ws_probe(url, args.seconds, tok, ca) for name, (url, tok) in ws_paths.items()}
        # HTTP: the hyco-ws listener steps aside for hyco-https on the same hybrid connection.
        procs.procs[-1].terminate()
        procs.start("hyco-https", ["node", str(HYCO / "https_listener.js"), "localhost", "hyco", KEY_NAME, KEY],
                    cwd=HYCO, env=env)
        time.sleep(3)
        http_paths = {
            "hybrid connection, hyco-https listener": ("https://localhost/hyco/x", "/hyco/big/67108864", token("hyco")),
            "hybrid connection, relayd Python listener": ("https://localhost/py/x", "/py/big", token("py")),
            "relayd HTTP endpoint (relay + agent)": ("https://127.0.0.1/", "/big.bin", None),
            "back end directly": (f"http://127.0.0.1:{b}/", "/big.bin", None),
        }
        http_rows = {}
        for name, (url, big, tok) in http_paths.items():
            hdr = [f"ServiceBusAuthorization: {tok}"] if tok else []
            base = url.split("/", 3)
            rps, p99 = _hb.wrk(url, args.seconds, args.conns, headers=hdr)
            gbit = _hb.download(f"{base[0]}//{base[2]}{big}", hdr, 64 << 20)
            http_rows[name] = (rps, p99, gbit)
        print(f"\nWebSocket: 64-byte echoes one at a time for {args.seconds} s (p50, p99), then sender connects "
              f"(handshake and close) one at a time for {args.seconds} s; Python websockets client\n")
        print("| path | echo p50 us | echo p99 us | connects/s |")
        print("|---|---:|---:|---:|")
        for name, (p50, p99, cps) in ws_rows.items():
            print(f"| {name} | {p50:,.0f} | {p99:,.0f} | {cps:,.0f} |")
        print(f"\nHTTP: wrk -t1 -c{args.conns} -d{args.seconds}s small GET with keep-alive; 64 MiB download (curl)\n")
        print("| path | requests/s | p99 us | 64 MiB download Gbit/s |")
        print("|---|---:|---:|---:|")
        for name, (rps, p99, gbit) in http_rows.items():
            print(f"| {name} | {rps:,.0f} | {p99:,.0f} | {gbit:.2f} |")
        plain = http_rows["relayd HTTP endpoint (relay + agent)"]
        for name in ("hybrid connection, hyco-https listener", "hybrid connection, relayd Python listener"):
            r = http_rows[name]
            print(f"\n{name} / relayd HTTP endpoint: requests/s {r[0] / plain[0]:.2f}x, p99 {r[1] / plain[1]:.2f}x, "
                  f"download {r[2] / plain[2]:.2f}x", end="")
        wsplain = ws_rows["relayd WebSocket endpoint (relay + agent)"]
        for name in ("hybrid connection, relayd Python listener", "hybrid connection, hyco-ws listener"):
            r = ws_rows[name]
            print(f"\n{name} / relayd WebSocket endpoint: echo p50 {r[0] / wsplain[0]:.2f}x, "
                  f"connects/s {r[2] / wsplain[2]:.2f}x", end="")
        print()
    finally:
        procs.stop()
        subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    main()
